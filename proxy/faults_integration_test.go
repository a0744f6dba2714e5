package proxy

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/faultnet"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/upstream"
)

// Short timeouts, so that every hang below is answered in about a second.
const (
	faultDial     = 500 * time.Millisecond
	faultLogin    = time.Second
	faultCheck    = time.Second
	faultResponse = time.Second
	faultWrite    = time.Second
	faultLiteral  = time.Second
	// faultSlack is what a loaded CI machine may add to a bound before
	// the answer counts as missing.
	faultSlack = 3 * time.Second
)

func faultOptions(o *Options) {
	o.Dialer = &upstream.Dialer{ForwardID: true, Timeout: faultDial, LoginTimeout: faultLogin, CheckTimeout: faultCheck}
	o.ResponseTimeout = faultResponse
	o.WriteTimeout = faultWrite
	o.LiteralTimeout = faultLiteral
	o.LogoutWait = time.Second
}

// faultEnv is one case of the hang matrix: a real Dovecot, a faultnet
// Proxy in front of it, and an imapproxy in front of that.
type faultEnv struct {
	t       *testing.T
	dc      *dovecottest.Server
	fn      *faultnet.Proxy
	p       *testProxy
	clients []*testkit.Client
}

func newFaultEnv(t *testing.T, dc *dovecottest.Server, mod func(*Options)) *faultEnv {
	fn := faultnet.ListenT(t, dc.Addr)
	// The probe of capabilities goes through before any fault.
	p := startServer(t, []Backend{{ID: "faulty", Addr: fn.Addr(), Weight: 1}}, true, func(o *Options) {
		faultOptions(o)
		if mod != nil {
			mod(o)
		}
	})
	t.Cleanup(func() {
		// A case that stops Dovecot must not leave it stopped for the next.
		if err := dc.Resume(); err != nil {
			t.Errorf("resume dovecot: %v", err)
		}
	})
	return &faultEnv{t: t, dc: dc, fn: fn, p: p}
}

// dial connects a client that settled closes.
func (e *faultEnv) dial() *testkit.Client {
	e.t.Helper()
	c := testkit.Dial(e.t, e.p.addr)
	e.clients = append(e.clients, c)
	return c
}

func (e *faultEnv) login(user string) *testkit.Client {
	e.t.Helper()
	c := e.dial()
	c.MustLogin(user, e.dc.PasswordOf(user))
	return c
}

// answer is what a client got for a command that met a fault: its last
// lines, and how long after the command they came.
type answer struct {
	lines []string // the last few, without CRLF
	eof   bool     // the proxy closed the connection
	took  time.Duration
}

func (a answer) has(s string) bool {
	for _, l := range a.lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

func (a answer) String() string {
	return fmt.Sprintf("after %v (eof %v): %q", a.took.Round(time.Millisecond), a.eof, a.lines)
}

// send writes "tag command" and waits, up to bound plus slack, for the
// tagged reply or the end of the connection, whatever comes between
// (a literal cut short included).
func (e *faultEnv) send(c *testkit.Client, tag, command string, bound time.Duration) answer {
	e.t.Helper()
	start := time.Now()
	c.Send(tag + " " + command + "\r\n")
	return e.await(c, tag, start, bound)
}

func (e *faultEnv) await(c *testkit.Client, tag string, start time.Time, bound time.Duration) answer {
	e.t.Helper()
	c.SetReadDeadline(start.Add(bound + faultSlack))
	var a answer
	for {
		l, err := c.R.ReadString('\n')
		if l != "" {
			a.lines = append(a.lines, strings.TrimRight(l, "\r\n"))
			if len(a.lines) > 4 {
				a.lines = a.lines[1:]
			}
		}
		if err == io.EOF {
			a.eof, a.took = true, time.Since(start)
			return a
		}
		if err != nil {
			e.t.Fatalf("no answer to %s within %v (bound %v): %v; last lines %q", tag, bound+faultSlack, bound, err, a.lines)
		}
		if strings.HasPrefix(l, tag+" ") {
			a.took = time.Since(start)
			return a
		}
	}
}

// settled waits until nothing of the case is left pinned: no session, no
// upstream connection but the cached ones, no connection through the
// faultnet Proxy but theirs. Then, with every fault lifted, a new login
// works, so the slots came back.
func (e *faultEnv) settled(user string) {
	e.t.Helper()
	for _, c := range e.clients {
		c.NetConn.Close()
	}
	var st Stats
	var ps = e.p.srv.Pool().Stats()
	var conns int
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, ps, conns = e.p.srv.Stats(), e.p.srv.Pool().Stats(), e.fn.Conns()
		if st.Sessions == 0 && ps.Open == ps.Cached && conns == ps.Cached {
			break
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("pinned after the session ended: %d sessions, %d upstream connections open, %d cached, %d through faultnet",
				st.Sessions, ps.Open, ps.Cached, conns)
		}
		time.Sleep(5 * time.Millisecond)
	}
	e.fn.Resume(faultnet.Up)
	e.fn.Resume(faultnet.Down)
	e.fn.BlackHole(false)
	if err := e.dc.Resume(); err != nil {
		e.t.Fatal(err)
	}
	c := e.login(user)
	if res := c.Cmd("NOOP"); !res.OK() {
		e.t.Fatalf("NOOP after the fault: %s", res)
	}
	c.Logout()
	e.p.waitIdle(e.t)
}

