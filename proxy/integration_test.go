package proxy

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

type testProxy struct {
	srv  *Server
	addr string
	logs *testkit.SyncBuffer
}

// startProxy runs a Server on 127.0.0.1 in front of the given Dovecot
// backends.
func startProxy(t testing.TB, backends []*dovecottest.Server, mod func(*Options)) *testProxy {
	t.Helper()
	var bs []Backend
	for _, b := range backends {
		bs = append(bs, Backend{ID: b.Name, Addr: b.Addr, Weight: 1})
	}
	return startServer(t, bs, len(bs) > 0, mod)
}

// startServer runs a Server on 127.0.0.1 in front of bs, logging at trace
// level so that tests see every line, and shuts it down at cleanup. With
// probe, it reads the backends' capabilities first, as the daemon does.
func startServer(t testing.TB, bs []Backend, probe bool, mod func(*Options)) *testProxy {
	t.Helper()
	logs := &testkit.SyncBuffer{}
	log := newTestLogger(logs)
	opts := Options{
		Logger: log,
		Pool:   pool.New(pool.Options{Logger: log.Named("pool")}),
		Dialer: &upstream.Dialer{ForwardID: true, Timeout: 2 * time.Second, CheckTimeout: 2 * time.Second},
		// Tests of the delay set it; the rest need no wait.
		LoginFailureDelay: -1,
	}
	if mod != nil {
		mod(&opts)
	}
	srv := New(opts)
	srv.SetBackends(bs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln, TLSNone) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", logs.String())
		}
	})
	if probe {
		if err := srv.ProbeCapabilities(context.Background()); err != nil {
			t.Fatalf("ProbeCapabilities: %v", err)
		}
	}
	return &testProxy{srv: srv, addr: ln.Addr().String(), logs: logs}
}

// waitCached waits until the pool holds n connections: a session puts its
// connection back after answering LOGOUT, so the client can be faster.
func (p *testProxy) waitCached(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for p.srv.Pool().Stats().Cached != n {
		if time.Now().After(deadline) {
			t.Fatalf("cached connections = %d, want %d", p.srv.Pool().Stats().Cached, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitIdle waits until no session is running, so that a dropped session's
// upstream connection has been put back or closed.
func (p *testProxy) waitIdle(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.srv.mu.Lock()
		n := len(p.srv.sessions)
		p.srv.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions still running", n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestReuseAgainstDovecot(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 3, Messages: 5})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)

	const rounds = 5
	for i := 0; i < rounds; i++ {
		c := testkit.Dial(t, p.addr)
		if !strings.Contains(c.Greeting, "[CAPABILITY IMAP4rev1") || !strings.Contains(c.Greeting, "AUTH=PLAIN") {
			t.Fatalf("greeting %q lacks capabilities", c.Greeting)
		}
		res := c.MustLogin(user, pass)
		reused := res.Has("[XPROXYREUSE]")
		if reused != (i > 0) {
			t.Fatalf("login %d: XPROXYREUSE = %v, want %v\n%s", i, reused, i > 0, res)
		}
		if !strings.Contains(res.Tagged, "[CAPABILITY ") || !strings.Contains(res.Tagged, "SORT") || strings.Contains(res.Tagged, "COMPRESS") {
			t.Fatalf("login %d: tagged OK %q should carry post-login capabilities without COMPRESS", i, res.Tagged)
		}
		sel := c.Cmd("SELECT INBOX")
		if !sel.OK() || !sel.Has("* 5 EXISTS") {
			t.Fatalf("SELECT: %s", sel)
		}
		f := c.Cmd("UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
		if !f.OK() || !f.Has("msg 1 for "+user) {
			t.Fatalf("FETCH: %s", f)
		}
		c.Logout()
		p.waitCached(t, 1)
	}
	n, err := dc.WaitLogins(1, 5*time.Second)
	if err != nil || n != 1 {
		t.Fatalf("Dovecot saw %d logins (err %v) for %d client logins, want 1", n, err, rounds)
	}
	if st := p.srv.Pool().Stats(); st.Hits != rounds-1 {
		t.Errorf("pool hits = %d, want %d", st.Hits, rounds-1)
	}
}

func newTestLogger(w *testkit.SyncBuffer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: w})
}

// waitSessions waits until n client sessions are open.
func (p *testProxy) waitSessions(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for p.srv.Stats().Sessions != n {
		if time.Now().After(deadline) {
			t.Fatalf("sessions = %d, want %d", p.srv.Stats().Sessions, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
