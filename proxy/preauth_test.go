package proxy

import (
	"bytes"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// TestPreAuthMemoryBounded: connections that each send the longest chain
// of pieces a command before login could once carry (lines of 60 KiB
// joined by empty non-synchronising literals, never finished) and then
// wait, make the proxy hold a bounded amount each: the command is refused
// at MaxCommandPreAuth and the rest of it is read and dropped. Before the
// bound each such connection held about 7.5 MiB of decoded arguments.
func TestPreAuthMemoryBounded(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	const conns = 50
	// 127 pieces of two tokens each stay under the decoder's old
	// 256-token bound, so that the old code held them all.
	piece := " " + strings.Repeat("x", 60*1024) + " {0+}\r\n"
	var chain bytes.Buffer
	chain.WriteString("a ID")
	for range 127 {
		chain.WriteString(piece)
	}
	before := heapInuse()
	var cs []*net.TCPConn
	for range conns {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cs = append(cs, c.(*net.TCPConn))
	}
	done := make(chan error, conns)
	for _, c := range cs {
		go func() {
			c.SetWriteDeadline(time.Now().Add(30 * time.Second))
			_, err := c.Write(chain.Bytes())
			done <- err
		}()
	}
	for range conns {
		if err := <-done; err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	// Everything sent has been read by the proxy: nothing is queued on
	// either side of any of the connections.
	deadline := time.Now().Add(30 * time.Second)
	for {
		queued := 0
		for _, c := range cs {
			queued += sockQueue(t, c, syscall.TIOCOUTQ)
		}
		p.srv.mu.Lock()
		for sess := range p.srv.sessions {
			if tc, ok := sess.raw.(*net.TCPConn); ok {
				queued += sockQueue(t, tc, syscall.TIOCINQ)
			}
		}
		p.srv.mu.Unlock()
		if queued == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes still queued", queued)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := p.srv.Stats().Sessions; n != conns {
		t.Fatalf("sessions = %d, want %d", n, conns)
	}
	held := heapInuse() - before
	runtime.KeepAlive(chain.Bytes())
	per := held / conns
	t.Logf("heap in use grew by %d KiB for %d connections: %d KiB each", held>>10, conns, per>>10)
	if per > 256<<10 {
		t.Errorf("each waiting connection holds %d KiB, want at most 256 KiB", per>>10)
	}
}

func heapInuse() int64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// sockQueue returns the bytes in a socket's receive (TIOCINQ) or send
// (TIOCOUTQ) queue.
func sockQueue(t *testing.T, c *net.TCPConn, req uintptr) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int32
	var serr syscall.Errno
	rc.Control(func(fd uintptr) {
		_, _, serr = syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(&n)))
	})
	if serr != 0 {
		t.Fatalf("ioctl: %v", serr)
	}
	return int(n)
}
