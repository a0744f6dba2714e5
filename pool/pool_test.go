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

// fakeConn is a scripted upstream connection.
type fakeConn struct {
	name    string
	dead    atomic.Bool
	checks  atomic.Int32
	closeMu sync.Mutex
	closed  int
}

func (c *fakeConn) Check(ctx context.Context) error {
	c.checks.Add(1)
	if c.dead.Load() {
		return errors.New("dead")
	}
	return nil
}

func (c *fakeConn) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	c.closed++
	return nil
}

func (c *fakeConn) isClosed() bool {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.closed > 0
}

func digest(s string) Digest {
	var d Digest
	copy(d[:], s)
	return d
}

// put reserves a slot and caches c, as a session does after a login.
func put(t *testing.T, p *Pool, tb *Table, user, pw string, c Conn) {
	t.Helper()
	if err := p.Reserve(); err != nil {
		t.Fatalf("Reserve: %v", err)
	}
	tb.Put(user, digest(pw), c, time.Now())
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
		c, _, ok := tb.Get(context.Background(), tt.user, digest(tt.pw))
		if ok != tt.hit {
			t.Fatalf("%s: Get(%q) hit = %v, want %v", tt.name, tt.user, ok, tt.hit)
		}
		if ok && c != a {
			t.Fatalf("%s: got %v, want the cached conn", tt.name, c)
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
	c, _, ok := tb.Get(context.Background(), "u", digest("pw"))
	if !ok || c != mid {
		t.Fatalf("Get = %v, %v; want mid (newest alive)", c, ok)
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
	if err := p.Reserve(); err != nil {
		t.Fatalf("Reserve with idle conns to evict: %v", err)
	}
	if !first.isClosed() || second.isClosed() {
		t.Fatalf("evicted first=%v second=%v, want the oldest only", first.isClosed(), second.isClosed())
	}
	if err := p.Reserve(); err != nil {
		t.Fatalf("second Reserve: %v", err)
	}
	// Both slots are now active: nothing to free.
	if err := p.Reserve(); !errors.Is(err, ErrFull) {
		t.Fatalf("Reserve when all busy = %v, want ErrFull", err)
	}
	p.Release()
	if err := p.Reserve(); err != nil {
		t.Fatalf("Reserve after Release: %v", err)
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
	if !c.isClosed() {
		t.Fatal("RemoveTable left a cached conn open")
	}
	// A session still holding a conn of the removed backend puts it back.
	late := &fakeConn{}
	put(t, p, tb, "u", "pw", late)
	if !late.isClosed() {
		t.Fatal("Put to a removed table cached the conn")
	}
	other := &fakeConn{}
	put(t, p, p.Table("b2"), "u", "pw", other)
	p.Close()
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
		if err := p.Reserve(); err != nil {
			t.Fatal(err)
		}
		tb.Put("u", digest("pw"), c, born)
		// Reused every 4 minutes: never idle long enough to expire.
		for i := 0; i < 14; i++ {
			time.Sleep(4 * time.Minute)
			got, gotBorn, ok := tb.Get(context.Background(), "u", digest("pw"))
			if !ok {
				t.Fatalf("Get at %v: miss", time.Since(born))
			}
			if !gotBorn.Equal(born) {
				t.Fatalf("born = %v, want %v", gotBorn, born)
			}
			tb.Put("u", digest("pw"), got, gotBorn)
		}
		time.Sleep(5 * time.Minute) // 61 minutes since born
		if _, _, ok := tb.Get(context.Background(), "u", digest("pw")); ok {
			t.Fatal("Get handed out a conn older than MaxAge")
		}
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
				c, born, ok := tb.Get(context.Background(), user, digest(user))
				if !ok {
					if err := p.Reserve(); err != nil {
						continue
					}
					c, born = &fakeConn{name: user}, time.Now()
				}
				if fc := c.(*fakeConn); fc.name != user {
					t.Errorf("user %s got a conn of %s", user, fc.name)
					return
				}
				tb.Put(user, digest(user), c, born)
			}
		}(g)
	}
	wg.Wait()
	st := p.Stats()
	if st.Open != st.Cached {
		t.Errorf("open %d != cached %d with no session active", st.Open, st.Cached)
	}
}

// nopConn is a connection whose liveness check costs nothing, so that the
// benchmark measures the table alone (the real check is one NOOP round
// trip on the network).
type nopConn struct{}

func (nopConn) Check(context.Context) error { return nil }
func (nopConn) Close() error                { return nil }

// BenchmarkCheckout is a cache hit and the put back, among 1,000 users
// with a cached connection each.
func BenchmarkCheckout(b *testing.B) {
	p := New(Options{MaxConns: 4096})
	tb := p.Table("b1")
	users := make([]string, 1000)
	for i := range users {
		users[i] = "user" + strconv.Itoa(i)
		if err := p.Reserve(); err != nil {
			b.Fatal(err)
		}
		tb.Put(users[i], digest("pw"), nopConn{}, time.Now())
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		u := users[i%len(users)]
		c, born, ok := tb.Get(ctx, u, digest("pw"))
		if !ok {
			b.Fatal("miss")
		}
		tb.Put(u, digest("pw"), c, born)
	}
}
