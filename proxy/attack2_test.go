package proxy

// Attack tests from the second hostile review of issue 12 (branch
// review2). Each test names the finding it demonstrates; a failing test
// is a defect.

import (
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

// FINDING A (resource pinned; logins to healthy backends refused): when a
// hung backend leaves the set, RemoveTable hands its cached connections
// to the background closers, maxClosers (8) at a time, each waiting
// CloseTimeout for a LOGOUT answer that never comes, and each keeping its
// budget slot until then. n cached connections pin n slots for
// ceil(n/8)*CloseTimeout (a few hundred in a large deployment: minutes at
// the default 2s), slots Reserve cannot reclaim since they are no longer
// in any table. Meanwhile a login to a HEALTHY backend is refused with
// "Too many connections". Here: 24 cached connections, CloseTimeout 1s,
// so 3s of refusals, where the first round timing out (or the backend
// being taken out for failing) should have been enough to abort the rest.
func TestAttack2HungBackendClosesPinBudget(t *testing.T) {
	t.Parallel()
	const users, perUser = 6, 4
	hung := dovecottest.StartT(t, dovecottest.Options{Name: "hung", Users: users, Messages: 1})
	healthy := dovecottest.StartT(t, dovecottest.Options{Name: "healthy", Users: 1, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{hung}, func(o *Options) {
		o.Pool = pool.New(pool.Options{Logger: o.Logger.Named("pool"), MaxConns: users * perUser, CloseTimeout: time.Second})
	})
	for u := 1; u <= users; u++ {
		user := dovecottest.UserName(u)
		var cs []*testkit.Client
		for range perUser {
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, hung.PasswordOf(user))
			cs = append(cs, c)
		}
		for _, c := range cs {
			c.Logout()
		}
	}
	p.waitIdle(t)
	p.waitCached(t, users*perUser)

	if err := hung.Pause(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hung.Resume() })
	// Discovery takes the hung backend out and puts a healthy one in.
	p.srv.SetBackends([]Backend{{ID: healthy.Name, Addr: healthy.Addr, Weight: 1}})
	start := time.Now()

	user := dovecottest.UserName(1)
	c := testkit.Dial(t, p.addr)
	res := c.Login(user, healthy.PasswordOf(user))
	if !res.OK() {
		t.Errorf("login to the healthy backend %v after the hung one left: %s (pool: %+v)", time.Since(start).Round(time.Millisecond), res, p.srv.Pool().Stats())
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.srv.Pool().Stats().Open > 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("slots of the hung backend's cached connections held for %v", time.Since(start).Round(100*time.Millisecond))
}

// FINDING B (wrong state; cache lost for nothing): a client that ends an
// IDLE before the backend's "+ idling" reached the relay (one write
// "IDLE\r\nDONE\r\n", or DONE racing the "+") is within RFC 2177 as
// Dovecot reads it: Dovecot answers "+ idling" and then the tagged OK.
// The relay cleared idling when it passed DONE on, so the "+" that
// follows is "unexpected continuation request", the connection is marked
// dirty and never cached. Root cause: relay.continuation only accepts the
// IDLE's "+" while idling is set; it should accept it while the IDLE is
// in flight and not yet acknowledged (kindIdle entry present, !idleAcked).
func TestAttack2QuickDoneLosesCache(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	c.Send("a IDLE\r\nDONE\r\n")
	if res := c.ReadResponse("a"); !res.OK() {
		t.Fatalf("IDLE: %s", res)
	}
	c.Logout()
	p.waitIdle(t)
	if n := p.srv.Pool().Stats().Cached; n != 1 {
		t.Errorf("an IDLE ended at once, answered OK, left the connection uncached (cached = %d): %s", n, grepLog(p.logs.String(), "not caching"))
	}
}

// FINDING C (wrong state; cache lost for nothing): relay.tagged assumes a
// BAD to SELECT/EXAMINE "was not executed and changes nothing"; Dovecot
// closes the selected mailbox first ("* OK [CLOSED]") and then refuses
// bad parameters with BAD. The relay still believes a mailbox selected,
// the cleanup's UNSELECT expects OK, gets BAD, and the connection is not
// cached. (The cleanup check is what keeps this from being a leak.) Fix:
// on "* OK [CLOSED]" set selected = false, or treat a BAD to a select as
// leaving the state unknown and clean with a command whose success does
// not depend on it.
func TestAttack2SelectBadClosesMailbox(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, dc.PasswordOf(user))
	if res := c.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	res := c.Cmd("SELECT INBOX (FOO)")
	t.Logf("SELECT with a bad parameter:\n%s", res)
	c.Logout()
	p.waitIdle(t)
	if n := p.srv.Pool().Stats().Cached; n != 1 {
		t.Errorf("a session that ended unselected was not cached: %s", grepLog(p.logs.String(), "not caching"))
	}
}
