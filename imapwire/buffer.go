package imapwire

import (
	"bufio"
	"io"
	"sync"
	"syscall"
)

// Buffers are lent from a pool while data flows and handed back when a
// connection has nothing left to read or write. A proxy holding thousands
// of sessions that sit in IDLE then holds no I/O buffer for any of them,
// only its goroutines and a few small structs.
var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

func getBuf() []byte { return (*bufPool.Get().(*[]byte))[:bufSize] }

func putBuf(b []byte) {
	b = b[:cap(b)]
	bufPool.Put(&b)
}

// lazyBuf is a buffered reader in the manner of bufio.Reader, whose buffer
// is borrowed only while it holds data. Before a read that may block it
// waits for the socket to become readable without any buffer (through
// syscall.RawConn), so an idle connection owns none.
type lazyBuf struct {
	src  io.Reader
	raw  syscall.RawConn // nil: src cannot be waited on; keep the buffer
	buf  []byte
	r, w int
}

func newLazyBuf(src io.Reader) *lazyBuf {
	b := &lazyBuf{}
	b.reset(src)
	return b
}

func (b *lazyBuf) reset(src io.Reader) {
	b.release()
	b.src, b.raw = src, nil
	// Only a plain socket can be waited on (a *tls.Conn has no
	// SyscallConn: it buffers inside itself, so the socket's readiness
	// would say nothing).
	if sc, ok := src.(interface {
		SyscallConn() (syscall.RawConn, error)
	}); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			b.raw = raw
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
	if b.r == b.w && b.raw != nil {
		b.release()
		if err := b.waitReadable(); err != nil {
			return err
		}
	}
	if b.buf == nil {
		b.buf = getBuf()
	}
	if b.r > 0 {
		copy(b.buf, b.buf[b.r:b.w])
		b.w -= b.r
		b.r = 0
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

// waitReadable blocks until the socket has data or an EOF, honouring its
// read deadline, without a buffer: a one-byte MSG_PEEK asks the kernel
// without taking anything.
func (b *lazyBuf) waitReadable() error {
	var peek [1]byte
	return b.raw.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), peek[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		// Data, EOF or a socket error: the real read reports the
		// last two in the form the net package gives them.
		return err != syscall.EAGAIN && err != syscall.EINTR
	})
}

// readSlice works as bufio.Reader.ReadSlice.
func (b *lazyBuf) readSlice(delim byte) ([]byte, error) {
	scanned := 0
	for {
		if b.buf != nil {
			if i := indexByte(b.buf[b.r+scanned:b.w], delim); i >= 0 {
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

func indexByte(s []byte, c byte) int {
	for i, x := range s {
		if x == c {
			return i
		}
	}
	return -1
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
