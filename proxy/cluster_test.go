package proxy

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// startClusterProxy runs a Server in front of several scripted backends,
// named b0, b1, ... in order. It does not probe capabilities, so that a
// dead backend in the set does not matter.
func startClusterProxy(t *testing.T, addrs []string, mod func(*Options)) *testProxy {
	t.Helper()
	var bs []Backend
	for i, a := range addrs {
		bs = append(bs, Backend{ID: "b" + strconv.Itoa(i), Addr: a, Weight: 1})
	}
	return startServer(t, bs, false, func(o *Options) {
		o.Dialer.Timeout = time.Second
		o.Dialer.ForwardID = false
		if mod != nil {
			mod(o)
		}
	})
}

// userOn returns a user name whose preferred backend is id.
func (p *testProxy) userOn(t *testing.T, id string) string {
	t.Helper()
	ring := p.srv.backends.Load().Ring()
	for i := 0; i < 1000; i++ {
		u := "user" + string(rune('a'+i%26)) + strings.Repeat("x", i/26)
		if b, ok := ring.Pick(u); ok && b.ID == id {
			return u
		}
	}
	t.Fatalf("no user maps to %s", id)
	return ""
}

// deadAddr is a 127.0.0.1 address that refuses connections.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func TestFailoverOnDialFailure(t *testing.T) {
	live := newFakeBackend(t)
	p := startClusterProxy(t, []string{deadAddr(t), live.addr()}, nil)
	user := p.userOn(t, "b0")

	for i := 0; i < 3; i++ {
		c := testkit.Dial(t, p.addr)
		c.MustLogin(user, "secret")
		c.Logout()
		p.waitCached(t, 1)
	}
	if n := live.logins.Load(); n != 1 {
		t.Errorf("logins on the fallback = %d, want 1 (then reuse)", n)
	}
	// Marked down once: later logins go straight to the fallback.
	if n := strings.Count(p.logs.String(), "backend marked down"); n != 1 {
		t.Errorf("backend marked down %d times, want 1", n)
	}
	if !strings.Contains(p.logs.String(), "failing over to the next backend") {
		t.Error("no failover logged")
	}
}

func TestFailoverOnUnavailable(t *testing.T) {
	sick, healthy := newFakeBackend(t), newFakeBackend(t)
	sick.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "AUTHENTICATE" {
			return false
		}
		c.write(tag + " NO [UNAVAILABLE] Temporary authentication failure.\r\n")
		return true
	}
	p := startClusterProxy(t, []string{sick.addr(), healthy.addr()}, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(p.userOn(t, "b0"), "secret")
	if healthy.logins.Load() != 1 {
		t.Fatalf("the login did not fail over")
	}
}

func TestWrongPasswordDoesNotFailOver(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	c := testkit.Dial(t, p.addr)
	res := c.Login(p.userOn(t, "b0"), "wrong")
	if !strings.Contains(res.Tagged, "[AUTHENTICATIONFAILED]") {
		t.Fatalf("got %q", res.Tagged)
	}
	if strings.Contains(p.logs.String(), "marked down") {
		t.Error("a wrong password marked the backend down")
	}
	b.mu.Lock()
	n := len(b.conns)
	b.mu.Unlock()
	if n != 0 {
		t.Errorf("the other backend got %d connections for a wrong password", n)
	}
}

// TestBackendLeavesSet: its cached connections are logged out at once;
// a session on it gets BYE after the drain time; its users' next logins go
// to their next backend; when it comes back they return to it.
func TestBackendLeavesSet(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, func(o *Options) { o.BackendDrain = 50 * time.Millisecond })
	set := []Backend{{ID: "b0", Addr: a.addr(), Weight: 1}, {ID: "b1", Addr: b.addr(), Weight: 1}}
	cachedUser := p.userOn(t, "b0")

	// One session stays logged in; a second one of the same user leaves
	// its connection cached.
	active := testkit.Dial(t, p.addr)
	active.MustLogin(cachedUser, "secret")
	c := testkit.Dial(t, p.addr)
	c.MustLogin(cachedUser, "secret")
	c.Logout()
	p.waitCached(t, 1)

	p.srv.SetBackends(set[1:])
	p.settle(t)
	if a.logouts.Load() != 1 {
		t.Errorf("cached connection not logged out when its backend left (logouts %d)", a.logouts.Load())
	}
	if got := active.ReadLine(); !strings.HasPrefix(got, "* BYE [UNAVAILABLE]") {
		t.Fatalf("active session got %q, want a BYE after the drain", got)
	}

	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(cachedUser, "secret"); res.Has("XPROXYREUSE") {
		t.Fatal("reused a connection of a backend that left")
	}
	c.Logout()
	if b.logins.Load() != 1 {
		t.Fatalf("logins on the next backend = %d, want 1", b.logins.Load())
	}

	p.srv.SetBackends(set)
	before := a.logins.Load()
	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(cachedUser, "secret"); res.Has("XPROXYREUSE") {
		t.Fatal("reused the fallback's connection after the preferred backend came back")
	}
	if a.logins.Load() != before+1 {
		t.Fatalf("user did not move back to its backend")
	}
}

// TestBackendLeavesDuringLogin: a login still under way on a backend when
// it leaves the set must not end up relaying to it (the drain would never
// see it); it goes to the user's next backend.
func TestBackendLeavesDuringLogin(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	inLogin, release := make(chan struct{}), make(chan struct{})
	a.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "AUTHENTICATE" {
			return false
		}
		close(inLogin)
		<-release
		a.logins.Add(1)
		c.write(tag + " OK [CAPABILITY " + a.postCaps + "] Logged in\r\n")
		return true
	}
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	user := p.userOn(t, "b0")
	done := make(chan testkit.Response, 1)
	c := testkit.Dial(t, p.addr)
	go func() { done <- c.Login(user, "secret") }()
	<-inLogin
	p.srv.SetBackends([]Backend{{ID: "b1", Addr: b.addr(), Weight: 1}})
	close(release)
	if res := <-done; !res.OK() {
		t.Fatalf("login: %s", res)
	}
	if b.logins.Load() != 1 {
		t.Fatalf("logins on the remaining backend = %d, want 1 (the login should move there)", b.logins.Load())
	}
	// The pool closes the removed backend's connection in the background.
	deadline := time.Now().Add(5 * time.Second)
	for p.srv.Pool().Stats().Open != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("open upstream conns = %d, want 1 (the one on the removed backend closed)", p.srv.Pool().Stats().Open)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
