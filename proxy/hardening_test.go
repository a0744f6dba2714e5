package proxy

import (
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

// silentBackend accepts connections and never says anything: a backend
// whose IMAP process hangs.
func silentBackend(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return ln.Addr().String()
}

// TestHungBackends: a backend that never greets, or greets and then never
// answers the login, costs a login at most timeouts.backend_login, marks
// it down, and the login goes to the user's next backend.
func TestHungBackends(t *testing.T) {
	hangOnLogin := newFakeBackend(t)
	hangOnLogin.hook = func(c *fakeConn, tag, cmd, line string) bool {
		return cmd == "AUTHENTICATE" // swallow it, answer nothing
	}
	tests := []struct {
		name string
		addr string
	}{
		{"never greets", silentBackend(t)},
		{"hangs on login", hangOnLogin.addr()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			good := newFakeBackend(t)
			p := startClusterProxy(t, []string{tt.addr, good.addr()}, func(o *Options) {
				o.Dialer.LoginTimeout = 300 * time.Millisecond
			})
			c := testkit.Dial(t, p.addr)
			c.MustLogin(p.userOn(t, "b0"), "secret")
			if good.logins.Load() != 1 {
				t.Fatal("login did not fail over to the next backend")
			}
			if p.srv.Stats().BackendsDown != 1 {
				t.Errorf("BackendsDown = %d, want 1", p.srv.Stats().BackendsDown)
			}
			if st := p.srv.Pool().Stats(); st.Open != 1 {
				t.Errorf("open upstream conns = %d, want 1 (the hung one closed)", st.Open)
			}
		})
	}
}

// TestByeOnCachedConn: a backend that says BYE to a cached connection
// (shutdown, autologout) must not hand that BYE to the next session.
func TestByeOnCachedConn(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Logout()
	p.waitCached(t, 1)
	cached := b.conn(1)
	cached.write("* BYE Server shutting down\r\n")
	cached.conn.Close()

	c = testkit.Dial(t, p.addr)
	res := c.MustLogin("alice", "secret")
	if res.Has("BYE") || res.Has("XPROXYREUSE") {
		t.Fatalf("the dead cached connection leaked into the login:\n%s", res)
	}
	if r := c.Cmd("NOOP"); !r.OK() {
		t.Fatalf("NOOP after login: %s", r)
	}
}

// TestSlowloris: a client that sends a line one byte at a time and never
// finishes is cut off at the pre-auth timeout, counted from connect, and
// gives its slot back.
func TestSlowloris(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, func(o *Options) {
		o.PreAuthTimeout = 300 * time.Millisecond
		o.MaxPreAuth = 1
	})
	c := testkit.Dial(t, p.addr)
	c.Send("a LOG")
	// Keep trickling until the server hangs up; each write is answered
	// by nothing, so the loop is bounded by the deadline, not by us.
	var got string
	for i := 0; i < 1000; i++ {
		if _, err := c.NetConn.Write([]byte("I")); err != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		l, err := c.R.ReadString('\n')
		got += l
		if err == nil || !isTimeoutErr(err) {
			break
		}
	}
	if !strings.HasPrefix(got, "* BYE Autologout") {
		t.Fatalf("slow client got %q, want the autologout BYE", got)
	}
	p.waitSessions(t, 0)
	// Its pre-auth slot is free again.
	c2 := testkit.Dial(t, p.addr)
	if strings.HasPrefix(c2.Greeting, "* BYE") {
		t.Fatalf("slot not given back: %q", c2.Greeting)
	}
}

func isTimeoutErr(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestBurstAfterQuietSpell: a session quiet for longer than the write
// timeout, then a response burst bigger than the client buffer (which the
// buffer writes out by itself, before any flush): every write gets a fresh
// deadline, so the client gets it all. Small literals and long lines both.
func TestBurstAfterQuietSpell(t *testing.T) {
	const writeTimeout = 100 * time.Millisecond
	b := newFakeBackend(t)
	var burst strings.Builder
	// Long lines first: the client buffer fills with no flush between.
	for i := 1; i <= 40; i++ {
		fmt.Fprintf(&burst, "* %d FETCH (FLAGS (%s))\r\n", i, strings.Repeat("$Label ", 200))
	}
	for i := 1; i <= 40; i++ {
		fmt.Fprintf(&burst, "* %d FETCH (BODY[HEADER] {2000}\r\n%s)\r\n", i, strings.Repeat("h", 2000))
	}
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "FETCH" {
			return false
		}
		// The quiet spell is the scenario, not synchronisation: the
		// deadline of the last write must lie in the past.
		time.Sleep(3 * writeTimeout)
		c.write(burst.String() + tag + " OK done\r\n")
		return true
	}
	p := startFakeProxy(t, b, func(o *Options) { o.WriteTimeout = writeTimeout })
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	res := c.Cmd("FETCH 1:40 (BODY.PEEK[HEADER] FLAGS)")
	if !res.OK() || len(res.Untagged) != 80 {
		t.Fatalf("FETCH after a quiet spell: %d untagged, tagged %q; want 80 and OK", len(res.Untagged), res.Tagged)
	}
	if got := literalOf(t, res.Untagged[79], "BODY[HEADER]"); len(got) != 2000 {
		t.Errorf("the last literal has %d bytes, want 2000", len(got))
	}
}

