package proxy

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// waitDrains waits until no drain timer is pending: those scheduled have
// fired and done what they do.
func (p *testProxy) waitDrains(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.srv.mu.Lock()
		n := len(p.srv.drains)
		p.srv.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d drain timers still pending", n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (p *testProxy) pendingDrains() int {
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	return len(p.srv.drains)
}

// TestWeightChangeKeepsBackend: a backend whose weight changes has not
// left: its cached connections stay, its sessions go on, and only the
// ranking of users changes. Before, the change was taken as the backend
// leaving and coming back: cache flushed, sessions BYE after the drain.
func TestWeightChangeKeepsBackend(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, func(o *Options) { o.BackendDrain = 20 * time.Millisecond })
	set := []Backend{{ID: "b0", Addr: a.addr(), Weight: 1}, {ID: "b1", Addr: b.addr(), Weight: 1}}
	user := p.userOn(t, "b0")
	active := testkit.Dial(t, p.addr)
	active.MustLogin(user, "secret")
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, "secret")
	c.Logout()
	p.waitCached(t, 1)

	users := make([]string, 300)
	before := map[string]string{}
	for i := range users {
		users[i] = "u" + strconv.Itoa(i)
		bk, _ := p.srv.backends.Load().Ring().Pick(users[i])
		before[users[i]] = bk.ID
	}

	set[0].Weight = 5
	p.srv.SetBackends(set)

	if n := p.pendingDrains(); n != 0 {
		t.Errorf("%d drains scheduled for a weight change", n)
	}
	p.settle(t)
	if st := p.srv.Pool().Stats(); st.Cached != 1 || st.ClosedBackendGone != 0 {
		t.Errorf("pool after the weight change = %+v, want the cached connection kept", st)
	}
	if n := a.logouts.Load(); n != 0 {
		t.Errorf("backend LOGOUTs = %d, want 0", n)
	}
	moved := 0
	for _, u := range users {
		bk, _ := p.srv.backends.Load().Ring().Pick(u)
		if bk.ID != before[u] {
			if bk.ID != "b0" {
				t.Fatalf("%s moved from %s to %s when b0 got heavier", u, before[u], bk.ID)
			}
			moved++
		}
	}
	if moved == 0 {
		t.Error("no user moved to the heavier backend: the ring was not re-ranked")
	}
	if w := p.srv.Backends()[0].Weight; w != 5 {
		t.Errorf("b0's weight = %d, want 5", w)
	}
	if res := active.Cmd("NOOP"); !res.OK() {
		t.Errorf("the session on b0 after the weight change: %s", res)
	}
	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, "secret"); !res.Has("XPROXYREUSE") {
		t.Errorf("the next login did not reuse the cached connection: %s", res)
	}
}

// TestHeldBackendKeepsSessions: a backend that left and came back while
// discovery holds it back (rejoin_hold) is healthy: its sessions are not
// ended when the drain time runs out, though new logins go elsewhere.
// Once it leaves for real, its sessions drain.
func TestHeldBackendKeepsSessions(t *testing.T) {
	a, b := newFakeBackend(t), newFakeBackend(t)
	p := startClusterProxy(t, []string{a.addr(), b.addr()}, func(o *Options) { o.BackendDrain = 50 * time.Millisecond })
	b0 := Backend{ID: "b0", Addr: a.addr(), Weight: 1}
	b1 := Backend{ID: "b1", Addr: b.addr(), Weight: 1}
	user := p.userOn(t, "b0")
	active := testkit.Dial(t, p.addr)
	active.MustLogin(user, "secret")

	p.srv.SetBackends([]Backend{b1})                    // b0 leaves: a drain is scheduled
	p.srv.SetBackendsHeld([]Backend{b1}, []Backend{b0}) // and is back, held
	p.waitDrains(t)
	if res := active.Cmd("NOOP"); !res.OK() {
		t.Fatalf("the session on the held backend after the drain time: %s", res)
	}
	if n := p.srv.Stats().BackendsDrained; n != 0 {
		t.Errorf("sessions drained = %d, want 0", n)
	}
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, "secret")
	if b.logins.Load() != 1 {
		t.Errorf("logins on b1 = %d, want 1: a held backend takes no new login", b.logins.Load())
	}
	var held bool
	for _, bi := range p.srv.BackendStatus() {
		if bi.ID == "b0" {
			held = bi.Held && !bi.Drained
		}
	}
	if !held {
		t.Errorf("BackendStatus does not show b0 as held: %+v", p.srv.BackendStatus())
	}

	p.srv.SetBackends([]Backend{b1}) // b0 leaves for real
	if got := active.ReadLine(); !strings.HasPrefix(got, "* BYE [UNAVAILABLE]") {
		t.Fatalf("the session on b0 after it left got %q, want BYE", got)
	}
}
