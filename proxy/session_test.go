package proxy

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// startFakeProxy runs a Server in front of a scripted backend.
func startFakeProxy(t *testing.T, b *fakeBackend, mod func(*Options)) *testProxy {
	t.Helper()
	return startServer(t, []Backend{{ID: "fake", Addr: b.addr(), Weight: 1}}, true, mod)
}

func TestGreetingCapabilities(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	g := c.Greeting
	for _, want := range []string{"[CAPABILITY IMAP4rev1 ", " IDLE", " ENABLE", " AUTH=PLAIN", " AUTH=LOGIN", " SASL-IR", " ID", " LITERAL+"} {
		if !strings.Contains(g, want) {
			t.Errorf("greeting %q lacks %q", g, want)
		}
	}
	for _, bad := range []string{"STARTTLS", "LOGIN-REFERRALS", "LOGINDISABLED"} {
		if strings.Contains(g, bad) {
			t.Errorf("greeting %q offers %q, which the proxy cannot do here", g, bad)
		}
	}
	res := c.MustLogin("alice", "secret")
	for _, want := range []string{"SORT", "THREAD=REFERENCES", "UNSELECT", "CONDSTORE"} {
		if !strings.Contains(res.Tagged, want) {
			t.Errorf("login OK %q lacks %q", res.Tagged, want)
		}
	}
	if strings.Contains(res.Tagged, "COMPRESS") {
		t.Errorf("login OK %q offers COMPRESS, which cannot be relayed", res.Tagged)
	}
}

// TestPoisonedConnDiscarded: a cached connection on which the server sent
// something unasked must not be handed out; its bytes must not reach the
// next session.
func TestPoisonedConnDiscarded(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Logout()
	p.waitCached(t, 1)

	b.conn(1).write("* 7 EXISTS\r\n") // conn 0 was the capability probe

	c = testkit.Dial(t, p.addr)
	res := c.MustLogin("alice", "secret")
	if res.Has("XPROXYREUSE") || res.Has("EXISTS") {
		t.Fatalf("poisoned connection was reused:\n%s", res)
	}
	if r := c.Cmd("NOOP"); r.Has("EXISTS") {
		t.Fatalf("stale data reached the new session:\n%s", r)
	}
	if st := p.srv.Pool().Stats(); st.ClosedDead != 1 {
		t.Errorf("ClosedDead = %d, want 1", st.ClosedDead)
	}
	if n := b.logins.Load(); n != 2 {
		t.Errorf("backend logins = %d, want 2", n)
	}
}

// TestPipelinedLogout: LOGOUT pipelined behind a slow command is answered
// after it, never before.
func TestPipelinedLogout(t *testing.T) {
	b := newFakeBackend(t)
	release := make(chan struct{})
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "SEARCH" {
			return false
		}
		go func() {
			<-release
			c.write("* SEARCH 1 2\r\n" + tag + " OK search done\r\n")
		}()
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("s1 SEARCH ALL\r\ns2 LOGOUT\r\n")
	close(release)
	want := []string{"* SEARCH 1 2", "s1 OK search done", "* BYE Logging out", "s2 OK LOGOUT completed"}
	for _, w := range want {
		if got := c.ReadLine(); got != w {
			t.Fatalf("got %q, want %q", got, w)
		}
	}
	p.waitCached(t, 1)
}

// TestRefusedLiteral: the server refuses a synchronising literal with a
// tagged NO instead of "+"; the client sends no literal, and the relay must
// read its next line as a command.
func TestRefusedLiteral(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "APPEND" {
			return false
		}
		c.write(tag + " NO [TOOBIG] too big\r\n")
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("a1 APPEND INBOX {99999}\r\n")
	if got := c.ReadLine(); got != "a1 NO [TOOBIG] too big" {
		t.Fatalf("APPEND: got %q", got)
	}
	if r := c.Cmd("NOOP"); !r.OK() {
		t.Fatalf("NOOP after refused literal: %s", r)
	}
	c.Logout()
	p.waitCached(t, 1)
}

