package faultnet

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	waitTimeout = 5 * time.Second
	// silence is how long a read must get nothing to count as a hang.
	silence = 200 * time.Millisecond
)

// target is a TCP server for the tests: each accepted connection goes to
// conns, or, with echo, is served by echoing it and half-closing at EOF.
type target struct {
	ln    *net.TCPListener
	conns chan *net.TCPConn
	n     int // accepted, guarded by mu
	mu    sync.Mutex
}

func newTarget(t *testing.T, echo bool) *target {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tg := &target{ln: ln, conns: make(chan *net.TCPConn, 16)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var all []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			mu.Lock()
			all = append(all, c)
			mu.Unlock()
			tg.mu.Lock()
			tg.n++
			tg.mu.Unlock()
			if !echo {
				tg.conns <- c
				continue
			}
			wg.Go(func() {
				_, _ = io.Copy(c, c)
				_ = c.CloseWrite()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range all {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return tg
}

func (tg *target) addr() string { return tg.ln.Addr().String() }

func (tg *target) accepted() int {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	return tg.n
}

// accept returns the next connection the target accepted.
func (tg *target) accept(t *testing.T) *net.TCPConn {
	t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case c := <-tg.conns:
		return c
	case <-timer.C:
		t.Fatal("target accepted no connection")
		return nil
	}
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func write(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if err := c.SetWriteDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, s); err != nil {
		t.Fatalf("write %q: %v", s, err)
	}
}

// read reads exactly n bytes.
func read(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if k, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: got %q, %v", n, b[:k], err)
	}
	return string(b)
}

// expectSilence fails t if c delivers anything (or ends) within silence.
func expectSilence(t *testing.T, c net.Conn) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(silence)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 64)
	n, err := c.Read(b)
	var ne net.Error
	if n > 0 || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read during a hang = %q, %v; want nothing and a timeout", b[:n], err)
	}
}

// expectReset fails t unless the next read on c fails with ECONNRESET.
func expectReset(t *testing.T, c net.Conn, who string) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(make([]byte, 64))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s read = %d bytes, %v; want ECONNRESET", who, n, err)
	}
}

// expectRefused fails t unless a connection to addr is reset: on loopback
// the reset may arrive before connect returns, or at the first read.
func expectRefused(t *testing.T, addr, who string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitTimeout)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("%s: dial: %v, want ECONNRESET", who, err)
		}
		return
	}
	defer c.Close()
	expectReset(t, c, who)
}

// expectClosed fails t unless c ends (EOF or reset) with nothing to read.
func expectClosed(t *testing.T, c net.Conn, who string) {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	n, err := c.Read(make([]byte, 64))
	if n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("%s read = %d bytes, %v; want EOF or ECONNRESET", who, n, err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func waitClosed(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	select {
	case <-ch:
	case <-timer.C:
		t.Fatalf("timed out waiting for %s", what)
	}
}

// proxyGoroutines lists the stacks of the goroutines of this package's
// Proxy (its accept loop, connection handlers and links).
func proxyGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "faultnet.(*Proxy)") || strings.Contains(g, "faultnet.(*link)") {
			out = append(out, g)
		}
	}
	return out
}

// roundTrip checks that c reaches the echo target through the proxy.
func roundTrip(t *testing.T, c net.Conn, s string) {
	t.Helper()
	write(t, c, s)
	if got := read(t, c, len(s)); got != s {
		t.Fatalf("echo = %q, want %q", got, s)
	}
}

func TestForward(t *testing.T) {
	tg := newTarget(t, true)
	p := ListenT(t, tg.addr())
	c := dial(t, p.Addr())

	data := make([]byte, 1<<20)
	rand.Read(data)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		errc <- err
	}()
	got := read(t, c, len(data))
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal([]byte(got), data) {
		t.Fatal("1 MiB echoed through the proxy differs from what was sent")
	}
	if up, down := p.Bytes(Up), p.Bytes(Down); up != int64(len(data)) || down != int64(len(data)) {
		t.Errorf("Bytes(Up), Bytes(Down) = %d, %d; want %d each", up, down, len(data))
	}
	if n := p.Conns(); n != 1 {
		t.Errorf("Conns() = %d with one open connection, want 1", n)
	}

	// Half-close: the target sees EOF, echoes it back as its own
	// half-close, and the pair then ends without being told.
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, c, "client after its CloseWrite")
	waitFor(t, "Conns() == 0", func() bool { return p.Conns() == 0 })
	waitFor(t, "only the accept loop left", func() bool { return len(proxyGoroutines()) == 1 })
	if n := p.Accepted(); n != 1 {
		t.Errorf("Accepted() = %d, want 1", n)
	}
}

