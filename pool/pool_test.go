package pool

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fakeConn is a scripted upstream connection. With hang set, Close
// blocks, as a LOGOUT to a hung backend does, until release or Abort.
type fakeConn struct {
	name    string
	dead    atomic.Bool
	checks  atomic.Int32
	hang    chan struct{} // closed to let a blocked Close return
	closeMu sync.Mutex
	closed  int
	aborted int
	abortCh chan struct{} // closed by the first Abort
}

func (c *fakeConn) Check(ctx context.Context) error {
	c.checks.Add(1)
	if c.dead.Load() {
		return errors.New("dead")
	}
	return nil
}

func (c *fakeConn) Close() error {
	if c.hang != nil {
		select {
		case <-c.hang:
		case <-c.abortedCh():
		}
	}
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	c.closed++
	return nil
}

func (c *fakeConn) abortedCh() chan struct{} {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.abortCh == nil {
		c.abortCh = make(chan struct{})
	}
	return c.abortCh
}

func (c *fakeConn) Abort() {
	ch := c.abortedCh()
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.aborted == 0 {
		close(ch)
	}
	c.aborted++
}

// isClosed reports whether the conn was closed, with or without LOGOUT.
func (c *fakeConn) isClosed() bool {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.closed > 0 || c.aborted > 0
}

func (c *fakeConn) wasAborted() bool {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.aborted > 0
}

// settle waits for the pool's background closes.
func settle(t *testing.T, p *Pool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitCloses(ctx); err != nil {
		t.Fatalf("background closes not done: %v", err)
	}
}

func digest(s string) Digest {
	var d Digest
	copy(d[:], s)
	return d
}

// put leases a slot and caches c, as a session does after a login.
func put(t *testing.T, p *Pool, tb *Table, user, pw string, c Conn) {
	t.Helper()
	l, err := tb.Lease()
	if err != nil {
		t.Fatalf("Lease: %v", err)
	}
	l.Put(user, digest(pw), c, time.Now())
}

func TestGetMatchesUserAndDigest(t *testing.T) {
	p := New(Options{})
	tb := p.Table("b1")
	a := &fakeConn{name: "a"}
	put(t, p, tb, "alice", "pw", a)

	tests := []struct {
		name, user, pw string
		hit            bool
	}{
		{"wrong password", "alice", "nope", false},
		{"other user same password", "bob", "pw", false},
		{"case differs", "Alice", "pw", false},
		{"right", "alice", "pw", true},
		{"taken already", "alice", "pw", false},
	}
	for _, tt := range tests {
		l, ok := tb.Take(context.Background(), tt.user, digest(tt.pw))
		if ok != tt.hit {
			t.Fatalf("%s: Take(%q) hit = %v, want %v", tt.name, tt.user, ok, tt.hit)
		}
		if ok && l.Conn() != a {
			t.Fatalf("%s: got %v, want the cached conn", tt.name, l.Conn())
		}
	}
	if a.isClosed() {
		t.Error("a wrong password closed the cached connection")
	}
	st := p.Stats()
	if st.Hits != 1 || st.Misses != 4 {
		t.Errorf("hits/misses = %d/%d, want 1/4", st.Hits, st.Misses)
	}
}

func TestGetNewestFirstAndSkipsDead(t *testing.T) {
	p := New(Options{})
	tb := p.Table("b1")
	old, mid, newest := &fakeConn{name: "old"}, &fakeConn{name: "mid"}, &fakeConn{name: "new"}
	for _, c := range []*fakeConn{old, mid, newest} {
		put(t, p, tb, "u", "pw", c)
	}
	newest.dead.Store(true)
	l, ok := tb.Take(context.Background(), "u", digest("pw"))
	if !ok || l.Conn() != mid {
		t.Fatalf("Take = %v, %v; want mid (newest alive)", l, ok)
	}
	if !newest.isClosed() {
		t.Error("dead connection was not closed")
	}
	if st := p.Stats(); st.ClosedDead != 1 || st.Cached != 1 || st.Open != 2 {
		t.Errorf("stats = %+v, want 1 dead closed, 1 cached, 2 open", st)
	}
}

