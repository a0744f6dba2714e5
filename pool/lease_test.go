package pool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"testing/synctest"
	"time"
)

// checkBudget fails unless the pool, with its background closes done,
// counts open what it should: the cached connections and the leases.
func checkBudget(t *testing.T, p *Pool, inUse int) {
	t.Helper()
	st := p.Stats()
	if st.InUse != inUse || st.Closing != 0 || st.Open != st.Cached+st.InUse {
		t.Fatalf("stats %+v, want InUse %d, nothing closing and Open = Cached + InUse", st, inUse)
	}
}

// TestLeaseReleaseTwice: a lease released twice gives its slot back once,
// so the budget still holds exactly MaxConns.
func TestLeaseReleaseTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{MaxConns: 2})
		tb := p.Table("b1")
		l, err := tb.Lease()
		if err != nil {
			t.Fatalf("Lease: %v", err)
		}
		checkBudget(t, p, 1)
		l.Release()
		l.Release()
		checkBudget(t, p, 0)
		for i := range 2 {
			if _, err := tb.Lease(); err != nil {
				t.Fatalf("Lease %d of 2 after the double release: %v", i+1, err)
			}
		}
		if _, err := tb.Lease(); !errors.Is(err, ErrFull) {
			t.Fatalf("third Lease = %v, want ErrFull: a double release made room", err)
		}
	})
}

// TestLeasePutThenRelease: a lease whose connection was cached is settled:
// a later Release, Discard or Abort touches neither the budget nor the
// connection, which stays cached and is taken with a lease of its own.
func TestLeasePutThenRelease(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{MaxConns: 1})
		tb := p.Table("b1")
		l, err := tb.Lease()
		if err != nil {
			t.Fatalf("Lease: %v", err)
		}
		c := &fakeConn{name: "c"}
		born := time.Now()
		l.Put("u", digest("pw"), c, born)
		l.Release()
		l.Discard(c)
		l.Abort(c)
		l.Put("u", digest("pw"), c, born)
		synctest.Wait()
		checkBudget(t, p, 0)
		if st := p.Stats(); st.Open != 1 || st.Cached != 1 {
			t.Fatalf("stats %+v, want the one connection open and cached", st)
		}
		if c.isClosed() {
			t.Fatal("a call on a settled lease closed its connection")
		}
		got, ok := tb.Take(context.Background(), "u", digest("pw"))
		if !ok || got.Conn() != c || !got.Born().Equal(born) || got.Table() != tb {
			t.Fatalf("Take = %v, %v, want the cached connection with its birth", got, ok)
		}
		checkBudget(t, p, 1)
		got.Discard(c)
		got.Discard(c)
		synctest.Wait()
		checkBudget(t, p, 0)
		if st := p.Stats(); st.Open != 0 {
			t.Fatalf("stats %+v, want nothing open after the discard", st)
		}
		c.closeMu.Lock()
		closed := c.closed
		c.closeMu.Unlock()
		if closed != 1 {
			t.Fatalf("connection closed %d times, want 1", closed)
		}
	})
}

// TestTakenLeaseStale: a lease of Take lives in its connection's cache
// entry; once the connection is put back and taken again, the new lease is
// a fresh one, and the old one, settled, touches neither the new lease nor
// the connection.
func TestTakenLeaseStale(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Options{MaxConns: 1})
		tb := p.Table("b1")
		c := &fakeConn{name: "c"}
		put(t, p, tb, "u", "pw", c)
		old, ok := tb.Take(context.Background(), "u", digest("pw"))
		if !ok {
			t.Fatal("Take missed the cached connection")
		}
		old.Put("u", digest("pw"), c, old.Born())
		cur, ok := tb.Take(context.Background(), "u", digest("pw"))
		if !ok || cur == old || cur.Conn() != c {
			t.Fatalf("second Take = %p (first %p), %v, want a lease of its own for the same connection", cur, old, ok)
		}
		old.Release()
		old.Discard(c)
		old.Abort(c)
		synctest.Wait()
		checkBudget(t, p, 1)
		if c.isClosed() {
			t.Fatal("a settled lease closed the connection of a later one")
		}
		cur.Put("u", digest("pw"), c, cur.Born())
		checkBudget(t, p, 0)
		if st := p.Stats(); st.Open != 1 || st.Cached != 1 {
			t.Fatalf("stats %+v, want the connection cached again by the live lease", st)
		}
	})
}

