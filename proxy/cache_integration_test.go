package proxy

// Integration tests of connection caching against a real Dovecot: users
// never get each other's connection, a connection is cached only when
// provably clean, the next session finds it unselected, and cached
// connections that die or age are closed, not handed out.

import (
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

// Dovecot writes its log through a log process, so a line may appear a
// moment after the client saw the reply it belongs to.
const logWait = 5 * time.Second

// waitLogCount polls dc's log until re matches at least n times or logWait
// passes, and returns the last count.
func waitLogCount(dc *dovecottest.Server, re *regexp.Regexp, n int) int {
	deadline := time.Now().Add(logWait)
	for {
		got := len(re.FindAllStringIndex(dc.Log(), -1))
		if got >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func countLoginsFor(t testing.TB, dc *dovecottest.Server, user string) int {
	t.Helper()
	n, err := dc.LoginsFor(user)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitLoginsFor waits until Dovecot logged n logins of user and fails the
// test if it logged another number.
func waitLoginsFor(t testing.TB, dc *dovecottest.Server, user string, n int) {
	t.Helper()
	deadline := time.Now().Add(logWait)
	for {
		got := countLoginsFor(t, dc, user)
		if got == n {
			return
		}
		if got > n || time.Now().After(deadline) {
			t.Fatalf("Dovecot logged %d logins of %s, want %d", got, user, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// loggedOutRE matches the imap process's line for a session of user that
// ended with LOGOUT.
func loggedOutRE(user string) *regexp.Regexp {
	return regexp.MustCompile(`(?m) imap\(` + regexp.QuoteMeta(user) + `\)<[^>]*><[^>]*>: Info: (?:Disconnected: )?Logged out `)
}

var subjectRE = regexp.MustCompile(`Subject: (?:msg|big) \d+ for (\S+)`)

// inboxOwners selects INBOX and returns the user named in each message's
// Subject.
func inboxOwners(t testing.TB, c *testkit.Client) []string {
	t.Helper()
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT INBOX: %s", res)
	}
	res := c.Cmd("UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
	if !res.OK() {
		t.Fatalf("FETCH: %s", res)
	}
	var owners []string
	for _, l := range res.Untagged {
		for _, m := range subjectRE.FindAllStringSubmatch(l, -1) {
			owners = append(owners, m[1])
		}
	}
	return owners
}

func checkOwners(t testing.TB, owners []string, user string, n int) {
	t.Helper()
	if len(owners) != n {
		t.Fatalf("%s sees %d messages (%q), want %d", user, len(owners), owners, n)
	}
	for _, o := range owners {
		if o != user {
			t.Fatalf("%s sees a message of %s: %q", user, o, owners)
		}
	}
}

func TestUserIsolation(t *testing.T) {
	t.Parallel()
	const msgs = 4
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: msgs})
	a, b := dovecottest.UserName(1), dovecottest.UserName(2)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	c := testkit.Dial(t, p.addr)
	c.MustLogin(a, dc.PasswordOf(a))
	checkOwners(t, inboxOwners(t, c), a, msgs)
	c.Logout()
	p.waitCached(t, 1)

	cases := []struct {
		name   string
		pass   string
		wantOK bool
	}{
		{"B with A's password", dc.PasswordOf(a), false},
		{"B with its own password", dc.PasswordOf(b), true},
		{"B again with its own password", dc.PasswordOf(b), true},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			res := c.Login(b, tc.pass)
			if res.OK() != tc.wantOK {
				t.Fatalf("LOGIN %s: %s", b, res)
			}
			// Only B's own connection (cached by the case before) may
			// be reused.
			wantReuse := i == 2
			if reused := res.Has("XPROXYREUSE"); reused != wantReuse {
				t.Fatalf("LOGIN %s: XPROXYREUSE = %v, want %v\n%s", b, reused, wantReuse, res)
			}
			if !tc.wantOK {
				return
			}
			checkOwners(t, inboxOwners(t, c), b, msgs)
			c.Logout()
			p.waitCached(t, 2) // A's and B's
		})
	}
	users := p.srv.Pool().Table(dc.Name).Users()
	if users[a] != 1 || users[b] != 1 || len(users) != 2 {
		t.Errorf("cached per user = %v, want %s:1 %s:1", users, a, b)
	}
}

// TestUserIsolationStress has two users log in, read their INBOX and log
// out many times at once through one proxy: every session must see only
// its own user's messages, and every reuse the clients saw is a pool hit.
func TestUserIsolationStress(t *testing.T) {
	t.Parallel()
	const (
		msgs       = 3
		users      = 2
		workers    = 3
		iterations = 100
	)
	dc := dovecottest.StartT(t, dovecottest.Options{Users: users, Messages: msgs})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	var reused, sessions atomic.Int64
	t.Run("workers", func(t *testing.T) {
		for u := 1; u <= users; u++ {
			user := dovecottest.UserName(u)
			pass := dc.PasswordOf(user)
			for w := 0; w < workers; w++ {
				t.Run(fmt.Sprintf("%s-%d", user, w), func(t *testing.T) {
					t.Parallel()
					for i := 0; i < iterations; i++ {
						c := testkit.Dial(t, p.addr)
						res := c.MustLogin(user, pass)
						if res.Has("[XPROXYREUSE]") {
							reused.Add(1)
						}
						sessions.Add(1)
						checkOwners(t, inboxOwners(t, c), user, msgs)
						c.Logout()
					}
				})
			}
		}
	})
	if t.Failed() {
		return
	}
	p.waitIdle(t)
	st := p.srv.Pool().Stats()
	if n := reused.Load(); n == 0 || uint64(n) != st.Hits {
		t.Errorf("clients saw %d reused connections, pool hits = %d; want equal and > 0", n, st.Hits)
	}
	if st.Hits+st.Misses != uint64(sessions.Load()) {
		t.Errorf("pool hits %d + misses %d != %d logins", st.Hits, st.Misses, sessions.Load())
	}
	if st.Open != st.Cached {
		t.Errorf("after all sessions ended: open = %d, cached = %d; want equal", st.Open, st.Cached)
	}
	logins, err := dc.WaitLogins(int(st.Misses), logWait)
	if err != nil || uint64(logins) != st.Misses {
		t.Errorf("Dovecot saw %d logins (err %v), want one per pool miss (%d)", logins, err, st.Misses)
	}
}

// dialSmallWindow connects with a small receive buffer, so that a large
// response stalls in the proxy rather than landing in the client's kernel
// buffer.
func dialSmallWindow(t testing.TB, addr string) *testkit.Client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8192)
		}); err != nil {
			return err
		}
		return serr
	}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c := testkit.NewClient(t, conn)
	c.Greeting = c.ReadLine()
	return c
}