// TestClientStopsReading: a client that stops reading a large FETCH is
// disconnected at the write timeout; the proxy does not buffer the rest,
// and the backend connection is dropped, not cached.
func TestClientStopsReading(t *testing.T) {
	b := newFakeBackend(t)
	const size = 64 << 20
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "FETCH" {
			return false
		}
		go func() {
			c.write("* 1 FETCH (BODY[] {67108864}\r\n")
			chunk := strings.Repeat("x", 1<<20)
			for i := 0; i < size>>20; i++ {
				c.mu.Lock()
				_, err := c.conn.Write([]byte(chunk))
				c.mu.Unlock()
				if err != nil {
					return
				}
			}
			c.write(")\r\n" + tag + " OK done\r\n")
		}()
		return true
	}
	p := startFakeProxy(t, b, func(o *Options) { o.WriteTimeout = 200 * time.Millisecond })
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	// A small receive window, and then nothing is read.
	c.NetConn.(*net.TCPConn).SetReadBuffer(4096)
	c.Send("f FETCH 1 BODY[]\r\n")
	p.waitSessions(t, 0)
	if st := p.srv.Pool().Stats(); st.Open != 0 || st.Cached != 0 {
		t.Errorf("upstream conns open %d cached %d, want none", st.Open, st.Cached)
	}
}

// TestClientTLSVersions: the implicit TLS listener speaks TLS 1.2 and 1.3
// only; an old client is refused in the handshake.
func TestClientTLSVersions(t *testing.T) {
	b := newFakeBackend(t)
	kit := testkit.NewCertT(t, "127.0.0.1")
	cert, roots := kit.KeyPair, kit.Roots
	_, addrs := startProxyListeners(t, []Backend{{ID: "fake", Addr: b.addr(), Weight: 1}}, func(o *Options) {
		o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}, TLSImplicit)
	tests := []struct {
		name    string
		max     uint16
		wantErr bool
	}{
		{"TLS 1.1 refused", tls.VersionTLS11, true},
		{"TLS 1.2", tls.VersionTLS12, false},
		{"TLS 1.3", tls.VersionTLS13, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addrs[TLSImplicit],
				&tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS10, MaxVersion: tt.max})
			if tt.wantErr {
				if err == nil {
					c.Close()
					t.Fatal("handshake succeeded, want it refused")
				}
				return
			}
			if err != nil {
				t.Fatalf("handshake: %v", err)
			}
			defer c.Close()
			if v := c.ConnectionState().Version; v != tt.max {
				t.Errorf("negotiated %x, want %x", v, tt.max)
			}
		})
	}
}

// TestPasswordChangeTakesEffect: after a password change on the backend,
// the old password keeps working through a cached connection at most until
// reuse_max_age, then the backend's own check refuses it.
func TestPasswordChangeTakesEffect(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) {
		o.Pool = pool.New(pool.Options{MaxAge: 10 * time.Minute})
	})
	user, old := dovecottest.UserName(1), dc.PasswordOf(dovecottest.UserName(1))
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, old)
	c.Logout()
	p.waitCached(t, 1)

	if err := dc.SetPassword(user, "a-new-secret"); err != nil {
		t.Fatal(err)
	}
	// Within reuse_max_age the cached connection still serves the old
	// password: that is the documented window.
	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, old); !res.Has("XPROXYREUSE") {
		t.Fatalf("want the cached connection within reuse_max_age:\n%s", res)
	}
	c.Logout()
	p.waitCached(t, 1)

	// Past reuse_max_age the sweeper closes it, and the old password
	// meets the backend.
	p.srv.Pool().Sweep(time.Now().Add(11 * time.Minute))
	c = testkit.Dial(t, p.addr)
	if res := c.Login(user, old); !strings.Contains(res.Tagged, "NO [AUTHENTICATIONFAILED]") {
		t.Fatalf("old password after reuse_max_age: %q, want the backend's refusal", res.Tagged)
	}
	c.MustLogin(user, "a-new-secret")
}