func TestLoginRefusalRelayed(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	res := c.Login("alice", "wrong")
	if want := "t1 NO [AUTHENTICATIONFAILED] Authentication failed."; res.Tagged != want {
		t.Fatalf("got %q, want %q", res.Tagged, want)
	}
	// The session stays in the not-authenticated state.
	c.MustLogin("alice", "secret")
	if st := p.srv.Pool().Stats(); st.Open != 1 {
		t.Errorf("open upstream conns = %d, want 1 (the refused one closed)", st.Open)
	}
}

func TestBackendDiesMidSession(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "STATUS" {
			return false
		}
		c.conn.Close()
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("x STATUS INBOX (MESSAGES)\r\n")
	if got := c.ReadLine(); !strings.HasPrefix(got, "* BYE") {
		t.Fatalf("got %q, want * BYE", got)
	}
	if _, err := c.R.ReadByte(); err == nil {
		t.Fatal("connection still open after BYE")
	}
	p.waitIdle(t)
	if st := p.srv.Pool().Stats(); st.Open != 0 || st.Cached != 0 {
		t.Errorf("stats = %+v, want nothing open", st)
	}
}

// TestDirtyStateNotCached lists commands after which the connection must
// not be reused, and a control that must be.
func TestDirtyStateNotCached(t *testing.T) {
	tests := []struct {
		name   string
		cmds   []string
		cached bool
	}{
		{"plain", []string{"NOOP"}, true},
		{"selected then logout", []string{"SELECT INBOX", "FETCH 1 BODY[]"}, true},
		{"unknown command", []string{"XFOO"}, false},
		{"enable", []string{"ENABLE CONDSTORE"}, false},
		{"select condstore", []string{"SELECT INBOX (CONDSTORE)"}, false},
		{"fetch modseq", []string{"SELECT INBOX", "FETCH 1 (FLAGS MODSEQ)"}, false},
		{"search save", []string{"SELECT INBOX", "SEARCH RETURN (SAVE) ALL"}, false},
		{"notify", []string{"NOTIFY NONE"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t)
			p := startFakeProxy(t, b, nil)
			c := testkit.Dial(t, p.addr)
			c.MustLogin("alice", "secret")
			for _, cmd := range tt.cmds {
				c.Cmd("%s", cmd)
			}
			c.Logout()
			p.waitIdle(t)
			if got := p.srv.Pool().Stats().Cached == 1; got != tt.cached {
				t.Fatalf("after %q: cached = %v, want %v", tt.cmds, got, tt.cached)
			}
		})
	}
}

func TestCommandsRefusedAfterLogin(t *testing.T) {
	b := newFakeBackend(t)
	var forwarded []string
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		forwarded = append(forwarded, cmd)
		return false
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	for _, cmd := range []string{"COMPRESS DEFLATE", "STARTTLS", "UNAUTHENTICATE", "LOGIN a b", "AUTHENTICATE PLAIN"} {
		if r := c.Cmd("%s", cmd); !strings.Contains(r.Tagged, " BAD ") {
			t.Errorf("%s after login: %q, want BAD", cmd, r.Tagged)
		}
	}
	c.Logout()
	p.waitCached(t, 1)
	for _, f := range forwarded {
		switch f {
		case "COMPRESS", "STARTTLS", "UNAUTHENTICATE", "LOGIN":
			t.Errorf("%s was forwarded to the backend", f)
		}
	}
}

// TestShutdownDrains: a logged-in session gets BYE, and the connection it
// held is logged out on the backend.
func TestShutdownDrains(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if got := c.ReadLine(); got != "* BYE Server shutting down" {
		t.Fatalf("got %q, want the shutdown BYE", got)
	}
	// 1 from the capability probe, 1 from the drained session.
	if n := b.logouts.Load(); n != 2 {
		t.Errorf("backend LOGOUTs = %d, want 2", n)
	}
}