// TestNotCachedWhenDirty ends sessions in states that a fresh login would
// not give, and a few that it would: only the latter may be cached.
func TestNotCachedWhenDirty(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		dial func(t testing.TB, addr string) *testkit.Client
		// run drives a logged-in session and ends it.
		run    func(t *testing.T, c *testkit.Client)
		cached bool
	}{
		{"dropped mid-FETCH", dialSmallWindow, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT Big"); !res.OK() {
				t.Fatalf("SELECT Big: %s", res)
			}
			// About 6 MiB: more than the proxy's socket buffers hold.
			c.Send("f1 FETCH 1:* (BODY.PEEK[] BODY.PEEK[TEXT])\r\n")
			if l := c.ReadLine(); !regexp.MustCompile(`^\* 1 FETCH .*\{\d+\}$`).MatchString(l) {
				t.Fatalf("FETCH: first line %q", l)
			}
			c.NetConn.Close()
		}, false},
		{"dropped in IDLE", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			c.Send("i1 IDLE\r\n")
			if l := c.ReadLine(); l != "+ idling" {
				t.Fatalf("IDLE: got %q, want + idling", l)
			}
			c.NetConn.Close()
		}, false},
		{"ENABLE CONDSTORE", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("ENABLE CONDSTORE"); !res.OK() || !res.Has("* ENABLED CONDSTORE") {
				t.Fatalf("ENABLE: %s", res)
			}
			c.Logout()
		}, false},
		{"SELECT with CONDSTORE", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX (CONDSTORE)"); !res.OK() || !res.Has("HIGHESTMODSEQ") {
				t.Fatalf("SELECT (CONDSTORE): %s", res)
			}
			c.Logout()
		}, false},
		{"FETCH MODSEQ", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			if res := c.Cmd("FETCH 1 (FLAGS MODSEQ)"); !res.OK() || !res.Has("MODSEQ (") {
				t.Fatalf("FETCH MODSEQ: %s", res)
			}
			c.Logout()
		}, false},
		{"dropped mid-APPEND literal", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			c.Send("a1 APPEND INBOX {100}\r\n")
			c.ExpectContinuation()
			c.Send("Subject: half\r\n\r\nonly part of the literal")
			c.NetConn.Close()
		}, false},
		{"SEARCH RETURN (SAVE)", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			if res := c.Cmd("SEARCH RETURN (SAVE) ALL"); !res.OK() {
				t.Fatalf("SEARCH SAVE: %s", res)
			}
			c.Logout()
		}, false},
		{"NOTIFY SET", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("NOTIFY SET (selected (MessageNew MessageExpunge))"); !res.OK() {
				t.Fatalf("NOTIFY: %s", res)
			}
			c.Logout()
		}, false},
		{"pipelined commands then LOGOUT", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			c.Send("p1 SELECT INBOX\r\np2 FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\np3 NOOP\r\np4 LOGOUT\r\n")
			for _, tag := range []string{"p1", "p2", "p3"} {
				if res := c.ReadResponse(tag); !res.OK() {
					t.Fatalf("%s: %s", tag, res)
				}
			}
			if res := c.ReadResponse("p4"); !res.OK() || !res.Has("* BYE") {
				t.Fatalf("LOGOUT: %s", res)
			}
		}, true},
		{"IDLE ended with DONE", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			c.Send("i1 IDLE\r\n")
			if l := c.ReadLine(); l != "+ idling" {
				t.Fatalf("IDLE: got %q, want + idling", l)
			}
			c.Send("DONE\r\n")
			if res := c.ReadResponse("i1"); !res.OK() {
				t.Fatalf("IDLE: %s", res)
			}
			c.Logout()
		}, true},
		{"closed at a command boundary", testkit.Dial, func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			if res := c.Cmd("FETCH 1:* FLAGS"); !res.OK() {
				t.Fatalf("FETCH: %s", res)
			}
			c.NetConn.Close()
		}, true},
	}
	dc := dovecottest.StartT(t, dovecottest.Options{Users: len(cases), Messages: 3, BigMessages: 3})
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			pass := dc.PasswordOf(user)
			p := startProxy(t, []*dovecottest.Server{dc}, nil)
			c := tc.dial(t, p.addr)
			c.MustLogin(user, pass)
			tc.run(t, c)
			p.waitIdle(t)

			want := 0
			if tc.cached {
				want = 1
			}
			if st := p.srv.Pool().Stats(); st.Cached != want || st.Open != want {
				t.Fatalf("after the session: cached = %d, open = %d; want %d and %d", st.Cached, st.Open, want, want)
			}
			waitLoginsFor(t, dc, user, 1)

			c = testkit.Dial(t, p.addr)
			res := c.MustLogin(user, pass)
			if reused := res.Has("[XPROXYREUSE]"); reused != tc.cached {
				t.Fatalf("next login: XPROXYREUSE = %v, want %v", reused, tc.cached)
			}
			// Whatever came before, the next session starts unselected.
			if res := c.Cmd("FETCH 1 FLAGS"); res.OK() {
				t.Fatalf("FETCH without SELECT in the next session: %s", res)
			}
			c.Logout()
			p.waitCached(t, 1)
			waitLoginsFor(t, dc, user, 2-want)
		})
	}
}