// TestLeaseAbort: Abort closes at once, without LOGOUT, and its slot is
// back before it returns.
func TestLeaseAbort(t *testing.T) {
	p := New(Options{MaxConns: 1})
	l, err := p.Table("b1").Lease()
	if err != nil {
		t.Fatalf("Lease: %v", err)
	}
	c := &fakeConn{name: "c"}
	l.Abort(c)
	if !c.wasAborted() {
		t.Fatal("Abort did not abort the connection")
	}
	checkBudget(t, p, 0)
	if st := p.Stats(); st.Open != 0 {
		t.Fatalf("stats %+v, want the slot back", st)
	}
}

// TestLeaseProperty: after any sequence of Lease, Take, Put, Discard,
// Abort and Release, settles repeated included, with sweeps, flushes and
// removed tables in between, every slot comes back: the count of leases
// never goes negative, open connections are always the cached ones plus
// the leased ones, and at the end no lease is left.
func TestLeaseProperty(t *testing.T) {
	for seed := range uint64(30) {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { leaseRun(t, seed, 400) })
		})
	}
}

func leaseRun(t *testing.T, seed uint64, steps int) {
	const maxConns = 6
	rng := rand.New(rand.NewPCG(seed, 13))
	p := New(Options{MaxConns: maxConns, MaxPerUser: 2})
	backends := []string{"b1", "b2"}
	users := []string{"u1", "u2", "u3"}
	var live, settled []*Lease
	pick := func(ls []*Lease) (int, *Lease) {
		i := rng.IntN(len(ls))
		return i, ls[i]
	}
	settle := func(l *Lease) {
		c := l.Conn()
		if c == nil {
			c = &fakeConn{}
		}
		switch rng.IntN(4) {
		case 0:
			l.Put(users[rng.IntN(len(users))], digest("pw"), c, time.Now())
		case 1:
			l.Discard(c)
		case 2:
			l.Abort(c)
		default:
			if l.Conn() != nil {
				l.Conn().Abort() // Release is for a connection closed already
			}
			l.Release()
		}
	}
	for step := range steps {
		switch op := rng.IntN(10); {
		case op < 2:
			l, err := p.Table(backends[rng.IntN(len(backends))]).Lease()
			if err != nil {
				if st := p.Stats(); !errors.Is(err, ErrFull) || st.InUse != maxConns {
					t.Fatalf("step %d: Lease = %v with stats %+v, want ErrFull only when every slot is leased", step, err, st)
				}
				break
			}
			live = append(live, l)
		case op < 5:
			if l, ok := p.Table(backends[rng.IntN(len(backends))]).Take(context.Background(), users[rng.IntN(len(users))], digest("pw")); ok {
				live = append(live, l)
			}
		case op < 8 && len(live) > 0:
			i, l := pick(live)
			settle(l)
			live = append(live[:i], live[i+1:]...)
			settled = append(settled, l)
		case op == 8 && len(settled) > 0:
			// A settled lease settled again: nothing may change, and the
			// connection it is given must stay untouched.
			_, l := pick(settled)
			c := &fakeConn{}
			switch rng.IntN(4) {
			case 0:
				l.Put("u1", digest("pw"), c, time.Now())
			case 1:
				l.Discard(c)
			case 2:
				l.Abort(c)
			default:
				l.Release()
			}
			synctest.Wait()
			if c.isClosed() {
				t.Fatalf("step %d: a settled lease closed the connection it was given", step)
			}
		case op == 9:
			switch rng.IntN(3) {
			case 0:
				p.Sweep(time.Now().Add(time.Hour))
			case 1:
				p.Flush()
			default:
				p.RemoveTable(backends[rng.IntN(len(backends))])
			}
		}
		synctest.Wait()
		checkBudget(t, p, len(live))
		if st := p.Stats(); st.Open > maxConns {
			t.Fatalf("step %d: stats %+v, over the budget of %d", step, st, maxConns)
		}
	}
	for _, l := range live {
		settle(l)
	}
	synctest.Wait()
	checkBudget(t, p, 0)
	p.Close()
	synctest.Wait()
	if st := p.Stats(); st.Open != 0 || st.InUse != 0 {
		t.Fatalf("stats %+v after Close, want every slot back", st)
	}
}