func TestMaxPerUser(t *testing.T) {
	p := New(Options{MaxPerUser: 2})
	tb := p.Table("b1")
	cs := []*fakeConn{{name: "1"}, {name: "2"}, {name: "3"}}
	for _, c := range cs {
		put(t, p, tb, "u", "pw", c)
	}
	put(t, p, tb, "other", "pw", &fakeConn{})
	settle(t, p)
	if !cs[0].isClosed() || cs[1].isClosed() || cs[2].isClosed() {
		t.Errorf("closed = %v %v %v, want only the oldest", cs[0].isClosed(), cs[1].isClosed(), cs[2].isClosed())
	}
	if st := p.Stats(); st.Cached != 3 || st.ClosedUserLimit != 1 || st.Open != 3 {
		t.Errorf("stats = %+v", st)
	}
}

func TestReserveEvictsOldestIdle(t *testing.T) {
	p := New(Options{MaxConns: 2})
	t1, t2 := p.Table("b1"), p.Table("b2")
	first, second := &fakeConn{}, &fakeConn{}
	put(t, p, t1, "a", "pw", first)
	put(t, p, t2, "b", "pw", second)
	l1, err := t1.Lease()
	if err != nil {
		t.Fatalf("Lease with idle conns to evict: %v", err)
	}
	// At once and without LOGOUT: its slot is the caller's now, so its
	// socket must not wait for a close behind a hung backend.
	if !first.wasAborted() || second.isClosed() {
		t.Fatalf("evicted first=%v (aborted %v) second=%v, want the oldest only, aborted before Lease returned",
			first.isClosed(), first.wasAborted(), second.isClosed())
	}
	if _, err := t1.Lease(); err != nil {
		t.Fatalf("second Lease: %v", err)
	}
	// Both slots are now active: nothing to free.
	if _, err := t1.Lease(); !errors.Is(err, ErrFull) {
		t.Fatalf("Lease when all busy = %v, want ErrFull", err)
	}
	l1.Release()
	if _, err := t1.Lease(); err != nil {
		t.Fatalf("Lease after Release: %v", err)
	}
	if st := p.Stats(); st.ClosedFull != 2 || st.Open != 2 {
		t.Errorf("stats = %+v, want 2 closed for room, 2 open", st)
	}
}

func TestRemoveTableAndClose(t *testing.T) {
	p := New(Options{})
	tb := p.Table("gone")
	c := &fakeConn{}
	put(t, p, tb, "u", "pw", c)
	p.RemoveTable("gone")
	settle(t, p)
	if !c.isClosed() {
		t.Fatal("RemoveTable left a cached conn open")
	}
	// A session still holding a conn of the removed backend puts it back.
	late := &fakeConn{}
	put(t, p, tb, "u", "pw", late)
	settle(t, p)
	if !late.isClosed() {
		t.Fatal("Put to a removed table cached the conn")
	}
	other := &fakeConn{}
	put(t, p, p.Table("b2"), "u", "pw", other)
	p.Close()
	settle(t, p)
	if !other.isClosed() {
		t.Fatal("Close left a cached conn open")
	}
	if st := p.Stats(); st.Open != 0 || st.ClosedBackendGone != 3 {
		t.Errorf("stats = %+v, want 0 open, 3 closed as gone", st)
	}
}

// TestFlush: an operator's flush closes every cached connection of every
// table but, unlike RemoveTable, leaves the tables caching.
func TestFlush(t *testing.T) {
	p := New(Options{})
	t1, t2 := p.Table("b1"), p.Table("b2")
	cs := []*fakeConn{{}, {}, {}}
	put(t, p, t1, "a", "pw", cs[0])
	put(t, p, t1, "b", "pw", cs[1])
	put(t, p, t2, "a", "pw", cs[2])
	if n := p.Flush(); n != 3 {
		t.Fatalf("Flush() = %d, want 3", n)
	}
	settle(t, p)
	for i, c := range cs {
		if !c.isClosed() {
			t.Errorf("conn %d left open by Flush", i)
		}
	}
	if st := p.Stats(); st.Open != 0 || st.Cached != 0 || st.ClosedAdmin != 3 || st.ClosedBackendGone != 0 {
		t.Errorf("stats = %+v, want 0 open, 0 cached, 3 closed by admin", st)
	}
	later := &fakeConn{}
	put(t, p, t1, "a", "pw", later)
	if later.isClosed() || t1.Len() != 1 {
		t.Fatal("a table no longer caches after Flush")
	}
}