// TestSelectedMailboxDoesNotLeak: a session that logged out with a mailbox
// selected hands on a connection that is unselected, with nothing left
// unread.
func TestSelectedMailboxDoesNotLeak(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 3, BigMessages: 1})
	cases := []struct {
		name    string
		session func(t *testing.T, c *testkit.Client)
	}{
		{"SELECT INBOX", func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() || !res.Has("* 3 EXISTS") {
				t.Fatalf("SELECT: %s", res)
			}
		}},
		{"EXAMINE Big after a STORE", func(t *testing.T, c *testkit.Client) {
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			if res := c.Cmd(`STORE 1 +FLAGS (\Flagged)`); !res.OK() {
				t.Fatalf("STORE: %s", res)
			}
			if res := c.Cmd("EXAMINE Big"); !res.OK() || !res.Has("* 1 EXISTS") {
				t.Fatalf("EXAMINE: %s", res)
			}
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			pass := dc.PasswordOf(user)
			p := startProxy(t, []*dovecottest.Server{dc}, nil)
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, pass)
			tc.session(t, c)
			c.Logout()
			p.waitCached(t, 1)

			c = testkit.Dial(t, p.addr)
			res := c.MustLogin(user, pass)
			want := "* OK [XPROXYREUSE] IMAP connection reused by imapproxy"
			if len(res.Untagged) != 1 || res.Untagged[0] != want {
				t.Fatalf("reused login: untagged lines %q, want exactly %q", res.Untagged, want)
			}
			if res := c.Cmd("NOOP"); !res.OK() || len(res.Untagged) != 0 {
				t.Fatalf("NOOP on the reused connection: got %q, want a bare tagged OK", res)
			}
			res = c.Cmd("FETCH 1 FLAGS")
			if !regexp.MustCompile(`^t\d+ (BAD|NO) `).MatchString(res.Tagged) || len(res.Untagged) != 0 {
				t.Fatalf("FETCH with no mailbox selected: got %q, want a bare BAD or NO", res)
			}
			if res := c.Cmd("SELECT INBOX"); !res.OK() || !res.Has("* 3 EXISTS") {
				t.Fatalf("SELECT on the reused connection: %s", res)
			}
			if res := c.Cmd("FETCH 1 FLAGS"); !res.OK() || !res.Has("* 1 FETCH") {
				t.Fatalf("FETCH after SELECT: %s", res)
			}
			c.Logout()
			waitLoginsFor(t, dc, user, 1)
		})
	}
}

