package cluster

import (
	"errors"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
)

func be(id string) backend.Backend {
	return backend.Backend{ID: id, Addr: id + ":143", Weight: 1}
}

func ids(bs []backend.Backend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.ID
	}
	return out
}

// userOn returns a user whose first choice in set is id.
func userOn(t *testing.T, set *Set, id string) string {
	t.Helper()
	for i := range 10000 {
		u := "user" + string(rune('a'+i%26)) + string(rune('a'+i/26%26)) + string(rune('a'+i/676))
		if b, ok := set.Ring().Pick(u); ok && b.ID == id {
			return u
		}
	}
	t.Fatalf("no user maps to %s", id)
	return ""
}

// TestInstall: each install reports what left, what was dropped and what
// changed weight, and the set serves exactly its members.
func TestInstall(t *testing.T) {
	a, b, c := be("a"), be("b"), be("c")
	a2 := a
	a2.Addr = "elsewhere:143"
	bHeavy := b
	bHeavy.Weight = 3
	r := New(Options{})
	steps := []struct {
		name       string
		set        []backend.Backend
		serving    []string
		left       []string
		dropped    []string
		reweighted []string
		changed    bool
	}{
		{"first set", []backend.Backend{a, b}, []string{"a", "b"}, nil, nil, nil, true},
		{"same again", []backend.Backend{b, a}, []string{"a", "b"}, nil, nil, nil, false},
		{"one joins", []backend.Backend{a, b, c}, []string{"a", "b", "c"}, nil, nil, nil, true},
		{"repeated ID: the first counts", []backend.Backend{a, b, c, a2}, []string{"a", "b", "c"}, nil, nil, nil, false},
		{"weight change", []backend.Backend{a, bHeavy, c}, []string{"a", "b", "c"}, nil, nil, []string{"b"}, false},
		{"address change", []backend.Backend{a2, bHeavy, c}, []string{"a", "b", "c"}, []string{"a"}, nil, nil, true},
		{"two leave", []backend.Backend{a2}, []string{"a"}, []string{"b", "c"}, []string{"b", "c"}, nil, true},
		{"empty", nil, []string{}, []string{"a"}, []string{"a"}, nil, true},
	}
	for _, st := range steps {
		ch := r.Install(st.set, nil)
		if ch.New != r.Load() {
			t.Fatalf("%s: Change.New is not the installed set", st.name)
		}
		if got := ids(r.Load().Serving()); !slices.Equal(got, st.serving) {
			t.Errorf("%s: Serving = %v, want %v", st.name, got, st.serving)
		}
		if got := ids(ch.Left); !slices.Equal(got, st.left) {
			t.Errorf("%s: Left = %v, want %v", st.name, got, st.left)
		}
		if !slices.Equal(ch.Dropped, st.dropped) {
			t.Errorf("%s: Dropped = %v, want %v", st.name, ch.Dropped, st.dropped)
		}
		if got := ids(ch.Reweighted); !slices.Equal(got, st.reweighted) {
			t.Errorf("%s: Reweighted = %v, want %v", st.name, got, st.reweighted)
		}
		if ch.Changed() != st.changed {
			t.Errorf("%s: Changed = %v, want %v", st.name, ch.Changed(), st.changed)
		}
		if len(ch.Drained)+len(ch.Undrained)+len(ch.HeldLeft) > 0 {
			t.Errorf("%s: drains or held reported without any: %+v", st.name, ch)
		}
		for _, bk := range st.set {
			want := slices.ContainsFunc(r.Load().Serving(), bk.Same)
			if r.Load().Serves(bk) != want {
				t.Errorf("%s: Serves(%+v) = %v, want %v", st.name, bk, !want, want)
			}
		}
	}
	if r.Install([]backend.Backend{a, a2}, nil); !r.Load().Serves(a) || r.Load().Serves(a2) {
		t.Error("of a repeated ID, the set serves another than the first")
	}
	r.Install([]backend.Backend{a2}, nil)
	if r.Load().Serves(a) {
		t.Error("Serves(a) after a changed address, want false: a session on the old address must not cache")
	}
}

