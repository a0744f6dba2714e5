package proxy

// Attack tests from a hostile review of issue 12 (branch review). Each
// test names the finding it demonstrates; a failing test is a defect.

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// hiddenCommandBurst builds a client burst whose framing the proxy and
// Dovecot read differently. The proxy sees
//
//	a STATUS ) {N+}  <N bytes of literal>  CRLF     (one command, tag a)
//	h NOOP CRLF                                      (one command, tag h)
//
// Dovecot answers "a BAD Unexpected ')'" and, as after any parse error,
// skips to the end of the line, not over the literal: the literal's bytes
// are a command of their own, "h <hidden> {8+}", whose own literal swallows
// the proxy's continuation CRLF and "h NOOP", so its line ends where the
// proxy's NOOP ends. Two tagged answers (a, h) for two commands the proxy
// tracks (a, h): nothing looks amiss to the relay, yet Dovecot ran a
// command the proxy never saw (its text was literal data to the proxy and
// never went through scan).
func hiddenCommandBurst(hidden string) string {
	lit := "h " + hidden + " {8+}\r\n"
	return fmt.Sprintf("a STATUS ) {%d+}\r\n%s\r\nh NOOP\r\n", len(lit), lit)
}

// FINDING 1 (state leak into the next session through a cached
// connection; framing desync): the noArgs rule of issue 12 item 4 covers
// one way of making Dovecot run a literal's content as a command, but any
// parse error ahead of a non-synchronising literal does the same. Here the
// hidden command is "SEARCH MODSEQ 1 TEXT <literal>", which switches
// CONDSTORE on implicitly; the proxy caches the connection and the user's
// next session, a fresh login as far as the client knows, gets MODSEQ in
// FETCH replies it never asked for.
func TestAttackHiddenCommandAfterParseError(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 3})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	// Control: without CONDSTORE, Dovecot's STORE reply has no MODSEQ.
	if res := c.Cmd(`STORE 2 +FLAGS (\Flagged)`); !res.OK() || res.Has("MODSEQ") {
		t.Fatalf("control STORE before the attack: %s", res)
	}
	c.Send(hiddenCommandBurst("SEARCH MODSEQ 1 TEXT"))
	a := c.ReadResponse("a")
	if !strings.HasPrefix(a.Tagged, "a BAD") {
		t.Fatalf("a: %s", a)
	}
	h := c.ReadResponse("h")
	t.Logf("hidden command's answer, taken by the client for its NOOP's:\n%s", h)
	c.Logout()
	p.waitIdle(t)

	c = testkit.Dial(t, p.addr)
	res := c.MustLogin(user, pass)
	if !res.Has("[XPROXYREUSE]") {
		t.Skip("connection not cached: the attack did not get through")
	}
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	f := c.Cmd(`STORE 1 +FLAGS (\Flagged)`)
	t.Logf("next session's STORE:\n%s", f)
	if f.Has("MODSEQ") {
		t.Errorf("a fresh-looking session on a cached connection has CONDSTORE on (left by the previous session's hidden command): %s", f)
	}
	c.Logout()
}