// TestCachedConnKilledByServer: Dovecot ends the session of a cached
// connection; the next login must notice, close it and log in afresh.
func TestCachedConnKilledByServer(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 2})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	t.Run("active session", func(t *testing.T) {
		// The client sees the server's goodbye, and the connection
		// is not cached.
		user := dovecottest.UserName(2)
		c := testkit.Dial(t, p.addr)
		c.MustLogin(user, dc.PasswordOf(user))
		if res := c.Cmd("SELECT INBOX"); !res.OK() {
			t.Fatalf("SELECT: %s", res)
		}
		if err := dc.Kick(user); err != nil {
			t.Fatalf("Kick: %v", err)
		}
		lines := c.ReadToEOF()
		if len(lines) == 0 || !strings.HasPrefix(lines[0], "* BYE") {
			t.Fatalf("client of a kicked session got %q, want * BYE and close", lines)
		}
		p.waitIdle(t)
		if st := p.srv.Pool().Stats(); st.Cached != 0 || st.Open != 0 {
			t.Fatalf("after the kicked session: cached = %d, open = %d; want 0, 0", st.Cached, st.Open)
		}
	})

	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	c.Logout()
	p.waitCached(t, 1)
	waitLoginsFor(t, dc, user, 1)
	deadBefore := p.srv.Pool().Stats().ClosedDead

	if err := dc.Kick(user); err != nil {
		t.Fatalf("Kick: %v", err)
	}
	// The kicked imap process logged its end, and it was no logout.
	ended := regexp.MustCompile(`(?m) imap\(` + user + `\)<[^>]*><[^>]*>: Info: .*in=\d+ out=\d+`)
	if n := waitLogCount(dc, ended, 1); n != 1 {
		t.Fatalf("Dovecot logged %d ends of %s's session after Kick, want 1:\n%s", n, user, dc.Log())
	}
	if n := len(loggedOutRE(user).FindAllString(dc.Log(), -1)); n != 0 {
		t.Fatalf("the kicked session logged %d clean logouts, want 0", n)
	}

	c = testkit.Dial(t, p.addr)
	res := c.MustLogin(user, pass)
	if res.Has("XPROXYREUSE") {
		t.Fatalf("login after Kick reused the dead connection:\n%s", res)
	}
	if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 2") {
		t.Fatalf("STATUS: %s", res)
	}
	waitLoginsFor(t, dc, user, 2)
	if st := p.srv.Pool().Stats(); st.ClosedDead-deadBefore != 1 || st.ClosedDead != 1 || st.Cached != 0 || st.Open != 1 {
		t.Errorf("stats after the dead connection: closed dead = %d, cached = %d, open = %d; want 1, 0, 1", st.ClosedDead, st.Cached, st.Open)
	}
	c.Logout()
	p.waitCached(t, 1)
}