// TestCloseUser closes the user's connections in one table, by exact key,
// and nobody else's; Conns describes what is left.
func TestCloseUser(t *testing.T) {
	p := New(Options{})
	t1, t2 := p.Table("b1"), p.Table("b2")
	a1, a2, a3, bob, other := &fakeConn{}, &fakeConn{}, &fakeConn{}, &fakeConn{}, &fakeConn{}
	put(t, p, t1, "alice", "pw", a1)
	put(t, p, t1, "alice", "pw2", a2)
	put(t, p, t1, "Alice", "pw", a3)
	put(t, p, t1, "bob", "pw", bob)
	put(t, p, t2, "alice", "pw", other)

	if n := t1.CloseUser("alice"); n != 2 {
		t.Fatalf("CloseUser(alice) = %d, want 2", n)
	}
	settle(t, p)
	if !a1.isClosed() || !a2.isClosed() {
		t.Error("alice's connections left open")
	}
	if a3.isClosed() || bob.isClosed() || other.isClosed() {
		t.Error("CloseUser closed a connection of another key or table")
	}
	var users []string
	for _, ci := range t1.Conns() {
		users = append(users, ci.User)
		if ci.Born.IsZero() || ci.Since.IsZero() {
			t.Errorf("Conns: %+v lacks times", ci)
		}
	}
	if want := []string{"Alice", "bob"}; !slices.Equal(users, want) {
		t.Errorf("Conns users = %q, want %q", users, want)
	}
	if n := t1.CloseUser("alice"); n != 0 {
		t.Errorf("second CloseUser(alice) = %d, want 0", n)
	}
	if st := p.Stats(); st.Open != 3 || st.ClosedAdmin != 2 {
		t.Errorf("stats = %+v, want 3 open, 2 closed by admin", st)
	}
}

// TestTables lists the tables in name order and, unlike Table, makes none.
func TestTables(t *testing.T) {
	p := New(Options{})
	p.Table("b2")
	p.Table("b1")
	var names []string
	for _, tb := range p.Tables() {
		names = append(names, tb.Name())
	}
	if want := []string{"b1", "b2"}; !slices.Equal(names, want) {
		t.Errorf("Tables = %q, want %q", names, want)
	}
	p.RemoveTable("b1")
	if n := len(p.Tables()); n != 1 {
		t.Errorf("Tables after RemoveTable: %d, want 1", n)
	}
}

func TestDisabledClosesOnPut(t *testing.T) {
	p := New(Options{Disabled: true})
	c := &fakeConn{}
	put(t, p, p.Table("b"), "u", "pw", c)
	settle(t, p)
	if !c.isClosed() || p.Stats().Open != 0 {
		t.Fatal("disabled cache kept a connection")
	}
}

// TestSweeper runs the real sweeper goroutine on a fake clock: with a 60 s
// interval and a 300 s expiration, a connection cached at t=0 survives the
// sweep at 300 s (idle exactly 300 s) and is closed by the one at 360 s.
func TestSweeper(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{Expiration: 300 * time.Second, SweepInterval: 60 * time.Second})
		tb := p.Table("b1")
		c := &fakeConn{}
		put(t, p, tb, "u", "pw", c)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { p.Run(ctx); close(done) }()

		time.Sleep(359 * time.Second)
		synctest.Wait()
		if c.isClosed() || tb.Len() != 1 {
			t.Fatalf("closed before the sweep after expiry (t=359s)")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !c.isClosed() || tb.Len() != 0 {
			t.Fatalf("not closed by the sweep at t=360s")
		}
		if st := p.Stats(); st.ClosedExpired != 1 || st.Open != 0 {
			t.Errorf("stats = %+v", st)
		}
		cancel()
		<-done
	})
}