// TestDrain: a drain holds across installs while the backend stays a
// member, is forgotten when it leaves, and is reported as drained, not
// left; undrain brings it back.
func TestDrain(t *testing.T) {
	a, b, c := be("a"), be("b"), be("c")
	r := New(Options{})
	r.Install([]backend.Backend{a, b}, nil)
	user := userOn(t, r.Load(), "a")

	ch, err := r.Drain("a")
	if err != nil {
		t.Fatalf("Drain(a): %v", err)
	}
	if got := ids(ch.Drained); !slices.Equal(got, []string{"a"}) || len(ch.Left) != 0 {
		t.Errorf("Drain(a) reported drained %v, left %v; want drained [a], nothing left", got, ids(ch.Left))
	}
	if !ch.Changed() {
		t.Error("a drain that shrinks the set is not Changed")
	}
	ch, err = r.Drain("a")
	if err != nil || ch.Old != ch.New {
		t.Errorf("second Drain(a) = %v, a change %v; want nil and no change", err, ch.Old != ch.New)
	}

	aHeavy := a
	aHeavy.Weight = 5
	steps := []struct {
		name    string
		set     []backend.Backend
		drained bool
		onA     bool
	}{
		{"same set again", []backend.Backend{a, b}, true, false},
		{"a backend added", []backend.Backend{a, b, c}, true, false},
		{"its weight changed", []backend.Backend{aHeavy, b}, true, false},
		{"it left", []backend.Backend{b}, false, false},
		{"it came back", []backend.Backend{a, b}, false, true},
	}
	for _, st := range steps {
		r.Install(st.set, nil)
		set := r.Load()
		var drained bool
		for _, m := range set.Members() {
			if m.ID == "a" {
				drained = m.Drained
			}
		}
		if drained != st.drained {
			t.Errorf("%s: a drained = %v, want %v", st.name, drained, st.drained)
		}
		if got := set.Order(user, nil).Try()[0].ID; (got == "a") != st.onA {
			t.Errorf("%s: %s's login goes to %s, want a: %v", st.name, user, got, st.onA)
		}
		if got := set.Place(user).Backend; (got == "a") != st.onA {
			t.Errorf("%s: Place(%s).Backend = %s, want a: %v", st.name, user, got, st.onA)
		}
	}

	if _, err := r.Drain("a"); err != nil {
		t.Fatal(err)
	}
	ch, err = r.Undrain("a")
	if err != nil {
		t.Fatalf("Undrain(a): %v", err)
	}
	if got := ids(ch.Undrained); !slices.Equal(got, []string{"a"}) {
		t.Errorf("Undrain(a) reported undrained %v, want [a]", got)
	}
	if !r.Load().Serves(a) {
		t.Error("a not in service after Undrain")
	}
	ch, err = r.Undrain("a")
	if err != nil || ch.Old != ch.New || len(ch.Undrained) != 0 {
		t.Errorf("Undrain of a backend in service = %v, %+v; want nil and no change", err, ch)
	}
}

func TestDrainErrors(t *testing.T) {
	r := New(Options{})
	r.Install([]backend.Backend{be("a"), be("b")}, []backend.Backend{be("h")})
	for _, id := range []string{"nope", "h"} {
		if _, err := r.Drain(id); !errors.Is(err, ErrUnknownBackend) {
			t.Errorf("Drain(%s) = %v, want ErrUnknownBackend", id, err)
		}
		if _, err := r.Undrain(id); !errors.Is(err, ErrUnknownBackend) {
			t.Errorf("Undrain(%s) = %v, want ErrUnknownBackend", id, err)
		}
	}
	if _, err := r.Drain("a"); err != nil {
		t.Fatal(err)
	}
	before := r.Load()
	if _, err := r.Drain("b"); !errors.Is(err, ErrLastBackend) {
		t.Errorf("draining the last backend in service = %v, want ErrLastBackend", err)
	}
	if r.Load() != before || r.Load().Len() != 1 {
		t.Error("a refused drain changed the set")
	}
	// A drain of a backend already drained is no drain of the last one.
	if _, err := r.Drain("a"); err != nil {
		t.Errorf("Drain(a) again = %v, want nil", err)
	}
}