// TestSweeper runs sweeper passes "in the future" instead of waiting:
// expired and too old connections are logged out and closed, younger ones
// stay and are reused.
func TestSweeper(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name        string
		opts        pool.Options
		after       time.Duration // Sweep(now + after)
		wantExpired uint64
		wantMaxAge  uint64
	}{
		{"idle within expiration", pool.Options{}, 299 * time.Second, 0, 0},
		{"expired", pool.Options{}, 301 * time.Second, 1, 0},
		{"expired, shorter expiration", pool.Options{Expiration: 10 * time.Second}, 11 * time.Second, 1, 0},
		{"max age", pool.Options{MaxAge: 10 * time.Minute, Expiration: time.Hour}, 11 * time.Minute, 0, 1},
		{"max age before expiration", pool.Options{MaxAge: 10 * time.Minute}, 11 * time.Minute, 0, 1},
	}
	dc := dovecottest.StartT(t, dovecottest.Options{Users: len(cases), Messages: 1})
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			pass := dc.PasswordOf(user)
			p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) {
				po := tc.opts
				po.Logger = o.Logger.Named("pool")
				o.Pool = pool.New(po)
			})
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, pass)
			c.Logout()
			p.waitCached(t, 1)
			waitLoginsFor(t, dc, user, 1)
			outRE := loggedOutRE(user)
			if n := len(outRE.FindAllString(dc.Log(), -1)); n != 0 {
				t.Fatalf("Dovecot logged %d logouts of %s while it is cached", n, user)
			}

			p.srv.Pool().Sweep(time.Now().Add(tc.after))
			p.settle(t)
			st := p.srv.Pool().Stats()
			if st.ClosedExpired != tc.wantExpired || st.ClosedMaxAge != tc.wantMaxAge {
				t.Fatalf("Sweep(now+%v): closed expired = %d, max age = %d; want %d, %d", tc.after, st.ClosedExpired, st.ClosedMaxAge, tc.wantExpired, tc.wantMaxAge)
			}
			closed := int(tc.wantExpired + tc.wantMaxAge)
			if st.Cached != 1-closed || st.Open != 1-closed {
				t.Fatalf("after the sweep: cached = %d, open = %d; want %d", st.Cached, st.Open, 1-closed)
			}
			if closed == 1 {
				// Closed with a LOGOUT, not dropped.
				if n := waitLogCount(dc, outRE, 1); n != 1 {
					t.Fatalf("Dovecot logged %d logouts of %s after the sweep, want 1:\n%s", n, user, dc.Log())
				}
			}

			c = testkit.Dial(t, p.addr)
			res := c.MustLogin(user, pass)
			if reused := res.Has("[XPROXYREUSE]"); reused != (closed == 0) {
				t.Fatalf("login after the sweep: XPROXYREUSE = %v, want %v", reused, closed == 0)
			}
			c.Logout()
			p.waitCached(t, 1)
			waitLoginsFor(t, dc, user, 1+closed)
		})
	}
	t.Run("max age shorter than a session", func(t *testing.T) {
		// The connection is too old by the time the client logs out:
		// it is never cached.
		user := dovecottest.UserName(1)
		logs := hclog.NewNullLogger()
		p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) {
			o.Pool = pool.New(pool.Options{MaxAge: time.Nanosecond, Logger: logs})
		})
		before := countLoginsFor(t, dc, user)
		for i := 0; i < 2; i++ {
			c := testkit.Dial(t, p.addr)
			if res := c.MustLogin(user, dc.PasswordOf(user)); res.Has("XPROXYREUSE") {
				t.Fatalf("login %d reused a connection older than max age", i)
			}
			c.Logout()
			p.waitIdle(t)
		}
		p.settle(t)
		if st := p.srv.Pool().Stats(); st.Cached != 0 || st.Open != 0 || st.ClosedMaxAge != 2 {
			t.Fatalf("cached = %d, open = %d, closed max age = %d; want 0, 0, 2", st.Cached, st.Open, st.ClosedMaxAge)
		}
		waitLoginsFor(t, dc, user, before+2)
	})
}

