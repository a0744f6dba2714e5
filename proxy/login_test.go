package proxy

import (
	"bufio"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
	"unicode/utf8"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/logx"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestCredentialsCheckedFirst: credentials a backend must not see (too
// long, or with NUL, CR or LF where they would change the meaning of a
// LOGIN line or a SASL PLAIN message) get a clear tagged answer from the
// proxy, and no backend is asked.
func TestCredentialsCheckedFirst(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, func(o *Options) { o.MaxLoginFailures = -1 })
	long := strings.Repeat("x", 20000)
	tests := []struct {
		name  string
		login func(c *testkit.Client) testkit.Response
		want  string
	}{
		{"20,000-byte user name", func(c *testkit.Client) testkit.Response { return c.Login(long, "secret") },
			"NO [LIMIT] User name too long (at most 256 bytes)"},
		{"257-byte user name", func(c *testkit.Client) testkit.Response { return c.Login(long[:257], "secret") },
			"NO [LIMIT] User name too long (at most 256 bytes)"},
		{"long password", func(c *testkit.Client) testkit.Response { return authLogin(c, "alice", strings.Repeat("p", 4097)) },
			"NO [LIMIT] Password too long (at most 4096 bytes)"},
		{"long authorization identity", func(c *testkit.Client) testkit.Response { return authPlain(c, long[:300], "alice", "secret", true) },
			"NO [LIMIT] User name too long (at most 256 bytes)"},
		{"NUL in user name", func(c *testkit.Client) testkit.Response { return c.LoginLiteral("al\x00ice", "secret", true) },
			"NO [AUTHENTICATIONFAILED] Invalid characters in user name"},
		{"LF in user name", func(c *testkit.Client) testkit.Response { return c.LoginLiteral("alice\nbob", "secret", false) },
			"NO [AUTHENTICATIONFAILED] Invalid characters in user name"},
		{"CR in user name", func(c *testkit.Client) testkit.Response { return authPlain(c, "", "alice\r", "secret", false) },
			"NO [AUTHENTICATIONFAILED] Invalid characters in user name"},
		{"CR in authorization identity", func(c *testkit.Client) testkit.Response { return authPlain(c, "bob\r", "alice", "secret", true) },
			"NO [AUTHENTICATIONFAILED] Invalid characters in user name"},
		{"NUL in password", func(c *testkit.Client) testkit.Response { return authLogin(c, "alice", "sec\x00ret") },
			"NO [AUTHENTICATIONFAILED] Invalid characters in password"},
		{"NUL in password literal", func(c *testkit.Client) testkit.Response { return c.LoginLiteral("alice", "sec\x00ret", true) },
			"NO [AUTHENTICATIONFAILED] Invalid characters in password"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			res := tt.login(c)
			if want := "t1 " + tt.want; res.Tagged != want {
				t.Fatalf("got %q, want %q", res.Tagged, want)
			}
			b.mu.Lock()
			n := len(b.conns)
			b.mu.Unlock()
			if n != 1 { // the capability probe's
				t.Fatalf("the backend got %d connections, want only the probe's", n)
			}
		})
	}
	if st := p.srv.Stats(); st.BackendsDown != 0 {
		t.Errorf("BackendsDown = %d, want 0", st.BackendsDown)
	}
	for _, l := range strings.Split(p.logs.String(), "\n") {
		if len(l) > 512 || strings.Contains(l, long[:65]) {
			t.Errorf("log line of %d bytes with a long client string: %.200q", len(l), l)
		}
	}
}

