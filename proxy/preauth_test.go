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

	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/session"
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
			if tc, ok := sess.Conn().(*net.TCPConn); ok {
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

func TestPreAuthNet(t *testing.T) {
	tests := []struct{ ip, want string }{
		{"192.0.2.1", "192.0.2.1"},
		{"::ffff:192.0.2.1", "192.0.2.1"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{"2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"},
		{"2001:db8:1:3::1", "2001:db8:1:3::/64"},
		{"pipe", "pipe"},
	}
	for _, tt := range tests {
		if got := preAuthNet(tt.ip); got != tt.want {
			t.Errorf("preAuthNet(%q) = %q, want %q", tt.ip, got, tt.want)
		}
	}
}

// TestPreAuthPerIPDefault: with no limits configured, one address may
// still not hold more than 100 connections that have not logged in; a
// login makes room.
func TestPreAuthPerIPDefault(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	var cs []*testkit.Client
	for range 100 {
		c := testkit.Dial(t, p.addr)
		if strings.HasPrefix(c.Greeting, "* BYE") {
			t.Fatalf("connection %d refused: %q", len(cs)+1, c.Greeting)
		}
		cs = append(cs, c)
	}
	c := testkit.Dial(t, p.addr)
	if c.Greeting != "* BYE [UNAVAILABLE] Too many connections, try again later" {
		t.Fatalf("connection 101 greeted %q, want the BYE", c.Greeting)
	}
	if n := p.srv.Stats().Rejected; n != 1 {
		t.Errorf("Rejected = %d, want 1", n)
	}
	cs[0].MustLogin("alice", "secret")
	c = testkit.Dial(t, p.addr)
	if strings.HasPrefix(c.Greeting, "* BYE") {
		t.Fatalf("no room after a login: %q", c.Greeting)
	}
}

// stuckConn is a client whose socket takes no more bytes: a write blocks
// until the test lets it go, whatever the deadline.
type stuckConn struct {
	net.Conn
	writing chan struct{}
	release chan struct{}
}

func (c *stuckConn) Write(p []byte) (int, error) {
	close(c.writing)
	<-c.release
	return len(p), nil
}

// TestRefusalWrittenOutsideLock: the BYE to a connection over a limit is
// written without the server lock, which every accept, login and session
// end needs.
func TestRefusalWrittenOutsideLock(t *testing.T) {
	s := New(Options{MaxClients: 1})
	a, b := net.Pipe()
	defer b.Close()
	first := s.newSession(a, &ListenerOptions{TLS: TLSNone})
	if first == nil {
		t.Fatal("first connection refused")
	}
	defer s.endSession(first)
	c1, c2 := net.Pipe()
	defer c2.Close()
	stuck := &stuckConn{Conn: c1, writing: make(chan struct{}), release: make(chan struct{})}
	refused := make(chan *session.Session)
	go func() { refused <- s.newSession(stuck, &ListenerOptions{TLS: TLSNone}) }()
	<-stuck.writing
	stats := make(chan Stats)
	go func() { stats <- s.Stats() }()
	timer := time.NewTimer(5 * time.Second)
	defer timer.Stop()
	select {
	case st := <-stats:
		if st.Rejected != 1 {
			t.Errorf("Rejected = %d, want 1", st.Rejected)
		}
		close(stuck.release)
	case <-timer.C:
		t.Error("the server lock is held while the BYE is written")
		close(stuck.release)
		<-stats
	}
	if sess := <-refused; sess != nil {
		t.Error("second connection accepted over MaxClients 1")
	}
}