func TestPause(t *testing.T) {
	for _, d := range []Dir{Up, Down} {
		t.Run(d.String(), func(t *testing.T) {
			tg := newTarget(t, true)
			p := ListenT(t, tg.addr())
			c := dial(t, p.Addr())
			roundTrip(t, c, "warm")
			// Bytes counts after each write returns, which may be after
			// the echo came back.
			waitFor(t, "4 bytes each way", func() bool { return p.Bytes(Up) == 4 && p.Bytes(Down) == 4 })

			p.Pause(d)
			const up0 = 4
			for _, s := range []string{"one ", "two ", "three"} {
				write(t, c, s)
			}
			if d == Down {
				waitFor(t, "the request to reach the target", func() bool { return p.Bytes(Up) == up0+13 })
			}
			expectSilence(t, c)
			if d == Up {
				if n := p.Bytes(Up); n != up0 {
					t.Errorf("Bytes(Up) = %d while paused, want %d", n, up0)
				}
			}
			// New connections are held back too.
			c2 := dial(t, p.Addr())
			write(t, c2, "new")
			expectSilence(t, c2)

			p.Resume(d)
			if got := read(t, c, 13); got != "one two three" {
				t.Errorf("after Resume: %q, want %q", got, "one two three")
			}
			if got := read(t, c2, 3); got != "new" {
				t.Errorf("new connection after Resume: %q, want %q", got, "new")
			}
		})
	}
}

// A client that leaves while its answer is held back is no longer counted
// by Conns: tests use it to see that the code under test let go.
func TestPauseClientLeaves(t *testing.T) {
	tg := newTarget(t, true)
	p := ListenT(t, tg.addr())
	p.Pause(Down)
	c := dial(t, p.Addr())
	write(t, c, "hello")
	waitFor(t, "the request to reach the target", func() bool { return p.Bytes(Up) == 5 })
	if n := p.Conns(); n != 1 {
		t.Fatalf("Conns() = %d, want 1", n)
	}
	c.Close()
	waitFor(t, "Conns() == 0 after the client left", func() bool { return p.Conns() == 0 })
}

func TestDrip(t *testing.T) {
	tg := newTarget(t, true)
	p := ListenT(t, tg.addr())
	c := dial(t, p.Addr())

	const n, every, size = 100, 20 * time.Millisecond, 1000
	p.Drip(Down, n, every)
	data := strings.Repeat("0123456789", size/10)
	start := time.Now()
	write(t, c, data)
	if got := read(t, c, size); got != data {
		t.Fatalf("dripped data differs: %q", got)
	}
	// Ten pieces of 100 bytes cannot arrive faster than nine intervals.
	if el, min := time.Since(start), (size/n-1)*every; el < min {
		t.Errorf("%d bytes at %d per %v took %v, want at least %v", size, n, every, el, min)
	}

	// Resume ends a drip at once, even in the middle of an interval.
	p.Drip(Down, 1, time.Hour)
	write(t, c, "abcdef")
	if got := read(t, c, 1); got != "a" {
		t.Fatalf("first dripped byte = %q, want a", got)
	}
	expectSilence(t, c)
	// Faults of the other direction leave the drip alone.
	p.Pause(Up)
	p.Resume(Up)
	expectSilence(t, c)
	p.Resume(Down)
	if got := read(t, c, 5); got != "bcdef" {
		t.Errorf("after Resume = %q, want bcdef", got)
	}
}

func TestPauseOn(t *testing.T) {
	for _, d := range []Dir{Up, Down} {
		t.Run(d.String(), func(t *testing.T) {
			tg := newTarget(t, false)
			p := ListenT(t, tg.addr())
			c := dial(t, p.Addr())
			srv := tg.accept(t)
			from, to := net.Conn(c), net.Conn(srv)
			if d == Down {
				from, to = srv, c
			}
			roundTrip := func(s string) {
				t.Helper()
				write(t, from, s)
				if got := read(t, to, len(s)); got != s {
					t.Fatalf("%s: got %q, want %q", d, got, s)
				}
			}
			roundTrip("before MAR")

			// The pattern straddles two writes and a byte forwarded
			// before PauseOn.
			hit := p.PauseOn(d, []byte("MARK"))
			select {
			case <-hit:
				t.Fatal("PauseOn hit before the pattern was sent")
			default:
			}
			write(t, from, "K1 and MA")
			waitClosed(t, hit, "the first MARK")
			if got := read(t, to, 1); got != "K" {
				t.Fatalf("%s after PauseOn: got %q, want K", d, got)
			}
			expectSilence(t, to)
			if got, want := p.Bytes(d), int64(len("before MARK")); got != want {
				t.Errorf("Bytes(%s) = %d, want %d", d, got, want)
			}
			write(t, from, "RK2 after")

			// The second occurrence does not pause: PauseOn fires once.
			p.Resume(d)
			if got, want := read(t, to, 17), "1 and MARK2 after"; got != want {
				t.Fatalf("after Resume: got %q, want %q", got, want)
			}
			roundTrip("free")
		})
	}
}

// PauseOn across a chunk that holds the pattern in the middle: exactly the
// bytes up to the pattern are delivered, the rest waits.
func TestPauseOnMidChunk(t *testing.T) {
	tg := newTarget(t, false)
	p := ListenT(t, tg.addr())
	c := dial(t, p.Addr())
	srv := tg.accept(t)
	hit := p.PauseOn(Down, []byte("{5}\r\n"))
	const line, lit = "* 1 FETCH (BODY[] {5}\r\n", "hello)\r\n"
	write(t, srv, line+lit)
	waitClosed(t, hit, "the literal marker")
	if got := read(t, c, len(line)); got != line {
		t.Fatalf("got %q, want %q", got, line)
	}
	expectSilence(t, c)
	p.Resume(Down)
	if got := read(t, c, len(lit)); got != lit {
		t.Fatalf("after Resume: %q, want %q", got, lit)
	}
}