// TestHangMatrix puts a real Dovecot behind a fault injector and makes
// it hang, or stops it (SIGSTOP), at each point where the proxy waits on
// it: the client must get a clear answer within the configured timeout,
// and nothing may stay pinned (sessions, sockets, connection slots).
func TestHangMatrix(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{
		Name: "faulty", Users: 2, Messages: 3, BigMessages: 8,
		Large: dovecottest.Large{Recipients: 4000},
	})
	user := dovecottest.UserName(1)
	unreachable := "NO [UNAVAILABLE] IMAP server unreachable"
	notResponding := "* BYE [UNAVAILABLE] IMAP server not responding"

	cases := []struct {
		name string
		// bound is the documented time to the answer, from the
		// configured timeouts.
		bound time.Duration
		// run applies the fault, sends the command that meets it and
		// returns the answer, which must hold want.
		run  func(e *faultEnv, bound time.Duration) answer
		want string
		mod  func(*Options) // on top of faultOptions
		// log must be in the proxy's log, and notLog not: whose fault
		// it was.
		log, notLog string
	}{
		{
			// Connects that are never answered (SYNs dropped, as
			// by a firewall or a full accept queue).
			name: "dial never answered", bound: faultDial, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				e.p.srv.SetBackends([]Backend{{ID: "faulty", Addr: unansweredAddr(e.t), Weight: 1}})
				c := e.dial()
				a := e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
				e.p.srv.SetBackends([]Backend{{ID: "faulty", Addr: e.fn.Addr(), Weight: 1}})
				return a
			},
		},
		{
			// The connect completes, nothing ever answers.
			name: "dial to a black hole", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				e.fn.BlackHole(true)
				c := e.dial()
				return e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
			},
		},
		{
			name: "greeting held", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				e.fn.Pause(faultnet.Down)
				c := e.dial()
				return e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
			},
		},
		{
			name: "greeting from a stopped Dovecot", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				if err := e.dc.Pause(); err != nil {
					e.t.Fatal(err)
				}
				c := e.dial()
				return e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
			},
		},
		{
			name: "AUTHENTICATE held", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				hit := e.fn.PauseOn(faultnet.Up, []byte("AUTHENTICATE PLAIN"))
				c := e.dial()
				a := e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
				mustHit(e.t, hit, "AUTHENTICATE")
				return a
			},
		},
		{
			name: "login answers held after the greeting", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				hit := e.fn.PauseOn(faultnet.Down, []byte("\r\n"))
				c := e.dial()
				a := e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
				mustHit(e.t, hit, "the greeting")
				return a
			},
		},
		{
			// The check of the cached connection (NOOP) waits up to
			// the check timeout, the connection is dropped, and the
			// login goes on with a fresh one. The login timeout
			// covers the check too: it must leave time for that.
			name: "reuse check held", bound: faultCheck, want: "a OK",
			mod: func(o *Options) { o.Dialer.LoginTimeout = faultCheck + faultLogin },
			run: func(e *faultEnv, bound time.Duration) answer {
				e.login(user).Logout()
				e.p.waitCached(e.t, 1)
				accepted := e.fn.Accepted()
				e.fn.Pause(faultnet.Down)
				c := e.dial()
				start := time.Now()
				c.Send(fmt.Sprintf("a LOGIN %s %s\r\n", user, e.dc.PasswordOf(user)))
				// The fresh connection gets its greeting.
				waitUntil(e.t, bound+faultSlack, "a fresh connection after the failed check", func() bool { return e.fn.Accepted() > accepted })
				e.fn.Resume(faultnet.Down)
				a := e.await(c, "a", start, bound)
				if a.has("XPROXYREUSE") {
					e.t.Errorf("login served by the connection that failed its check: %v", a)
				}
				c.Logout()
				return a
			},
		},
		{
			// The check takes the whole login timeout: no fresh
			// connection is tried.
			name: "reuse check of a stopped Dovecot", bound: faultLogin, want: unreachable,
			run: func(e *faultEnv, bound time.Duration) answer {
				e.login(user).Logout()
				e.p.waitCached(e.t, 1)
				if err := e.dc.Pause(); err != nil {
					e.t.Fatal(err)
				}
				c := e.dial()
				return e.send(c, "a", fmt.Sprintf("LOGIN %s %s", user, e.dc.PasswordOf(user)), bound)
			},
		},
		{
			name: "cleanup at logout held", bound: faultCheck, want: "x OK LOGOUT",
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT INBOX"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				hit := e.fn.PauseOn(faultnet.Up, []byte("UNSELECT"))
				a := e.send(c, "x", "LOGOUT", bound)
				mustHit(e.t, hit, "UNSELECT")
				return a
			},
		},
		{
			name: "logout to a stopped Dovecot", bound: faultCheck, want: "x OK LOGOUT",
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT INBOX"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				if err := e.dc.Pause(); err != nil {
					e.t.Fatal(err)
				}
				return e.send(c, "x", "LOGOUT", bound)
			},
		},
		{
			name: "command to a stopped Dovecot", bound: faultResponse, want: notResponding,
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT INBOX"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				if err := e.dc.Pause(); err != nil {
					e.t.Fatal(err)
				}
				return e.send(c, "f", "FETCH 1:* (FLAGS)", bound)
			},
		},
		{
			// The chunk's write deadline toward the client passes
			// before the backend's read deadline, as with the
			// defaults (60s, 120s): the stall is still the backend's.
			name: "mid-literal toward the client", bound: faultResponse, want: notResponding,
			log: "[WARN]  backend not responding", notLog: "client connection lost",
			mod: func(o *Options) { o.WriteTimeout = faultResponse / 2 },
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT Big"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				// A line of the body, well inside the literal.
				hit := e.fn.PauseOn(faultnet.Down, []byte("XYZ+/0123456789ab\r\n0123"))
				a := e.send(c, "f", "FETCH 1 BODY[]", bound)
				mustHit(e.t, hit, "the literal")
				return a
			},
		},
		{
			name: "reset mid-literal", bound: 0, want: "* BYE Connection to IMAP server lost",
			log: "[WARN]  backend connection lost", notLog: "client connection lost",
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT Big"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				hit := e.fn.PauseOn(faultnet.Down, []byte("XYZ+/0123456789ab\r\n0123"))
				c.Send("f FETCH 1 BODY[]\r\n")
				mustHit(e.t, hit, "the literal")
				start := time.Now()
				e.fn.Reset()
				return e.await(c, "f", start, bound)
			},
		},
		{
			// The other side's stall: a client that stops reading is
			// cut after timeouts.write, and the log blames it, not
			// the backend, which is still sending.
			name: "client stops reading mid-literal", bound: faultWrite,
			log: "client connection lost", notLog: "[WARN]",
			run: func(e *faultEnv, bound time.Duration) answer {
				c := dialSmallWindow(e.t, e.p.addr)
				e.clients = append(e.clients, c)
				c.MustLogin(user, e.dc.PasswordOf(user))
				if res := c.Cmd("SELECT Big"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				// 8 MiB: more than the socket buffers hold.
				start := time.Now()
				c.Send("f FETCH 1:* BODY[]\r\n")
				waitUntil(e.t, bound+faultSlack, "end of the session", func() bool { return e.p.srv.Stats().Sessions == 0 })
				return answer{took: time.Since(start)}
			},
		},
		{
			// The other side's reset: the client's, and the log says so.
			name: "client resets mid-literal", bound: 0,
			log: "[DEBUG] client connection", notLog: "[WARN]",
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				if res := c.Cmd("SELECT Big"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				hit := e.fn.PauseOn(faultnet.Down, []byte("XYZ+/0123456789ab\r\n0123"))
				c.Send("f FETCH 1 BODY[]\r\n")
				mustHit(e.t, hit, "the literal")
				// Everything up to the stall has reached the client,
				// so the proxy is surely waiting on the backend.
				c.SetReadDeadline(time.Now().Add(faultSlack))
				for l := ""; !strings.HasPrefix(l, "0123456789abcdef"); {
					l = c.ReadLine()
				}
				if b, err := c.R.Peek(4); string(b) != "0123" {
					e.t.Fatalf("after the first line of the body: %q, %v", b, err)
				}
				// The backend stays stalled: the proxy learns of the
				// reset reading the client, and closes the backend
				// under the pump, which must not take that for the
				// backend's failure.
				c.NetConn.(*net.TCPConn).SetLinger(0)
				c.NetConn.Close()
				start := time.Now()
				waitUntil(e.t, bound+faultSlack, "end of the session", func() bool { return e.p.srv.Stats().Sessions == 0 })
				return answer{took: time.Since(start)}
			},
		},
		{
			// Slow but moving: each part that arrives restarts the
			// response timeout, and the answer, which takes twice that
			// in all, comes through whole.
			name: "drip of a long line", want: "f OK",
			run: func(e *faultEnv, _ time.Duration) answer {
				c := e.login(dovecottest.LargeUser)
				if res := c.Cmd("SELECT Recipients"); !res.OK() {
					e.t.Fatalf("SELECT: %s", res)
				}
				// 168 KB at 4 KiB every 50 ms: over two seconds.
				e.fn.Drip(faultnet.Down, 4096, 50*time.Millisecond)
				a := e.send(c, "f", "FETCH 1 (ENVELOPE)", 5*time.Second)
				e.fn.Resume(faultnet.Down)
				if a.took < 2*faultResponse {
					e.t.Errorf("the drip took %v; it should take over twice the response timeout (%v)", a.took, faultResponse)
				}
				if len(a.lines) != 2 || len(a.lines[0]) < 4000*40 || !strings.HasSuffix(a.lines[0], "))") {
					e.t.Errorf("ENVELOPE of %d lines, the first of %d bytes", len(a.lines), len(a.lines[0]))
				}
				if res := c.Cmd("NOOP"); !res.OK() {
					e.t.Fatalf("NOOP after the drip: %s", res)
				}
				c.Logout()
				e.p.waitCached(e.t, 1)
				return a
			},
		},
		{
			// While the client sends a literal the backend waits for
			// it: the client's pause is not the backend's silence.
			name: "client slow to send its literal", bound: faultResponse, want: "a OK",
			mod: func(o *Options) { o.LiteralTimeout = 10 * faultResponse },
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				msg := "Subject: slow upload\r\n\r\nHello.\r\n"
				c.Send(fmt.Sprintf("a APPEND INBOX {%d}\r\n", len(msg)))
				c.ExpectContinuation()
				// Longer than the response timeout, shorter than the
				// literal's.
				c.SetReadDeadline(time.Now().Add(3 * faultResponse))
				if b, err := c.R.ReadByte(); !isTimeoutErr(err) {
					e.t.Fatalf("while the client holds its literal back: read %q, %v; want silence", b, err)
				}
				start := time.Now()
				c.Send(msg + "\r\n")
				a := e.await(c, "a", start, bound)
				c.Logout()
				e.p.waitCached(e.t, 1)
				return a
			},
		},
		{
			name: "mid-literal toward the backend", bound: faultWrite, want: notResponding,
			run: func(e *faultEnv, bound time.Duration) answer {
				c := e.login(user)
				// Larger than what the sockets between proxy and
				// backend buffer, so that the proxy's writes block.
				const size = 24 << 20
				hit := e.fn.PauseOn(faultnet.Up, []byte("XYZZY"))
				c.Send(fmt.Sprintf("a APPEND INBOX {%d}\r\n", size))
				c.ExpectContinuation()
				msg := append([]byte("Subject: stalled upload\r\n\r\nXYZZY\r\n"), bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), size/64)...)
				msg = msg[:size]
				wrote := make(chan error, 1)
				go func() {
					c.NetConn.SetWriteDeadline(time.Now().Add(bound + 2*faultSlack))
					_, err := c.NetConn.Write(append(msg, "\r\n"...))
					wrote <- err
				}()
				mustHit(e.t, hit, "the literal")
				start := time.Now()
				a := e.await(c, "a", start, bound)
				c.NetConn.Close()
				<-wrote
				// The Proxy sees the proxy's close once Up flows again.
				e.fn.Resume(faultnet.Up)
				return a
			},
		},
	}
	var report strings.Builder
	for _, tc := range cases {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			e := newFaultEnv(t, dc, tc.mod)
			a := tc.run(e, tc.bound)
			t.Logf("%s: answered %v (bound %v)", tc.name, a, tc.bound)
			fmt.Fprintf(&report, "\n  %-40s %6v (bound %v)", tc.name, a.took.Round(10*time.Millisecond), tc.bound)
			if tc.want != "" && !a.has(tc.want) {
				t.Errorf("answer %v, want %q", a, tc.want)
			}
			e.settled(user)
			if logs := e.p.logs.String(); !strings.Contains(logs, tc.log) || tc.notLog != "" && strings.Contains(logs, tc.notLog) {
				t.Errorf("the proxy's log should have %q and not %q", tc.log, tc.notLog)
			}
		})
	}
	t.Logf("time to answer each fault:%s", report.String())
}