// TestBackendEndsLoginNotDown: a backend that greets and then drops the
// connection in answer to a login is not marked down, and the login does
// not go to another backend: the trouble is this login, not the server.
func TestBackendEndsLoginNotDown(t *testing.T) {
	dropper := newFakeBackend(t)
	var drop atomic.Bool
	drop.Store(true)
	dropper.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd == "AUTHENTICATE" && drop.Load() {
			c.conn.Close()
			return true
		}
		return false
	}
	good := newFakeBackend(t)
	p := startClusterProxy(t, []string{dropper.addr(), good.addr()}, nil)
	c := testkit.Dial(t, p.addr)
	res := c.Login(p.userOn(t, "b0"), "secret")
	if want := "t1 NO [UNAVAILABLE] IMAP server ended the connection during login"; res.Tagged != want {
		t.Fatalf("got %q, want %q", res.Tagged, want)
	}
	if n := p.srv.Stats().BackendsDown; n != 0 {
		t.Errorf("BackendsDown = %d, want 0", n)
	}
	good.mu.Lock()
	n := len(good.conns)
	good.mu.Unlock()
	if n != 0 {
		t.Errorf("the other backend got %d connections", n)
	}
	// Its other users log in as before.
	drop.Store(false)
	c2 := testkit.Dial(t, p.addr)
	c2.MustLogin(p.userOn(t, "b0"), "secret")
}

// TestLoginFailuresEndSession: the third failed login on a connection is
// answered, then followed by BYE and the close.
func TestLoginFailuresEndSession(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	for i := range 2 {
		if res := c.Login("alice", "wrong"); !strings.Contains(res.Tagged, "NO [AUTHENTICATIONFAILED]") {
			t.Fatalf("failure %d: %q", i+1, res.Tagged)
		}
	}
	c.Send("t3 LOGIN alice wrong\r\n")
	lines := c.ReadToEOF()
	want := []string{"t3 NO [AUTHENTICATIONFAILED] Authentication failed.", "* BYE Too many failed logins"}
	if strings.Join(lines, "|") != strings.Join(want, "|") {
		t.Fatalf("third failure: got %q, want %q", lines, want)
	}
	p.waitSessions(t, 0)
}

// TestLoginFailureDelay: each failed login is answered after
// LoginFailureDelay, and the session ends after MaxLoginFailures; the
// default is a one-second delay and three failures.
func TestLoginFailureDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := New(Options{})
		srvSide, cliSide := net.Pipe()
		defer cliSide.Close()
		sess := s.newSession(srvSide, &ListenerOptions{TLS: TLSNone})
		done := make(chan struct{})
		go func() { sess.Serve(); close(done) }()
		r := bufio.NewReader(cliSide)
		if g, _ := r.ReadString('\n'); !strings.HasPrefix(g, "* OK") {
			t.Fatalf("greeting %q", g)
		}
		long := strings.Repeat("u", 300)
		for i := range 3 {
			start := time.Now()
			tag := string(rune('a' + i))
			if _, err := cliSide.Write([]byte(tag + " LOGIN " + long + " secret\r\n")); err != nil {
				t.Fatal(err)
			}
			l, err := r.ReadString('\n')
			if err != nil || !strings.HasPrefix(l, tag+" NO [LIMIT]") {
				t.Fatalf("failure %d: %q, %v", i+1, l, err)
			}
			if d := time.Since(start); d != time.Second {
				t.Errorf("failure %d answered after %v, want 1s", i+1, d)
			}
		}
		if l, _ := r.ReadString('\n'); l != "* BYE Too many failed logins\r\n" {
			t.Errorf("after the third failure: %q, want the BYE", l)
		}
		<-done
		if st := s.Stats(); st.Sessions != 0 {
			t.Errorf("sessions = %d, want 0", st.Sessions)
		}
	})
}

func TestClip(t *testing.T) {
	tests := []struct{ in, want string }{
		{"alice", "alice"},
		{"al\x00ice\r\nINFO forged", "al?ice??INFO forged"},
		{strings.Repeat("x", 64), strings.Repeat("x", 64)},
		{strings.Repeat("x", 20000), strings.Repeat("x", 64) + "...(20000 bytes)"},
		// Cut at a character boundary: é is two bytes.
		{strings.Repeat("x", 63) + "é" + "y", strings.Repeat("x", 63) + "...(66 bytes)"},
	}
	for _, tt := range tests {
		got := logx.Clip(tt.in)
		if got != tt.want {
			t.Errorf("clip(%.80q) = %q, want %q", tt.in, got, tt.want)
		}
		if !utf8.ValidString(got) {
			t.Errorf("clip(%.80q) = %q: not UTF-8", tt.in, got)
		}
	}
}

