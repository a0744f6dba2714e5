package proxy

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/upstream"
)

// backendInfo returns the BackendStatus entry of id.
func (p *testProxy) backendInfo(t *testing.T, id string) BackendInfo {
	t.Helper()
	for _, bi := range p.srv.BackendStatus() {
		if bi.ID == id {
			return bi
		}
	}
	t.Fatalf("BackendStatus has no %s: %+v", id, p.srv.BackendStatus())
	return BackendInfo{}
}

// TestDrainBackend: a drain sends the backend's users' new logins to their
// next backend and closes its cached connections, while a session already
// on it goes on working and, when it ends, caches nothing; an undrain gives
// the users back to it.
func TestDrainBackend(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	user := p.userOn(t, "b0")

	active := testkit.Dial(t, p.addr)
	active.MustLogin(user, "secret")
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, "secret")
	c.Logout()
	p.waitCached(t, 1)

	if err := p.srv.DrainBackend("b0"); err != nil {
		t.Fatalf("DrainBackend(b0): %v", err)
	}
	p.settle(t)
	if n := a.logouts.Load(); n != 1 {
		t.Errorf("backend LOGOUTs after the drain = %d, want 1 (the cached connection)", n)
	}
	if n := p.srv.Pool().Stats().Cached; n != 0 {
		t.Errorf("cached after the drain = %d, want 0", n)
	}
	bi := p.backendInfo(t, "b0")
	if !bi.Drained || bi.Active != 1 || bi.Cached != 0 {
		t.Errorf("b0 after the drain = %+v, want drained, 1 active, 0 cached", bi)
	}
	if got := p.srv.UserInfo(user); got.Backend != "b1" || got.Order[0] != (Choice{ID: "b0", Drained: true}) {
		t.Errorf("UserInfo(%q) = backend %q, order %+v; want b1 with b0 first and drained", user, got.Backend, got.Order)
	}
	if got := p.srv.Backends(); len(got) != 1 || got[0].ID != "b1" {
		t.Errorf("Backends() = %+v, want only b1 in service", got)
	}

	if res := active.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("the session on the drained backend stopped working: %s", res)
	}
	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, "secret"); res.Has("XPROXYREUSE") {
		t.Fatal("a login reused a connection after the drain")
	}
	if b.logins.Load() != 1 {
		t.Fatalf("logins on the next backend = %d, want 1", b.logins.Load())
	}
	c.Logout()
	p.waitCached(t, 1) // on b1
	active.Logout()
	p.waitSessions(t, 0)
	if bi := p.backendInfo(t, "b0"); bi.Cached != 0 || bi.Active != 0 {
		t.Errorf("b0 after its last session = %+v, want nothing cached, nothing active", bi)
	}
	if n := p.srv.Pool().Stats().Cached; n != 1 {
		t.Errorf("cached = %d, want 1: the session on the drained backend must not cache", n)
	}

	if err := p.srv.UndrainBackend("b0"); err != nil {
		t.Fatalf("UndrainBackend(b0): %v", err)
	}
	before := a.logins.Load()
	c = testkit.Dial(t, p.addr)
	c.MustLogin(user, "secret")
	if a.logins.Load() != before+1 {
		t.Fatal("the user did not go back to its backend after the undrain")
	}
	c.Logout()
	p.waitCached(t, 2)
	if bi := p.backendInfo(t, "b0"); bi.Drained || bi.Cached != 1 {
		t.Errorf("b0 after the undrain = %+v, want in service with 1 cached", bi)
	}
}