// TestHeld: held backends take no login but are healthy; a held backend
// that is also in the set is a member; one that leaves is reported.
func TestHeld(t *testing.T) {
	a, b := be("a"), be("b")
	r := New(Options{})
	r.Install([]backend.Backend{a, b}, nil)

	ch := r.Install([]backend.Backend{b}, []backend.Backend{a})
	if got := ids(ch.Left); !slices.Equal(got, []string{"a"}) {
		t.Errorf("a held: Left = %v, want [a] (its cached connections go)", got)
	}
	if len(ch.HeldLeft) != 0 || ch.New.HeldLen() != 1 {
		t.Errorf("a held: HeldLeft %v, HeldLen %d; want none and 1", ids(ch.HeldLeft), ch.New.HeldLen())
	}
	set := r.Load()
	if set.Serves(a) || !set.Healthy(a) {
		t.Errorf("held a: Serves %v Healthy %v, want false and true", set.Serves(a), set.Healthy(a))
	}
	if got := ids(set.Order("anyone", nil).All); !slices.Equal(got, []string{"b"}) {
		t.Errorf("Order with a held = %v, want [b]", got)
	}
	if ms := set.Members(); len(ms) != 2 || ms[0].ID != "a" || !ms[0].Held || ms[0].Drained || ms[1].Held {
		t.Errorf("Members = %+v, want a held, b not", ms)
	}
	if _, err := r.Drain("a"); !errors.Is(err, ErrUnknownBackend) {
		t.Errorf("Drain of a held backend = %v, want ErrUnknownBackend", err)
	}

	ch = r.Install([]backend.Backend{a, b}, []backend.Backend{a})
	if !r.Load().Serves(a) || r.Load().HeldLen() != 0 || len(ch.HeldLeft) != 0 {
		t.Errorf("a in both: Serves %v, HeldLen %d, HeldLeft %v; want a member, nothing held", r.Load().Serves(a), r.Load().HeldLen(), ids(ch.HeldLeft))
	}

	r.Install([]backend.Backend{b}, []backend.Backend{a})
	ch = r.Install([]backend.Backend{b}, nil)
	if got := ids(ch.HeldLeft); !slices.Equal(got, []string{"a"}) || r.Load().Healthy(a) {
		t.Errorf("a leaves for real: HeldLeft = %v, Healthy %v; want [a], false", got, r.Load().Healthy(a))
	}
	if !ch.Changed() {
		t.Error("a held backend leaving is not Changed")
	}
}

// TestMarkDown: a backend marked down goes behind the others in every
// user's order until the mark runs out; when all are down, all are tried
// in the user's order.
func TestMarkDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := New(Options{})
		r.Install([]backend.Backend{be("a"), be("b"), be("c")}, nil)
		user := userOn(t, r.Load(), "a")
		want := ids(r.Load().Ring().Order(user, nil))

		if r.MarkDown("nope", time.Second) {
			t.Error("MarkDown of an unknown backend reported a mark")
		}
		if !r.MarkDown("a", 10*time.Second) {
			t.Fatal("MarkDown(a) reported no member")
		}
		c := r.Load().Order(user, nil)
		if got, wantDown := ids(c.All), append(slices.Clone(want[1:]), "a"); !slices.Equal(got, wantDown) {
			t.Errorf("Order with a down = %v, want %v", got, wantDown)
		}
		if c.Live != 2 || c.First().ID != "a" || slices.Contains(ids(c.Try()), "a") {
			t.Errorf("with a down: Live %d, First %s, Try %v; want 2, a, without a", c.Live, c.First().ID, ids(c.Try()))
		}
		if pl := r.Load().Place(user); pl.Backend != want[1] || !pl.Order[0].Down {
			t.Errorf("Place with a down = %+v, want backend %s and a down", pl, want[1])
		}
		if m := r.Load().Members()[0]; !m.Down || !m.DownUntil.Equal(time.Now().Add(10*time.Second)) {
			t.Errorf("Members()[0] = %+v, want down until 10s from now", m)
		}

		r.MarkDown(want[1], 20*time.Second)
		r.MarkDown(want[2], 20*time.Second)
		c = r.Load().Order(user, nil)
		if c.Live != 0 || !slices.Equal(ids(c.Try()), want) || c.First().ID != "a" {
			t.Errorf("all down: Live %d, Try %v, First %s; want 0, %v, a", c.Live, ids(c.Try()), c.First().ID, want)
		}
		if pl := r.Load().Place(user); pl.Backend != "a" {
			t.Errorf("Place with all down = %s, want the first in service, a", pl.Backend)
		}

		time.Sleep(10 * time.Second)
		c = r.Load().Order(user, nil)
		if got := ids(c.All); c.Live != 1 || !slices.Equal(got, want) {
			t.Errorf("a's mark ran out: Order %v, Live %d; want %v, 1", got, c.Live, want)
		}
		time.Sleep(10 * time.Second)
		if c := r.Load().Order(user, nil); c.Live != 3 || !slices.Equal(ids(c.All), want) {
			t.Errorf("every mark ran out: Order %v, Live %d; want %v, 3", ids(c.All), c.Live, want)
		}
	})
}

// TestMarkKeptAcrossInstall: a member that stays the same keeps its
// down mark through installs, drains and a change of weight; one that
// changes address starts afresh.
func TestMarkKeptAcrossInstall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := be("a"), be("b")
		r := New(Options{})
		r.Install([]backend.Backend{a, b}, nil)
		r.MarkDown("a", time.Minute)
		down := func() bool {
			for _, m := range r.Load().Members() {
				if m.ID == "a" {
					return m.Down
				}
			}
			return false
		}
		a.Weight = 7
		ch := r.Install([]backend.Backend{a, b}, nil)
		if !down() {
			t.Error("a weight change lost the down mark")
		}
		if got := ids(ch.Reweighted); !slices.Equal(got, []string{"a"}) || ch.Reweighted[0].Weight != 7 || len(ch.Left) != 0 {
			t.Errorf("weight change: Reweighted %+v, Left %v; want a at 7, nothing left", ch.Reweighted, ids(ch.Left))
		}
		if _, err := r.Drain("a"); err != nil {
			t.Fatal(err)
		}
		if _, err := r.Undrain("a"); err != nil {
			t.Fatal(err)
		}
		if !down() {
			t.Error("a drain and undrain lost the down mark")
		}
		r.SetKey(balancer.KeyExact)
		if !down() {
			t.Error("a new hash key lost the down mark")
		}
		a.Addr = "moved:143"
		r.Install([]backend.Backend{a, b}, nil)
		if down() {
			t.Error("a backend at a new address kept the old one's down mark")
		}
	})
}