// TestMaxAge: a conn first authenticated longer ago than MaxAge is never
// handed out, and the sweeper closes it even while it is being used often.
func TestMaxAge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{MaxAge: time.Hour, Expiration: 300 * time.Second})
		tb := p.Table("b1")
		c := &fakeConn{}
		born := time.Now()
		l, err := tb.Lease()
		if err != nil {
			t.Fatal(err)
		}
		l.Put("u", digest("pw"), c, born)
		// Reused every 4 minutes: never idle long enough to expire.
		for i := 0; i < 14; i++ {
			time.Sleep(4 * time.Minute)
			got, ok := tb.Take(context.Background(), "u", digest("pw"))
			if !ok {
				t.Fatalf("Take at %v: miss", time.Since(born))
			}
			if !got.Born().Equal(born) {
				t.Fatalf("born = %v, want %v", got.Born(), born)
			}
			got.Put("u", digest("pw"), got.Conn(), got.Born())
		}
		time.Sleep(5 * time.Minute) // 61 minutes since born
		if _, ok := tb.Take(context.Background(), "u", digest("pw")); ok {
			t.Fatal("Take handed out a conn older than MaxAge")
		}
		synctest.Wait()
		if !c.isClosed() || p.Stats().ClosedMaxAge != 1 {
			t.Fatalf("old conn closed=%v stats=%+v", c.isClosed(), p.Stats())
		}
	})
}

func TestConcurrentGetPut(t *testing.T) {
	p := New(Options{MaxConns: 64, MaxPerUser: 8})
	tb := p.Table("b1")
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			user := []string{"a", "b"}[g%2]
			for i := 0; i < 500; i++ {
				var (
					c    Conn
					born time.Time
				)
				l, ok := tb.Take(context.Background(), user, digest(user))
				if ok {
					c, born = l.Conn(), l.Born()
				} else {
					var err error
					if l, err = tb.Lease(); err != nil {
						continue
					}
					c, born = &fakeConn{name: user}, time.Now()
				}
				if fc := c.(*fakeConn); fc.name != user {
					t.Errorf("user %s got a conn of %s", user, fc.name)
					return
				}
				l.Put(user, digest(user), c, born)
			}
		}(g)
	}
	wg.Wait()
	st := p.Stats()
	if st.Open != st.Cached || st.InUse != 0 {
		t.Errorf("open %d != cached %d, or %d leases unsettled, with no session active", st.Open, st.Cached, st.InUse)
	}
}

// nopConn is a connection whose liveness check costs nothing, so that the
// benchmark measures the table alone (the real check is one NOOP round
// trip on the network).
type nopConn struct{}

func (nopConn) Check(context.Context) error { return nil }
func (nopConn) Close() error                { return nil }
func (nopConn) Abort()                      {}

// BenchmarkCheckout is a cache hit and the put back, as a session takes
// and gives back its connection, among 1,000 users with a cached
// connection each.
func BenchmarkCheckout(b *testing.B) {
	p := New(Options{MaxConns: 4096})
	tb := p.Table("b1")
	users := make([]string, 1000)
	for i := range users {
		users[i] = "user" + strconv.Itoa(i)
		l, err := tb.Lease()
		if err != nil {
			b.Fatal(err)
		}
		l.Put(users[i], digest("pw"), nopConn{}, time.Now())
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		u := users[i%len(users)]
		l, ok := tb.Take(ctx, u, digest("pw"))
		if !ok {
			b.Fatal("miss")
		}
		l.Put(u, digest("pw"), l.Conn(), l.Born())
	}
}

// hungTable caches n connections of a backend that hangs: their Close
// blocks until release is closed or they are aborted.
func hungTable(t *testing.T, p *Pool, name string, n int) (conns []*fakeConn, release chan struct{}) {
	t.Helper()
	release = make(chan struct{})
	tb := p.Table(name)
	for i := range n {
		c := &fakeConn{name: strconv.Itoa(i), hang: release}
		put(t, p, tb, "u"+strconv.Itoa(i), "pw", c)
		conns = append(conns, c)
	}
	return conns, release
}

func countClosing(conns []*fakeConn, f func(*fakeConn) bool) int {
	n := 0
	for _, c := range conns {
		if f(c) {
			n++
		}
	}
	return n
}