// FINDING 2 (session breaks; client input taken for backend failure): the
// relay accepts "]" in a tag (RFC 3501 allows it) but Dovecot does not: it
// answers "* BAD Error in IMAP tag: Invalid tag", untagged, and skips the
// line. The relay keeps the command in flight for ever, so the backend
// "owes" an answer: after ResponseTimeout the session of a client that did
// nothing wrong by the RFC, on a healthy backend, ends with
// "* BYE [UNAVAILABLE] IMAP server not responding" and a WARN blaming the
// backend. (With a {n+} literal on the same line, Dovecot also runs the
// literal's content as commands: the variant of finding 1 that a fix
// keyed on a tagged BAD would miss.)
func TestAttackTagDovecotRejects(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 3})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	const respTimeout = time.Second
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.ResponseTimeout = respTimeout })

	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	c.Send("a]b NOOP\r\nz NOOP\r\n")
	res := c.ReadResponse("z")
	t.Logf("answers:\n%s", res)
	// Nothing is owed: for twice the response timeout the proxy should
	// send nothing, and then still relay.
	c.SetReadDeadline(time.Now().Add(2 * respTimeout))
	if l, err := c.R.ReadString('\n'); err == nil || !isTimeoutErr(err) {
		t.Errorf("a session whose client used a tag Dovecot refuses, on a healthy backend: got %q (%v), want silence", l, err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if strings.Contains(p.logs.String(), "backend not responding") {
		t.Errorf("the proxy blamed a healthy backend for the client's tag: %s", grepLog(p.logs.String(), "backend not responding"))
	}
}

func grepLog(logs, sub string) string {
	var out []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// FINDING 3 (resource pinned past a documented bound): Shutdown says it
// "returns by ctx's deadline even when a backend hangs", and its Close
// kills sessions by closing their client socket and relay upstream. A
// session in the middle of a login owns an upstream the relay does not
// have yet (dial, greeting, LOGIN, or the reuse check of a cached
// connection): nothing closes it, and Shutdown waits for the login
// timeout (30s by default) instead of its deadline.
func TestAttackShutdownDuringLoginToHungBackend(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	const loginTimeout = 8 * time.Second
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.Dialer.LoginTimeout = loginTimeout })

	if err := dc.Pause(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dc.Resume() })
	c := testkit.Dial(t, p.addr)
	c.Send("l LOGIN " + user + " " + pass + "\r\n")
	// The session has taken its slot and dialled: it waits for a greeting
	// that will not come.
	deadline := time.Now().Add(5 * time.Second)
	for p.srv.Pool().Stats().Open != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("login never reached the backend: pool %+v", p.srv.Pool().Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	p.srv.Shutdown(ctx)
	took := time.Since(start)
	t.Logf("Shutdown with a 1s deadline returned in %v", took)
	if took > 2*time.Second {
		t.Errorf("Shutdown with a 1s deadline took %v during a login to a hung backend (login timeout %v)", took, loginTimeout)
	}
}

// FINDING 4 (state leak into the next session: a selected mailbox; the
// proxy's own cleanup answered by the client): the proxy's internal tags
// are predictable (IMAPPROXY<n>, counted per connection: ID 1, LOGIN 2,
// so the cleanup of a fresh connection is IMAPPROXY3), and the hidden
// command of finding 1 may be left unfinished: its literal waits for
// bytes that only the proxy's cleanup line brings. Dovecot then reads
// "IMAPPROXY3 UNSELECT" as literal data, and the hidden command, tagged
// IMAPPROXY3, completes with OK at the cleanup line's CRLF. The pump takes
// that for the UNSELECT's answer, which "checks the belief" (OK, since a
// mailbox was selected), and caches a connection that still has INBOX
// selected: the next session can FETCH without SELECT.
func TestAttackCleanupAnsweredByHiddenCommand(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 3})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	c := testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, pass); res.Has("[XPROXYREUSE]") {
		t.Fatal("first login reused a connection")
	}
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	const cleanup = "IMAPPROXY3 UNSELECT"
	hidden := fmt.Sprintf("IMAPPROXY3 LIST \"\" {%d+}\r\n", len("\r\n"+cleanup))
	c.Send(fmt.Sprintf("a STATUS ) {%d+}\r\n%s\r\n", len(hidden), hidden))
	if res := c.ReadResponse("a"); !strings.HasPrefix(res.Tagged, "a BAD") {
		t.Fatalf("a: %s", res)
	}
	c.Logout()
	p.waitIdle(t)

	c = testkit.Dial(t, p.addr)
	res := c.MustLogin(user, pass)
	if !res.Has("[XPROXYREUSE]") {
		t.Skip("connection not cached: the attack did not get through")
	}
	if f := c.Cmd("FETCH 1 (FLAGS)"); f.OK() {
		t.Errorf("a fresh-looking session on a cached connection has INBOX selected: FETCH without SELECT: %s", f)
	}
	c.Logout()
}