// TestSetKey: a new key re-maps users and keeps the drains.
func TestSetKey(t *testing.T) {
	r := New(Options{Key: balancer.KeyExact})
	r.Install([]backend.Backend{be("a"), be("b"), be("c")}, nil)
	if _, err := r.Drain("c"); err != nil {
		t.Fatal(err)
	}
	if k := r.Load().Place("Bob@Example.org").Key; k != "Bob@Example.org" {
		t.Errorf("Key under KeyExact = %q", k)
	}
	r.SetKey(balancer.KeyDomain)
	set := r.Load()
	if k := set.Place("Bob@Example.org").Key; k != "example.org" {
		t.Errorf("Key under KeyDomain = %q, want example.org", k)
	}
	if set.Len() != 2 || set.Ring().Len() != 2 {
		t.Errorf("after SetKey: %d in service, ring of %d; want c still drained", set.Len(), set.Ring().Len())
	}
	ui, ux := set.Order("x@example.org", nil).All, set.Order("y@EXAMPLE.org", nil).All
	if !slices.Equal(ids(ui), ids(ux)) {
		t.Errorf("one domain, two orders: %v and %v", ids(ui), ids(ux))
	}
	r.Install([]backend.Backend{be("a"), be("b"), be("c"), be("d")}, nil)
	if k := r.Load().Place("Bob@Example.org").Key; k != "example.org" {
		t.Errorf("an install after SetKey hashes by %q, want the new key", k)
	}
}

// TestPlace: the operator's view orders every member, drained ones
// included, as the ring of all would.
func TestPlace(t *testing.T) {
	r := New(Options{})
	if pl := r.Load().Place("u"); pl.Backend != "" || pl.Order != nil || pl.Key != "u" {
		t.Errorf("Place on an empty set = %+v", pl)
	}
	all := []backend.Backend{be("a"), be("b"), be("c")}
	r.Install(all, nil)
	user := userOn(t, r.Load(), "b")
	if _, err := r.Drain("b"); err != nil {
		t.Fatal(err)
	}
	pl := r.Load().Place(user)
	want := ids(balancer.New(all, balancer.Options{}).Order(user, nil))
	var got []string
	for _, rk := range pl.Order {
		got = append(got, rk.ID)
		if rk.Drained != (rk.ID == "b") || rk.Down {
			t.Errorf("Place: %+v, want only b drained, none down", rk)
		}
	}
	if !slices.Equal(got, want) || pl.Backend != want[1] {
		t.Errorf("Place(%s) = order %v backend %s; want %v and %s", user, got, pl.Backend, want, want[1])
	}
}

// TestZeroRoster: the zero Roster holds an empty set and takes changes.
func TestZeroRoster(t *testing.T) {
	var r Roster
	if set := r.Load(); set.Len() != 0 || len(set.Order("u", nil).All) != 0 || set.Order("u", nil).First().ID != "" {
		t.Error("the zero Roster's set is not empty")
	}
	r.Install([]backend.Backend{be("a")}, nil)
	if !r.Load().Serves(be("a")) {
		t.Error("the zero Roster did not install a set")
	}
}

// TestOrderAllocs: the login path allocates nothing when the caller's
// buffer holds the set.
func TestOrderAllocs(t *testing.T) {
	r := New(Options{})
	r.Install([]backend.Backend{be("a"), be("b"), be("c"), be("d")}, nil)
	r.MarkDown("b", time.Hour)
	set := r.Load()
	var buf [8]backend.Backend
	n := testing.AllocsPerRun(100, func() {
		c := set.Order("someone@example.org", buf[:0])
		if len(c.Try()) != 3 {
			t.Fatal("b not skipped")
		}
	})
	if n != 0 {
		t.Errorf("Order allocates %v times per call, want 0", n)
	}
}

// TestZeroChange: the Change of a refused operation says nothing changed.
func TestZeroChange(t *testing.T) {
	if (Change{}).Changed() {
		t.Error("the zero Change is Changed")
	}
}