// TestRemoveHungBackend: removing a backend whose connections hang in
// LOGOUT returns at once, as does removing the next backend, whose
// connection is closed without waiting for the hung ones; the hung
// backend gets at most maxClosers LOGOUTs at once; every slot comes back
// once the LOGOUTs are done.
func TestRemoveHungBackend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{})
		hung, release := hungTable(t, p, "hung", 40)
		next := &fakeConn{}
		put(t, p, p.Table("next"), "u", "pw", next)

		start := time.Now()
		p.RemoveTable("hung")
		p.RemoveTable("next")
		if d := time.Since(start); d != 0 {
			t.Fatalf("RemoveTable took %v, want no wait", d)
		}
		synctest.Wait()
		if !next.isClosed() || next.wasAborted() {
			t.Fatalf("the next backend's connection was not logged out while the hung backend's closes wait")
		}
		if st := p.Stats(); st.Closing != 40 || st.Open != 40 || st.ClosedBackendGone != 41 {
			t.Fatalf("stats = %+v, want 40 closing and open, 41 closed as gone", st)
		}

		close(release)
		synctest.Wait()
		if n := countClosing(hung, (*fakeConn).isClosed); n != 40 {
			t.Fatalf("%d of 40 connections closed after the backend answered", n)
		}
		if n := countClosing(hung, (*fakeConn).wasAborted); n != 0 {
			t.Errorf("%d connections aborted though the backend answered in time", n)
		}
		if st := p.Stats(); st.Open != 0 || st.Closing != 0 || st.CloseAborted != 0 {
			t.Errorf("stats = %+v, want nothing open or closing", st)
		}
	})
}

// TestCloseConcurrencyAndTimeout: a hung backend's LOGOUTs run at most
// maxClosers at a time, each cut short after CloseTimeout, so that all of
// them are closed within ceil(n/maxClosers) rounds of CloseTimeout.
func TestCloseConcurrencyAndTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{CloseTimeout: 2 * time.Second})
		var inClose, most atomic.Int32
		release := make(chan struct{})
		tb := p.Table("hung")
		for i := range 20 {
			c := &countingConn{fakeConn: fakeConn{hang: release}, in: &inClose, most: &most}
			put(t, p, tb, "u"+strconv.Itoa(i), "pw", c)
		}
		p.RemoveTable("hung")
		synctest.Wait()
		if n := inClose.Load(); n != maxClosers {
			t.Fatalf("%d LOGOUTs under way at once, want %d", n, maxClosers)
		}
		// Once the first LOGOUTs ran out of time the backend is known
		// not to answer: the 12 queued are aborted at once, not after
		// two more rounds, so the budget is whole again after one
		// CloseTimeout, however many were cached.
		time.Sleep(2*time.Second + time.Millisecond)
		synctest.Wait()
		if st := p.Stats(); st.Open != 0 || st.Closing != 0 || st.CloseAborted != 20 {
			t.Errorf("stats after one CloseTimeout = %+v, want all 20 aborted and closed", st)
		}
		if m := most.Load(); m > maxClosers {
			t.Errorf("up to %d LOGOUTs at once, want at most %d", m, maxClosers)
		}
		close(release)
	})
}

// TestHungBackendClosesAbort: once a backend let a LOGOUT run out of time,
// its next closes within a CloseTimeout abort at once; after that it gets
// its LOGOUT again.
func TestHungBackendClosesAbort(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{CloseTimeout: 2 * time.Second})
		release := make(chan struct{})
		defer close(release)
		tb := p.Table("slow")
		first := &fakeConn{hang: release}
		put(t, p, tb, "a", "pw", first)
		p.Flush()
		time.Sleep(2*time.Second + time.Millisecond)
		synctest.Wait()
		if !first.wasAborted() {
			t.Fatal("a LOGOUT past CloseTimeout was not aborted")
		}
		next := &fakeConn{hang: release}
		put(t, p, tb, "b", "pw", next)
		p.Flush()
		synctest.Wait() // no time passes
		if !next.wasAborted() {
			t.Fatal("a close right after a hung LOGOUT waited for its own timeout")
		}
		time.Sleep(2*time.Second + time.Millisecond)
		later := &fakeConn{}
		put(t, p, tb, "c", "pw", later)
		p.Flush()
		synctest.Wait()
		if later.wasAborted() || !later.isClosed() {
			t.Errorf("a close a CloseTimeout later: aborted %v, closed %v; want a LOGOUT", later.wasAborted(), later.isClosed())
		}
		if st := p.Stats(); st.Open != 0 {
			t.Errorf("stats %+v: slots not back", st)
		}
	})
}

type countingConn struct {
	fakeConn
	in, most *atomic.Int32
}

func (c *countingConn) Close() error {
	n := c.in.Add(1)
	for m := c.most.Load(); n > m && !c.most.CompareAndSwap(m, n); m = c.most.Load() {
	}
	defer c.in.Add(-1)
	return c.fakeConn.Close()
}

