package cluster

import (
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"
	"testing/synctest"
	"time"

	"github.com/imapproxy/imapproxy/backend"
)

// TestOrderProperty: after any sequence of installs, drains, undrains,
// down marks and the passing of time, every user's order is a permutation
// of the backends in service, live ones first, each part in the ring's
// order, and Serves agrees with it.
func TestOrderProperty(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>1))
	pool := make([]backend.Backend, 6)
	for i := range pool {
		pool[i] = backend.Backend{ID: "b" + strconv.Itoa(i), Addr: "10.0.0." + strconv.Itoa(i) + ":143", Weight: 1}
	}
	synctest.Test(t, func(t *testing.T) {
		for run := range 50 {
			r := New(Options{})
			for step := range 60 {
				op := apply(rng, r, pool)
				check(t, r.Load(), pool, "run "+strconv.Itoa(run)+" step "+strconv.Itoa(step)+" after "+op)
				if t.Failed() {
					return
				}
			}
		}
	})
}

// apply makes one random change and names it.
func apply(rng *rand.Rand, r *Roster, pool []backend.Backend) string {
	id := pool[rng.IntN(len(pool))].ID
	switch rng.IntN(6) {
	case 0:
		var bs, held []backend.Backend
		for _, b := range pool {
			switch rng.IntN(4) {
			case 0:
				continue
			case 1:
				held = append(held, b)
				continue
			}
			b.Weight = 1 + rng.IntN(3)
			if rng.IntN(8) == 0 {
				b.Addr = "moved" + b.Addr
			}
			bs = append(bs, b)
		}
		r.Install(bs, held)
		return "install"
	case 1:
		r.Drain(id)
		return "drain " + id
	case 2:
		r.Undrain(id)
		return "undrain " + id
	case 3, 4:
		r.MarkDown(id, time.Duration(1+rng.IntN(5))*time.Second)
		return "mark down " + id
	default:
		time.Sleep(time.Duration(rng.IntN(3)) * time.Second)
		return "time passes"
	}
}

func check(t *testing.T, set *Set, pool []backend.Backend, when string) {
	t.Helper()
	serving := set.Serving()
	for _, b := range append(slices.Clone(pool), serving...) {
		if want := slices.ContainsFunc(serving, b.Same); set.Serves(b) != want {
			t.Errorf("%s: Serves(%+v) = %v, want %v", when, b, !want, want)
		}
	}
	now := time.Now()
	for _, user := range []string{"alice", "bob@example.org", "carol", "Dave"} {
		ring := set.Ring().Order(user, nil)
		c := set.Order(user, nil)
		if got, want := slices.SortedFunc(slices.Values(c.All), byID), serving; !slices.Equal(got, want) {
			t.Errorf("%s: Order(%s) = %v, not a permutation of the backends in service %v", when, user, ids(c.All), ids(want))
			continue
		}
		for i, b := range c.All {
			if !set.Serves(b) {
				t.Errorf("%s: Order(%s) holds %+v, which Serves denies", when, user, b)
			}
			if _, down := set.downAt(b.ID, now); down != (i >= c.Live) {
				t.Errorf("%s: Order(%s)[%d] = %s down %v, but Live = %d", when, user, i, b.ID, down, c.Live)
			}
		}
		if len(c.All) > 0 && c.First().ID != ring[0].ID {
			t.Errorf("%s: First(%s) = %s, want the ring's %s", when, user, c.First().ID, ring[0].ID)
		}
		// Each part keeps the ring's order.
		var live, down []string
		for _, b := range ring {
			if _, d := set.downAt(b.ID, now); d {
				down = append(down, b.ID)
			} else {
				live = append(live, b.ID)
			}
		}
		if want := append(live, down...); !slices.Equal(ids(c.All), want) {
			t.Errorf("%s: Order(%s) = %v, want %v", when, user, ids(c.All), want)
		}
	}
}