// TestDrainSurvivesSetBackends: discovery's later sets keep a drained
// backend drained while it is in them; one that leaves the set comes back
// in service.
func TestDrainSurvivesSetBackends(t *testing.T) {
	a, b, c := newFakeBackend(t), newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	set := []Backend{{ID: "b0", Addr: a.addr(), Weight: 1}, {ID: "b1", Addr: b.addr(), Weight: 1}}
	user := p.userOn(t, "b0")

	if err := p.srv.DrainBackend("b0"); err != nil {
		t.Fatal(err)
	}
	if err := p.srv.DrainBackend("b0"); err != nil {
		t.Errorf("second DrainBackend(b0) = %v, want nil", err)
	}
	steps := []struct {
		name    string
		set     []Backend
		drained bool
		onB0    bool // the user's logins go to b0
	}{
		{"same set again", set, true, false},
		{"a backend added", append(slices.Clone(set), Backend{ID: "b2", Addr: c.addr(), Weight: 1}), true, false},
		{"its weight changed", []Backend{{ID: "b0", Addr: a.addr(), Weight: 3}, set[1]}, true, false},
		{"it left", set[1:], false, false},
		{"it came back", set, false, true},
	}
	for _, st := range steps {
		p.srv.SetBackends(st.set)
		var drained, inSet bool
		for _, bi := range p.srv.BackendStatus() {
			if bi.ID == "b0" {
				inSet, drained = true, bi.Drained
			}
		}
		if drained != st.drained {
			t.Errorf("%s: b0 drained = %v (in set %v), want %v", st.name, drained, inSet, st.drained)
		}
		if got := p.srv.UserInfo(user).Backend; (got == "b0") != st.onB0 {
			t.Errorf("%s: %s's logins go to %q, want b0: %v", st.name, user, got, st.onB0)
		}
	}
}

func TestDrainErrors(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	if err := p.srv.DrainBackend("nope"); !errors.Is(err, ErrUnknownBackend) {
		t.Errorf("DrainBackend(nope) = %v, want ErrUnknownBackend", err)
	}
	if err := p.srv.UndrainBackend("nope"); !errors.Is(err, ErrUnknownBackend) {
		t.Errorf("UndrainBackend(nope) = %v, want ErrUnknownBackend", err)
	}
	if err := p.srv.UndrainBackend("b0"); err != nil {
		t.Errorf("UndrainBackend of a backend in service = %v, want nil", err)
	}
	if err := p.srv.DrainBackend("b0"); err != nil {
		t.Fatal(err)
	}
	if err := p.srv.DrainBackend("b1"); !errors.Is(err, ErrLastBackend) {
		t.Errorf("draining the last backend in service = %v, want ErrLastBackend", err)
	}
	if len(p.srv.Backends()) != 1 {
		t.Errorf("the refused drain took a backend out: %+v", p.srv.Backends())
	}
}

// TestKickUser against Dovecot: the user's session gets the BYE and is
// closed, the user's cached connection is logged out, other users keep
// theirs, and the user's next login is a fresh one.
func TestKickUser(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 2, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	user, other := dovecottest.UserName(1), dovecottest.UserName(2)

	active := testkit.Dial(t, p.addr)
	active.MustLogin(user, dc.PasswordOf(user))
	if res := active.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	for _, u := range []string{user, other} {
		c := testkit.Dial(t, p.addr)
		c.MustLogin(u, dc.PasswordOf(u))
		c.Logout()
	}
	p.waitCached(t, 2)

	sessions, cached := p.srv.KickUser(user)
	if sessions != 1 || cached != 1 {
		t.Fatalf("KickUser(%s) = %d sessions, %d cached; want 1, 1", user, sessions, cached)
	}
	lines := active.ReadToEOF()
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE [UNAVAILABLE]") {
		t.Fatalf("kicked client got %q, want one BYE [UNAVAILABLE] and EOF", lines)
	}
	p.waitSessions(t, 0)
	if n := p.srv.Pool().Stats().Cached; n != 1 {
		t.Errorf("cached after the kick = %d, want 1 (the other user's)", n)
	}
	if ui := p.srv.UserInfo(user); len(ui.Sessions) != 0 || len(ui.Cached) != 0 {
		t.Errorf("UserInfo after the kick = %+v, want no sessions, nothing cached", ui)
	}
	if ui := p.srv.UserInfo(other); len(ui.Cached) != 1 {
		t.Errorf("the other user's cache = %+v, want 1 connection", ui.Cached)
	}
	c := testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, dc.PasswordOf(user)); res.Has("XPROXYREUSE") {
		t.Error("the kicked user's next login reused a connection")
	}

	// A session the kick could not see (it was between its LOGOUT and
	// caching its connection) must not cache a connection authenticated
	// before the kick. Kick while c is logged in but pretend the kick
	// missed it: c's connection, born before, is then closed at LOGOUT.
	p.srv.mu.Lock()
	p.srv.kicked[user] = time.Now()
	p.srv.mu.Unlock()
	before := p.srv.Pool().Stats().Cached
	c.Logout()
	p.waitSessions(t, 0)
	if n := p.srv.Pool().Stats().Cached; n != before {
		t.Errorf("a connection authenticated before a kick was cached (%d cached, %d before)", n, before)
	}
	c = testkit.Dial(t, p.addr)
	c.MustLogin(user, dc.PasswordOf(user))
	c.Logout()
	p.waitCached(t, before+1) // one authenticated after the kick is cached again
}