// TestPoolLimits: the per-user limit pushes out a user's oldest cached
// connection, and the global budget refuses a login when every connection
// is busy and pushes out a cached one when one is idle.
func TestPoolLimits(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 3, Messages: 1})
	withPool := func(po pool.Options) func(*Options) {
		return func(o *Options) {
			po.Logger = o.Logger.Named("pool")
			o.Pool = pool.New(po)
		}
	}
	t.Run("per user", func(t *testing.T) {
		user := dovecottest.UserName(1)
		pass := dc.PasswordOf(user)
		p := startProxy(t, []*dovecottest.Server{dc}, withPool(pool.Options{MaxPerUser: 2}))
		var cs []*testkit.Client
		for i := 0; i < 3; i++ {
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, pass)
			cs = append(cs, c)
		}
		for i, c := range cs {
			c.Logout()
			p.waitCached(t, min(i+1, 2))
		}
		p.waitIdle(t)
		p.settle(t)
		if st := p.srv.Pool().Stats(); st.Cached != 2 || st.Open != 2 || st.ClosedUserLimit != 1 {
			t.Fatalf("cached = %d, open = %d, closed by user limit = %d; want 2, 2, 1", st.Cached, st.Open, st.ClosedUserLimit)
		}
		if n := waitLogCount(dc, loggedOutRE(user), 1); n != 1 {
			t.Fatalf("Dovecot logged %d logouts of %s, want 1 (the pushed out connection)", n, user)
		}
	})
	t.Run("global budget", func(t *testing.T) {
		a, b, c3 := dovecottest.UserName(2), dovecottest.UserName(3), dovecottest.UserName(1)
		p := startProxy(t, []*dovecottest.Server{dc}, withPool(pool.Options{MaxConns: 2}))
		ca := testkit.Dial(t, p.addr)
		ca.MustLogin(a, dc.PasswordOf(a))
		cb := testkit.Dial(t, p.addr)
		cb.MustLogin(b, dc.PasswordOf(b))

		cc := testkit.Dial(t, p.addr)
		res := cc.Login(c3, dc.PasswordOf(c3))
		if !strings.Contains(res.Tagged, " NO [UNAVAILABLE]") {
			t.Fatalf("login over the budget with every connection busy: got %q, want NO [UNAVAILABLE]", res)
		}
		// Once a's connection is cached, c's login pushes it out.
		ca.Logout()
		p.waitCached(t, 1)
		cc.MustLogin(c3, dc.PasswordOf(c3))
		if st := p.srv.Pool().Stats(); st.Cached != 0 || st.Open != 2 || st.ClosedFull != 1 {
			t.Fatalf("cached = %d, open = %d, closed for room = %d; want 0, 2, 1", st.Cached, st.Open, st.ClosedFull)
		}
		cb.Logout()
		cc.Logout()
		p.waitCached(t, 2)
	})
}
