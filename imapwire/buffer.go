package imapwire

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
)

// Buffers are lent from a pool while data flows and handed back when a
// connection has nothing left to read or write. A proxy holding thousands
// of sessions that sit in IDLE then holds no I/O buffer for any of them,
// only its goroutines and a few small structs.
// The pool holds array pointers, not slices: a slice would have to be
// boxed in a new *[]byte on every Put.
var bufPool = sync.Pool{New: func() any { return new([bufSize]byte) }}

func getBuf() []byte { return bufPool.Get().(*[bufSize]byte)[:] }

// putBuf clears a buffer before it goes back: it may have held another
// user's password or mail, and must not show it to the next borrower
// through any mistake. b must come from getBuf.
func putBuf(b []byte) {
	a := (*[bufSize]byte)(b[:bufSize])
	clear(a[:])
	bufPool.Put(a)
}

// lazyBuf is a buffered reader in the manner of bufio.Reader, whose buffer
// is borrowed only while it holds data. On a socket it reads through
// syscall.RawConn: one read(2) when data is there, and when the read would
// block it hands the buffer back and waits for readability without one,
// so an idle connection owns none.
type lazyBuf struct {
	src  io.Reader
	raw  syscall.RawConn // nil: src cannot be waited on; keep the buffer
	buf  []byte
	r, w int

	// readFn is readRaw bound once, and n and rerr are its results: a
	// closure made per read would cost three allocations on every read
	// and keep them alive for as long as the connection waits.
	readFn func(fd uintptr) bool
	n      int
	rerr   error
}

func newLazyBuf(src io.Reader) *lazyBuf {
	b := &lazyBuf{}
	b.reset(src)
	return b
}

func (b *lazyBuf) reset(src io.Reader) {
	b.r, b.w = 0, 0 // what is buffered belongs to the old source
	b.release()
	b.src, b.raw = src, nil
	// Only a plain socket can be waited on (a *tls.Conn has no
	// SyscallConn: it buffers inside itself, so the socket's readiness
	// would say nothing).
	if sc, ok := src.(interface {
		SyscallConn() (syscall.RawConn, error)
	}); ok && rawReads {
		if raw, err := sc.SyscallConn(); err == nil {
			b.raw = raw
			if b.readFn == nil {
				b.readFn = b.readRaw
			}
		}
	}
}

func (b *lazyBuf) release() {
	if b.buf != nil && b.r == b.w {
		putBuf(b.buf)
		b.buf, b.r, b.w = nil, 0, 0
	}
}

func (b *lazyBuf) buffered() int { return b.w - b.r }

// fill reads more data into the buffer; it is called only when the
// buffer has room.
func (b *lazyBuf) fill() error {
	if b.buf != nil && b.r > 0 {
		copy(b.buf, b.buf[b.r:b.w])
		b.w -= b.r
		b.r = 0
	}
	if b.raw != nil {
		return b.rawFill()
	}
	if b.buf == nil {
		b.buf = getBuf()
	}
	for i := 0; i < 100; i++ {
		n, err := b.src.Read(b.buf[b.w:])
		b.w += n
		if n > 0 || err != nil {
			if b.r == b.w {
				b.release()
			}
			return err
		}
	}
	return io.ErrNoProgress
}

// rawFill reads from the socket with one read(2) when data is there. Only
// when the read would block does it hand the buffer back (if it holds
// nothing) and wait for readability without one, honouring the read
// deadline.
func (b *lazyBuf) rawFill() error {
	b.n, b.rerr = 0, nil
	err := b.raw.Read(b.readFn)
	n, rerr := b.n, b.rerr
	b.rerr = nil
	switch {
	case err != nil:
		b.release()
		return err
	case rerr != nil:
		b.release()
		return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		b.release()
		return io.EOF
	}
	b.w += n
	return nil
}

// wait reads into an empty buffer once the socket is readable.
func (b *lazyBuf) wait() error {
	if b.raw == nil || b.r < b.w {
		return nil
	}
	b.release() // nothing buffered: back to the pool, r = w = 0
	return b.rawFill()
}

// readSlice works as bufio.Reader.ReadSlice.
func (b *lazyBuf) readSlice(delim byte) ([]byte, error) {
	scanned := 0
	for {
		if b.buf != nil {
			if i := bytes.IndexByte(b.buf[b.r+scanned:b.w], delim); i >= 0 {
				line := b.buf[b.r : b.r+scanned+i+1]
				b.r += scanned + i + 1
				return line, nil
			}
			scanned = b.w - b.r
			if b.w-b.r == len(b.buf) {
				line := b.buf[b.r:b.w]
				b.r = b.w
				return line, bufio.ErrBufferFull
			}
		}
		if err := b.fill(); err != nil {
			if b.buf == nil || b.r == b.w {
				return nil, err
			}
			line := b.buf[b.r:b.w]
			b.r = b.w
			return line, err
		}
	}
}

// Read reads buffered data first, then straight from the source.
func (b *lazyBuf) Read(p []byte) (int, error) {
	if b.r < b.w {
		n := copy(p, b.buf[b.r:b.w])
		b.r += n
		if b.r == b.w {
			b.release()
		}
		return n, nil
	}
	b.release()
	if len(p) == 0 {
		return 0, nil
	}
	return b.src.Read(p)
}

// take returns up to n buffered bytes and consumes them.
func (b *lazyBuf) take(n int) []byte {
	if n > b.w-b.r {
		n = b.w - b.r
	}
	p := b.buf[b.r : b.r+n]
	b.r += n
	return p
}