func TestClientLimits(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Options)
	}{
		{"max clients", func(o *Options) { o.MaxClients = 2 }},
		{"max clients per ip", func(o *Options) { o.MaxClientsPerIP = 2 }},
		{"max preauth", func(o *Options) { o.MaxPreAuth = 2 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t)
			p := startFakeProxy(t, b, tt.mod)
			c1 := testkit.Dial(t, p.addr)
			c2 := testkit.Dial(t, p.addr)
			c3 := testkit.Dial(t, p.addr)
			if !strings.HasPrefix(c3.Greeting, "* BYE [UNAVAILABLE]") {
				t.Fatalf("third connection greeted %q, want a BYE", c3.Greeting)
			}
			if _, err := c3.R.ReadByte(); err == nil {
				t.Fatal("refused connection left open")
			}
			if p.srv.Stats().Rejected != 1 {
				t.Errorf("Rejected = %d, want 1", p.srv.Stats().Rejected)
			}
			// Room again once a connection ends (or, for max_preauth,
			// logs in).
			if tt.name == "max preauth" {
				c1.MustLogin("alice", "secret")
			} else {
				c1.Logout()
				p.waitSessions(t, 1)
			}
			c4 := testkit.Dial(t, p.addr)
			if strings.HasPrefix(c4.Greeting, "* BYE") {
				t.Fatalf("no room after a connection left: %q", c4.Greeting)
			}
			_ = c2
		})
	}
}

func TestSessionsPerUser(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, func(o *Options) { o.MaxSessionsPerUser = 1 })
	c1 := testkit.Dial(t, p.addr)
	c1.MustLogin("alice", "secret")
	c2 := testkit.Dial(t, p.addr)
	if res := c2.Login("alice", "secret"); res.Tagged != "t1 NO [LIMIT] Too many sessions for this user" {
		t.Fatalf("second session: %q", res.Tagged)
	}
	if n := b.logins.Load(); n != 1 {
		t.Errorf("backend logins = %d, want 1: the refused login must not reach it", n)
	}
	c2.MustLogin("bob", "secret") // other users are not affected
	c1.Logout()
	p.waitSessions(t, 1)
	c3 := testkit.Dial(t, p.addr)
	c3.MustLogin("alice", "secret")
}

// TestSessionsPerUserRelogin: a user at the limit who logs out and logs in
// again the moment the LOGOUT answer arrives, as webmail does from page to
// page, is let in: the session that said its last word no longer counts.
func TestSessionsPerUserRelogin(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, func(o *Options) { o.MaxSessionsPerUser = 1 })
	for i := range 30 {
		c := testkit.Dial(t, p.addr)
		c.MustLogin("alice", "secret")
		// The tagged OK only, not the close: the next login goes out
		// before the proxy has finished with this session.
		if res := c.Cmd("LOGOUT"); !res.OK() {
			t.Fatalf("round %d: LOGOUT: %s", i, res)
		}
		defer c.NetConn.Close()
	}
}

// TestBadSelectKeepsSelection: a SELECT refused with BAD was not executed,
// so the mailbox selected before is still selected and must be left with
// UNSELECT before the connection is cached.
func TestBadSelectKeepsSelection(t *testing.T) {
	b := newFakeBackend(t)
	var mu sync.Mutex
	var seen []string
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		mu.Lock()
		seen = append(seen, cmd)
		mu.Unlock()
		if cmd == "SELECT" && !strings.Contains(line, "INBOX") {
			c.write(tag + " BAD Missing argument\r\n")
			return true
		}
		return false
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Cmd("SELECT INBOX")
	if r := c.Cmd("SELECT"); !strings.Contains(r.Tagged, " BAD ") {
		t.Fatalf("SELECT without a mailbox: %q", r.Tagged)
	}
	c.Logout()
	p.waitCached(t, 1)
	mu.Lock()
	defer mu.Unlock()
	if seen[len(seen)-1] != "UNSELECT" {
		t.Fatalf("backend saw %q last, want the UNSELECT cleanup", seen)
	}
}