// TestShutdownHonoursDeadline: Shutdown returns by its ctx's deadline
// even though every cached connection hangs in LOGOUT; those are aborted
// and every slot is back.
func TestShutdownHonoursDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{CloseTimeout: time.Minute})
		hung, release := hungTable(t, p, "hung", 30)
		defer close(release)
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown = %v, want the deadline's error", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("Shutdown took %v, want at most its 500ms deadline", d)
		}
		if n := countClosing(hung, (*fakeConn).wasAborted); n != 30 {
			t.Errorf("%d of 30 hung connections aborted", n)
		}
		if st := p.Stats(); st.Open != 0 || st.Closing != 0 || st.CloseAborted != 30 {
			t.Errorf("stats = %+v, want nothing open, 30 aborted", st)
		}
		// A connection handed back after the deadline is aborted too.
		late := &fakeConn{hang: release}
		put(t, p, p.Table("hung"), "u", "pw", late)
		synctest.Wait()
		if !late.wasAborted() || p.Stats().Open != 0 {
			t.Errorf("a connection put after Shutdown's deadline was not aborted")
		}
	})
}

// TestShutdownWaitsForLogouts: with time enough, Shutdown returns once
// every LOGOUT is done, none aborted.
func TestShutdownWaitsForLogouts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{})
		conns := []*fakeConn{{}, {}, {}}
		for i, c := range conns {
			put(t, p, p.Table("b"), "u"+strconv.Itoa(i), "pw", c)
		}
		if err := p.Shutdown(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := countClosing(conns, (*fakeConn).isClosed); n != 3 {
			t.Fatalf("%d of 3 closed when Shutdown returned", n)
		}
		if n := countClosing(conns, (*fakeConn).wasAborted); n != 0 {
			t.Errorf("%d aborted", n)
		}
	})
}

// TestFailedCheckAborts: a cached connection that fails its check is
// aborted, not logged out, and the login goes on at once even when a
// LOGOUT on it would hang.
func TestFailedCheckAborts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{})
		tb := p.Table("b")
		release := make(chan struct{})
		defer close(release)
		c := &fakeConn{hang: release}
		c.dead.Store(true)
		put(t, p, tb, "u", "pw", c)
		start := time.Now()
		if _, ok := tb.Take(context.Background(), "u", digest("pw")); ok {
			t.Fatal("Take handed out a dead connection")
		}
		if d := time.Since(start); d != 0 {
			t.Errorf("Take took %v", d)
		}
		if !c.wasAborted() {
			t.Error("the dead connection was not aborted")
		}
		if st := p.Stats(); st.Open != 0 || st.ClosedDead != 1 {
			t.Errorf("stats = %+v, want 0 open, 1 dead", st)
		}
	})
}

// TestReserveReclaimsClosing: with the budget spent on connections whose
// LOGOUT hangs, Lease aborts one of them and takes its slot rather than
// refuse the login; sockets stay within the budget.
func TestReserveReclaimsClosing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{MaxConns: 2, CloseTimeout: time.Minute})
		release := make(chan struct{})
		defer close(release)
		tb := p.Table("hung")
		a, b := &fakeConn{hang: release}, &fakeConn{hang: release}
		put(t, p, tb, "a", "pw", a)
		put(t, p, tb, "b", "pw", b)
		p.Flush()
		synctest.Wait()
		if st := p.Stats(); st.Closing != 2 || st.Open != 2 {
			t.Fatalf("stats %+v, want 2 closing holding the budget", st)
		}
		if _, err := tb.Lease(); err != nil {
			t.Fatalf("Lease with closes under way = %v, want a reclaimed slot", err)
		}
		if n := btoi(a.wasAborted()) + btoi(b.wasAborted()); n != 1 {
			t.Fatalf("%d closes aborted, want the one whose slot was taken", n)
		}
		if st := p.Stats(); st.Open != 2 {
			t.Errorf("Open = %d after the reclaim, want 2: the budget", st.Open)
		}
		if _, err := tb.Lease(); err != nil {
			t.Fatalf("second Lease = %v", err)
		}
		if _, err := tb.Lease(); !errors.Is(err, ErrFull) {
			t.Fatalf("third Lease = %v, want ErrFull: nothing left to reclaim", err)
		}
		synctest.Wait()
		if st := p.Stats(); st.Open != 2 || st.Closing != 0 {
			t.Errorf("stats %+v, want the 2 reserved slots and nothing closing", st)
		}
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