func mustHit(t *testing.T, hit <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-hit:
	case <-time.After(10 * time.Second):
		t.Fatalf("the fault injector never saw %s", what)
	}
}

// unansweredAddr is an address where connects hang: a socket listening
// with a backlog of 0, whose accept queue is filled with one connection
// that is never accepted, so that the kernel drops further SYNs.
func unansweredAddr(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			if !isTimeoutErr(err) {
				t.Fatalf("filling the accept queue of %s: %v", addr, err)
			}
			return addr
		}
		t.Cleanup(func() { c.Close() })
		if i == 4 {
			t.Fatalf("connects to %s still complete after %d", addr, i+1)
		}
	}
}

// waitUntil polls cond until it holds or within passes.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, within)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestIdleOutlivesStalledBackend: a session in IDLE owes the backend
// nothing, so a backend that stops (SIGSTOP) for longer than the
// response timeout does not end it, and DONE after it resumes works. A
// DONE sent while it is still stopped is owed an answer, and gets the
// timeout's BYE.
func TestIdleOutlivesStalledBackend(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "idler", Users: 1, Messages: 3})
	user := dovecottest.UserName(1)
	e := newFaultEnv(t, dc, nil)
	c := e.login(user)
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	c.Send("i IDLE\r\n")
	c.ExpectContinuation()
	if err := dc.Pause(); err != nil {
		t.Fatal(err)
	}
	// Silence for three response timeouts: neither BYE nor close.
	c.SetReadDeadline(time.Now().Add(3 * faultResponse))
	if b, err := c.R.ReadByte(); !isTimeoutErr(err) {
		t.Fatalf("in IDLE with the backend stopped: read %q, %v; want silence", b, err)
	}
	if n := e.p.srv.Stats().Sessions; n != 1 {
		t.Fatalf("sessions = %d while in IDLE, want 1", n)
	}
	if err := dc.Resume(); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Send("DONE\r\n")
	if res := c.ReadResponse("i"); !res.OK() {
		t.Fatalf("DONE after the backend resumed: %s", res)
	}
	if res := c.Cmd("NOOP"); !res.OK() {
		t.Fatalf("NOOP: %s", res)
	}

	// IDLE again; DONE now owes an answer that a stopped backend never
	// gives.
	c.Send("j IDLE\r\n")
	c.ExpectContinuation()
	if err := dc.Pause(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c.Send("DONE\r\n")
	a := e.await(c, "j", start, faultResponse)
	t.Logf("DONE to a stopped backend: answered %v (bound %v)", a, faultResponse)
	if !a.eof || !a.has("* BYE [UNAVAILABLE] IMAP server not responding") {
		t.Errorf("DONE to a stopped backend: %v, want BYE and close", a)
	}
	e.settled(user)
}