func TestReset(t *testing.T) {
	tg := newTarget(t, false)
	p := ListenT(t, tg.addr())
	c := dial(t, p.Addr())
	srv := tg.accept(t)
	write(t, c, "x") // the pair is connected both ways
	read(t, srv, 1)

	p.Reset()
	expectReset(t, c, "client")
	expectReset(t, srv, "target")
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns() after Reset = %d, want 0", n)
	}

	// New connections are served again.
	c2 := dial(t, p.Addr())
	srv2 := tg.accept(t)
	write(t, c2, "y")
	if got := read(t, srv2, 1); got != "y" {
		t.Errorf("after Reset: %q, want y", got)
	}
}

// A reset by one side reaches the other as a reset, not as a clean close.
func TestResetPassedOn(t *testing.T) {
	for _, from := range []string{"client", "target"} {
		t.Run(from, func(t *testing.T) {
			tg := newTarget(t, false)
			p := ListenT(t, tg.addr())
			c := dial(t, p.Addr())
			srv := tg.accept(t)
			write(t, c, "x")
			read(t, srv, 1)
			resetter, other := c, srv
			if from == "target" {
				resetter, other = srv, c
			}
			_ = resetter.SetLinger(0)
			resetter.Close()
			expectReset(t, other, "the other side")
			waitFor(t, "Conns() == 0", func() bool { return p.Conns() == 0 })
		})
	}
}

func TestBlackHole(t *testing.T) {
	tg := newTarget(t, true)
	p := ListenT(t, tg.addr())
	p.BlackHole(true)
	c := dial(t, p.Addr())
	write(t, c, "a LOGIN")
	expectSilence(t, c)
	if n := tg.accepted(); n != 0 {
		t.Errorf("target accepted %d connections through a black hole, want 0", n)
	}
	if n, a := p.Conns(), p.Accepted(); n != 1 || a != 1 {
		t.Errorf("Conns(), Accepted() = %d, %d; want 1, 1", n, a)
	}

	// Turning it off serves new connections; the held one stays held.
	p.BlackHole(false)
	c2 := dial(t, p.Addr())
	roundTrip(t, c2, "hi")
	expectSilence(t, c)

	c.Close()
	waitFor(t, "Conns() == 1 after the held client left", func() bool { return p.Conns() == 1 })
	if n := tg.accepted(); n != 1 {
		t.Errorf("target accepted %d connections, want 1", n)
	}
}

func TestRefuse(t *testing.T) {
	tg := newTarget(t, true)
	p := ListenT(t, tg.addr())
	p.Refuse(true)
	expectRefused(t, p.Addr(), "refused client")
	if n := tg.accepted(); n != 0 {
		t.Errorf("target accepted %d connections while refusing, want 0", n)
	}
	p.Refuse(false)
	roundTrip(t, dial(t, p.Addr()), "back")
}

func TestTargetDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p := ListenT(t, addr)
	expectRefused(t, p.Addr(), "client of a dead target")
	waitFor(t, "Conns() == 0", func() bool { return p.Conns() == 0 })
}

func TestCloseLeavesNothing(t *testing.T) {
	tg := newTarget(t, true)
	p, err := Listen(tg.addr())
	if err != nil {
		t.Fatal(err)
	}
	// One connection in each state: flowing, dripping, held back with
	// bytes queued, black-holed, and a refused one already gone.
	flowing := dial(t, p.Addr())
	roundTrip(t, flowing, "a")
	p.Drip(Down, 1, time.Hour)
	dripping := dial(t, p.Addr())
	write(t, dripping, "slow")
	read(t, dripping, 1)
	p.Pause(Up)
	paused := dial(t, p.Addr())
	write(t, paused, "queued")
	waitFor(t, "3 connections accepted", func() bool { return p.Accepted() == 3 })
	p.Refuse(true)
	expectRefused(t, p.Addr(), "refused")
	p.Refuse(false)
	p.BlackHole(true)
	held := dial(t, p.Addr())
	waitFor(t, "4 connections", func() bool { return p.Conns() == 4 })

	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for name, c := range map[string]net.Conn{"flowing": flowing, "dripping": dripping, "paused": paused, "held": held} {
		expectClosed(t, c, name)
	}
	// Close waited for them; a goroutine may still be returning.
	deadline := time.Now().Add(waitTimeout)
	for g := proxyGoroutines(); len(g) != 0; g = proxyGoroutines() {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left after Close:\n%s", len(g), strings.Join(g, "\n\n"))
		}
		time.Sleep(time.Millisecond)
	}
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns() after Close = %d, want 0", n)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if c, err := net.DialTimeout("tcp", p.Addr(), waitTimeout); err == nil {
		c.Close()
		t.Error("dial after Close succeeded")
	}
}