// TestFlushCache closes every cached connection and leaves the cache
// working.
func TestFlushCache(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, nil)
	probeLogouts := b.logouts.Load()
	for _, u := range []string{"alice", "bob"} {
		c := testkit.Dial(t, p.addr)
		c.MustLogin(u, "secret")
		c.Logout()
	}
	p.waitCached(t, 2)
	if n := p.srv.FlushCache(); n != 2 {
		t.Fatalf("FlushCache() = %d, want 2", n)
	}
	p.settle(t)
	if n := b.logouts.Load() - probeLogouts; n != 2 {
		t.Errorf("backend LOGOUTs = %d, want 2", n)
	}
	if st := p.srv.Pool().Stats(); st.Cached != 0 || st.Open != 0 || st.ClosedAdmin != 2 {
		t.Errorf("pool after the flush = %+v", st)
	}
	c := testkit.Dial(t, p.addr)
	if res := c.MustLogin("alice", "secret"); res.Has("XPROXYREUSE") {
		t.Fatal("reused a connection after the flush")
	}
	c.Logout()
	p.waitCached(t, 1)
}

// TestUserInfo: the user's key, backend, order, cached connections and
// sessions, and nothing of the credential.
func TestUserInfo(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	const pass = "Pa55-w0rd-in-no-output"
	a.password, b.password = pass, pass
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, nil)
	user := p.userOn(t, "b1")
	mixed := strings.ToUpper(user[:1]) + user[1:]

	active := testkit.Dial(t, p.addr)
	active.MustLogin(user, pass)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	c.Logout()
	p.waitCached(t, 1)
	// Another spelling: the same backend, but its own cache entries.
	c = testkit.Dial(t, p.addr)
	c.MustLogin(mixed, pass)
	c.Logout()
	p.waitCached(t, 2)

	ui := p.srv.UserInfo(user)
	if ui.Key != user || ui.Backend != "b1" || len(ui.Order) != 2 || ui.Order[0].ID != "b1" || ui.Order[1].ID != "b0" {
		t.Errorf("UserInfo(%q) = key %q backend %q order %+v; want key %q on b1, then b0", user, ui.Key, ui.Backend, ui.Order, user)
	}
	if len(ui.Cached) != 1 || ui.Cached[0].Backend != "b1" || ui.Cached[0].Age < ui.Cached[0].Idle {
		t.Errorf("Cached = %+v, want one on b1, older than it is idle", ui.Cached)
	}
	if len(ui.Sessions) != 1 || ui.Sessions[0].Backend != "b1" || ui.Sessions[0].Client != active.NetConn.LocalAddr().String() || ui.Sessions[0].Since.IsZero() {
		t.Errorf("Sessions = %+v, want the active one on b1 from %s", ui.Sessions, active.NetConn.LocalAddr())
	}
	if mi := p.srv.UserInfo(mixed); mi.Key != user || mi.Backend != "b1" || len(mi.Cached) != 1 || len(mi.Sessions) != 0 {
		t.Errorf("UserInfo(%q) = %+v, want the same key and backend, its own one cached connection", mixed, mi)
	}

	js, err := json.Marshal(ui)
	if err != nil {
		t.Fatal(err)
	}
	d := p.srv.shared.Digest(&upstream.Credentials{User: []byte(user), Pass: []byte(pass)}, "")
	for _, secret := range []string{pass, hex.EncodeToString(d[:]), base64.StdEncoding.EncodeToString(d[:])} {
		if strings.Contains(string(js), secret) {
			t.Errorf("UserInfo JSON holds a secret (%q): %s", secret, js)
		}
	}
	bs, _ := json.Marshal(p.srv.BackendStatus())
	if strings.Contains(string(bs), pass) {
		t.Errorf("BackendStatus JSON holds the password: %s", bs)
	}
}