// TestHugeUserNameAgainstDovecot: a 20,000-byte user name, which makes
// Dovecot drop the connection, is answered by the proxy itself; no
// backend is marked down, and the proxy logs one bounded line for it.
func TestHugeUserNameAgainstDovecot(t *testing.T) {
	dc1 := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 1})
	dc2 := dovecottest.StartT(t, dovecottest.Options{Name: "backend-2", Users: 1})
	p := startProxy(t, []*dovecottest.Server{dc1, dc2}, nil)
	before := len(p.logs.String())
	long := strings.Repeat("x", 20000)
	for _, login := range []func(c *testkit.Client) testkit.Response{
		func(c *testkit.Client) testkit.Response { return c.Login(long, "secret") },
		func(c *testkit.Client) testkit.Response { return authPlain(c, "", long, "secret", false) },
	} {
		c := testkit.Dial(t, p.addr)
		res := login(c)
		if want := "t1 NO [LIMIT] User name too long (at most 256 bytes)"; res.Tagged != want {
			t.Fatalf("got %q, want %q", res.Tagged, want)
		}
		c.Logout()
	}
	if n := p.srv.Stats().BackendsDown; n != 0 {
		t.Errorf("BackendsDown = %d, want 0", n)
	}
	var mentions []string
	for _, l := range strings.Split(p.logs.String()[before:], "\n") {
		if strings.Contains(l, "xxxxxxxx") {
			mentions = append(mentions, l)
		}
		if len(l) > 512 {
			t.Errorf("log line of %d bytes: %.200q", len(l), l)
		}
	}
	// The second rejection is counted in the next summary line.
	if len(mentions) != 1 {
		t.Errorf("%d log lines name the user, want 1:\n%s", len(mentions), strings.Join(mentions, "\n"))
	}
	// Real users are served by both backends as before.
	u := dovecottest.UserName(1)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(u, dc1.PasswordOf(u))
}

// dialFrom connects to addr from the loopback address local.
func dialFrom(t *testing.T, addr, local string) *testkit.Client {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, local, err)
	}
	tc := testkit.NewClient(t, c)
	tc.Greeting = tc.ReadLine()
	return tc
}

// TestCacheByClientAddress: on a listener with CacheByClientAddress a
// connection cached by a login from one address is not handed to a login
// from another, which goes to the backend (and its address checks); the
// cached connections are still the user's for CloseUser. Other listeners
// hand it to any address.
func TestCacheByClientAddress(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.srv.ServeListener(ln, ListenerOptions{TLS: TLSNone, CacheByClientAddress: true})
	byAddr := ln.Addr().String()

	cycle := func(addr, from string) bool {
		t.Helper()
		c := dialFrom(t, addr, from)
		res := c.MustLogin("alice", "secret")
		c.Logout()
		p.waitIdle(t)
		return res.Has("[XPROXYREUSE]")
	}
	cycle(p.addr, "127.0.0.1")
	if !cycle(p.addr, "127.0.0.2") {
		t.Fatal("plain listener: a login from another address did not reuse the cached connection")
	}
	logins := b.logins.Load()
	if cycle(byAddr, "127.0.0.1") {
		t.Fatal("by-address listener: reused a connection cached from a plain listener's login")
	}
	if cycle(byAddr, "127.0.0.3") {
		t.Fatal("by-address listener: a login from another address reused the cached connection")
	}
	if !cycle(byAddr, "127.0.0.3") {
		t.Fatal("by-address listener: a login from the same address did not reuse its cached connection")
	}
	if got := b.logins.Load() - logins; got != 2 {
		t.Errorf("backend logins = %d, want 2 (one per address)", got)
	}
	if n := p.srv.Pool().Table("fake").CloseUser("alice"); n < 2 {
		t.Errorf("CloseUser(alice) closed %d connections, want the ones of both addresses", n)
	}
}
