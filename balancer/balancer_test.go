package balancer

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/cespare/xxhash/v2"
)

var (
	abc = []Backend{
		{ID: "imap-a", Addr: "10.0.0.1:143"},
		{ID: "imap-b", Addr: "10.0.0.2:143"},
		{ID: "imap-c", Addr: "10.0.0.3:143"},
	}
	abc123 = []Backend{
		{ID: "imap-a", Addr: "10.0.0.1:143", Weight: 1},
		{ID: "imap-b", Addr: "10.0.0.2:143", Weight: 2},
		{ID: "imap-c", Addr: "10.0.0.3:143", Weight: 3},
	}
)

// TestPinnedPlacements pins full failover orders for a small fixed set, so
// that any change to the hash, the mixer, the key normalisation or the score
// formula shows up here as a diff rather than as users silently moving in
// production when proxies of two versions run side by side.
//
// How the table was verified: testdata/placements.py recomputes every order
// without any of this package's code (XXH64 written out from its spec and
// checked against the published vector for "", SplitMix64, u and -w/ln(u)
// in Python floats, sort by score then ID). Its output, scores included, is
// what the comments show; running it again must reproduce the table.
func TestPinnedPlacements(t *testing.T) {
	tests := []struct {
		name     string
		backends []Backend
		key      KeyMode
		want     [][4]string // user, then IDs best first
	}{
		{"uniform", abc, KeyLowercase, [][4]string{
			{"alice@example.com", "imap-a", "imap-b", "imap-c"}, // imap-a=1.5626 imap-b=1.2046 imap-c=0.4485
			{"Bob@Example.com", "imap-a", "imap-c", "imap-b"},   // imap-a=9.6465 imap-c=2.8439 imap-b=0.5372
			{"carol@example.org", "imap-a", "imap-b", "imap-c"}, // imap-a=3.6759 imap-b=1.3992 imap-c=0.8984
			{"dave", "imap-b", "imap-a", "imap-c"},              // imap-b=1.2867 imap-a=0.4478 imap-c=0.4103
			{"erin@example.net", "imap-a", "imap-c", "imap-b"},  // imap-a=0.8453 imap-c=0.7824 imap-b=0.6116
			{"frank@example.com", "imap-a", "imap-c", "imap-b"}, // imap-a=1.7834 imap-c=1.3846 imap-b=0.5176
			{"grace@example.org", "imap-c", "imap-b", "imap-a"}, // imap-c=7.5975 imap-b=4.6582 imap-a=2.9758
			{"heidi@example.com", "imap-a", "imap-b", "imap-c"}, // imap-a=2.6092 imap-b=0.8203 imap-c=0.2759
			{"ivan@EXAMPLE.net", "imap-a", "imap-b", "imap-c"},  // imap-a=3.2409 imap-b=1.7534 imap-c=1.1449
			{"judy@example.org", "imap-b", "imap-a", "imap-c"},  // imap-b=2.2065 imap-a=0.2914 imap-c=0.2283
		}},
		{"weighted 1:2:3", abc123, KeyLowercase, [][4]string{
			{"alice@example.com", "imap-b", "imap-a", "imap-c"}, // imap-b=2.4092 imap-a=1.5626 imap-c=1.3454
			{"Bob@Example.com", "imap-a", "imap-c", "imap-b"},   // imap-a=9.6465 imap-c=8.5317 imap-b=1.0744
			{"carol@example.org", "imap-a", "imap-b", "imap-c"}, // imap-a=3.6759 imap-b=2.7985 imap-c=2.6953
			{"dave", "imap-b", "imap-c", "imap-a"},              // imap-b=2.5734 imap-c=1.2309 imap-a=0.4478
			{"erin@example.net", "imap-c", "imap-b", "imap-a"},  // imap-c=2.3471 imap-b=1.2232 imap-a=0.8453
			{"frank@example.com", "imap-c", "imap-a", "imap-b"}, // imap-c=4.1539 imap-a=1.7834 imap-b=1.0351
			{"grace@example.org", "imap-c", "imap-b", "imap-a"}, // imap-c=22.7924 imap-b=9.3164 imap-a=2.9758
			{"heidi@example.com", "imap-a", "imap-b", "imap-c"}, // imap-a=2.6092 imap-b=1.6406 imap-c=0.8278
			{"ivan@EXAMPLE.net", "imap-b", "imap-c", "imap-a"},  // imap-b=3.5069 imap-c=3.4348 imap-a=3.2409
			{"judy@example.org", "imap-b", "imap-c", "imap-a"},  // imap-b=4.4130 imap-c=0.6848 imap-a=0.2914
		}},
		{"domain", abc, KeyDomain, [][4]string{
			{"alice@example.com", "imap-b", "imap-c", "imap-a"}, // imap-b=6.3393 imap-c=2.1383 imap-a=0.8104
			{"Bob@Example.com", "imap-b", "imap-c", "imap-a"},   // same key as alice
			{"carol@example.org", "imap-a", "imap-b", "imap-c"}, // imap-a=3.4687 imap-b=2.0677 imap-c=0.7469
			{"dave", "imap-b", "imap-a", "imap-c"},              // no '@': same as uniform "dave"
			{"erin@example.net", "imap-b", "imap-c", "imap-a"},  // imap-b=1.7437 imap-c=1.6031 imap-a=1.3457
			{"ivan@EXAMPLE.net", "imap-b", "imap-c", "imap-a"},  // same key as erin
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := New(tt.backends, Options{Key: tt.key})
			for _, w := range tt.want {
				user := w[0]
				if got, _ := r.Pick(user); got.ID != w[1] {
					t.Errorf("Pick(%q) = %q, want %q", user, got.ID, w[1])
				}
				if got, want := ids(r.Order(user, nil)), w[1:]; !slices.Equal(got, want) {
					t.Errorf("Order(%q) = %q, want %q", user, got, want)
				}
			}
		})
	}
}

// refOrder restates the scoring rule from the package comment as plainly as
// possible (strings.ToLower, math.Log for every backend, a full sort), so the
// shortcuts in Pick and Order are checked against the formula itself.
func refOrder(backends []Backend, user string) []string {
	key := strings.ToLower(user)
	type ranked struct {
		id    string
		score float64
	}
	var rs []ranked
	for _, b := range backends {
		h := mix64(xxhash.Sum64String(key) ^ xxhash.Sum64String(b.ID))
		u := float64(h>>11+1) / (1 << 53)
		w := float64(max(b.Weight, 1))
		rs = append(rs, ranked{b.ID, -w / math.Log(u)})
	}
	slices.SortFunc(rs, func(a, b ranked) int {
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	var out []string
	for _, r := range rs {
		out = append(out, r.id)
	}
	return out
}

func TestMatchesFormula(t *testing.T) {
	tests := []struct {
		name     string
		backends []Backend
	}{
		{"one", nodes(1, nil)},
		{"uniform 16", nodes(16, nil)},
		{"weights 1..16", nodes(16, func(i int) int { return i + 1 })},
		{"weights 1 and 1000", nodes(8, func(i int) int { return 1 + 999*(i%2) })},
		{"weights 0 and -3 count as 1", nodes(5, func(i int) int { return -i })},
		// Past orderStack, Order sorts in dst instead of a stack buffer.
		{"uniform 100", nodes(100, nil)},
		{"weights 1..100", nodes(100, func(i int) int { return i + 1 })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := New(tt.backends, Options{})
			for _, user := range users(200000 / len(tt.backends)) {
				want := refOrder(tt.backends, user)
				if got, _ := r.Pick(user); got.ID != want[0] {
					t.Fatalf("Pick(%q) = %q, want %q", user, got.ID, want[0])
				}
				if got := ids(r.Order(user, nil)); !slices.Equal(got, want) {
					t.Fatalf("Order(%q) = %q, want %q", user, got, want)
				}
			}
		})
	}
}

// TestTies uses a constant hash, under which every backend has the same u
// for every user, so the expected answers follow from the rules alone: equal
// scores go to the smallest ID, and otherwise the score is proportional to
// the weight.
func TestTies(t *testing.T) {
	constant := func(string) uint64 { return 42 }
	tests := []struct {
		name     string
		backends []Backend
		want     []string
	}{
		{"equal weights: by ID", []Backend{{ID: "c"}, {ID: "a"}, {ID: "b"}}, []string{"a", "b", "c"}},
		{"heavier first, then ID", []Backend{{ID: "a", Weight: 1}, {ID: "b", Weight: 3}, {ID: "c", Weight: 1}, {ID: "d", Weight: 3}},
			[]string{"b", "d", "a", "c"}},
		{"past orderStack: heavier first, then ID", reversed(nodes(100, func(i int) int { return 1 + i%3 })),
			byWeightThenID(nodes(100, func(i int) int { return 1 + i%3 }))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := New(tt.backends, Options{Hash: constant})
			for _, user := range []string{"alice", "Bob", ""} {
				if got, _ := r.Pick(user); got.ID != tt.want[0] {
					t.Errorf("Pick(%q) = %q, want %q", user, got.ID, tt.want[0])
				}
				if got := ids(r.Order(user, nil)); !slices.Equal(got, tt.want) {
					t.Errorf("Order(%q) = %q, want %q", user, got, tt.want)
				}
			}
		})
	}
}

func TestScore(t *testing.T) {
	tests := []struct {
		unit uint64
		w    float64
		want float64
	}{
		{1<<53 - 1, 1, math.Inf(1)},  // u == 1 is the best possible draw, not -Inf
		{1<<52 - 1, 1, 1 / math.Ln2}, // u == 1/2
		{1<<52 - 1, 3, 3 / math.Ln2},
		{0, 1, 1 / (53 * math.Ln2)}, // u == 2^-53, the worst draw
	}
	for _, tt := range tests {
		got := score(tt.unit, tt.w)
		if got != tt.want && (math.IsInf(tt.want, 0) || math.Abs(got-tt.want) > 1e-12*tt.want) {
			t.Errorf("score(%#x, %v) = %v, want %v", tt.unit, tt.w, got, tt.want)
		}
	}
}

func TestNew(t *testing.T) {
	in := []Backend{
		{ID: "c", Addr: "c1", Weight: 2},
		{ID: "a", Addr: "a1", Weight: 0},
		{ID: "c", Addr: "c2", Weight: 5}, // duplicate: the first "c" wins
		{ID: "b", Addr: "b1", Weight: -1},
		{ID: "a", Addr: "a2", Weight: 9},
	}
	// Beyond a dozen elements an unstable sort would reorder duplicates, so
	// pad the input with more of them: "keep the first" must still hold.
	for i := range 40 {
		in = append(in, Backend{ID: "a", Addr: fmt.Sprintf("a-dup%d", i)}, Backend{ID: "c", Addr: fmt.Sprintf("c-dup%d", i)})
	}
	saved := slices.Clone(in)
	r := New(in, Options{})
	want := []Backend{{ID: "a", Addr: "a1", Weight: 1}, {ID: "b", Addr: "b1", Weight: 1}, {ID: "c", Addr: "c1", Weight: 2}}
	if got := r.Backends(); !slices.Equal(got, want) {
		t.Errorf("Backends() = %v, want %v", got, want)
	}
	if r.Len() != 3 {
		t.Errorf("Len() = %d, want 3", r.Len())
	}
	if !slices.Equal(in, saved) {
		t.Errorf("New changed its input: %v, want %v", in, saved)
	}
	got := r.Backends()
	got[0].ID = "zzz"
	if r.Backends()[0].ID != "a" {
		t.Errorf("Backends() shares memory with the ring")
	}
	in[1].ID = "zzz"
	if r.Backends()[0].ID != "a" {
		t.Errorf("New kept a reference to its input")
	}
}

func TestEmpty(t *testing.T) {
	dst := []Backend{{ID: "keep"}}
	for name, r := range map[string]*Ring{"New(nil)": New(nil, Options{}), "zero": {}, "nil": nil} {
		if b, ok := r.Pick("alice"); ok || b != (Backend{}) {
			t.Errorf("%s: Pick(%q) = %v, %v, want zero, false", name, "alice", b, ok)
		}
		if got := r.Order("alice", dst); !slices.Equal(got, dst) {
			t.Errorf("%s: Order(%q) = %v, want %v", name, "alice", got, dst)
		}
		if r.Len() != 0 || r.Backends() != nil && len(r.Backends()) != 0 {
			t.Errorf("%s: Len() = %d, Backends() = %v, want empty", name, r.Len(), r.Backends())
		}
	}
}

func TestDeterministic(t *testing.T) {
	set := nodes(12, func(i int) int { return 1 + i%3 })
	shuffled := slices.Clone(set)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(shuffled), func(i, j int) {
		shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
	})
	a := New(set, Options{})
	for name, in := range map[string][]Backend{"reversed": reversed(set), "shuffled": shuffled} {
		b := New(in, Options{})
		for _, user := range users(10000) {
			want, _ := a.Pick(user)
			if got, _ := b.Pick(user); got != want {
				t.Fatalf("%s input: Pick(%q) = %q, want %q", name, user, got.ID, want.ID)
			}
		}
	}
}

func TestRemoveMovesOnlyItsUsers(t *testing.T) {
	for _, n := range []int{3, 10} {
		for _, weighted := range []bool{false, true} {
			var weight func(int) int
			if weighted {
				weight = func(i int) int { return 1 + i%4 }
			}
			set := nodes(n, weight)
			t.Run(fmt.Sprintf("n=%d/weighted=%v", n, weighted), func(t *testing.T) {
				us := users(100000)
				before := picks(New(set, Options{}), us)
				for gone := range set {
					after := New(slices.Delete(slices.Clone(set), gone, gone+1), Options{})
					moved := 0
					for i, user := range us {
						got, _ := after.Pick(user)
						switch {
						case before[i] == set[gone].ID:
							moved++
							if got.ID == set[gone].ID {
								t.Fatalf("Pick(%q) = %q, which was removed", user, got.ID)
							}
						case got.ID != before[i]:
							t.Fatalf("without %s: Pick(%q) = %q, want %q (it was not on the removed backend)",
								set[gone].ID, user, got.ID, before[i])
						}
					}
					if moved == 0 {
						t.Errorf("no user was on %s, so removing it proved nothing", set[gone].ID)
					}
				}
			})
		}
	}
}

// TestAddMovesOneShare adds one backend of weight w to a set of total weight
// W. Exactly the users the new backend wins move, an expected w/(W+w) of
// them. Over 100k users the standard deviation of that fraction is at most
// 0.16 percentage points, so the ±1 point tolerance is over 6 sigma; the
// users are fixed, so the test is deterministic anyway.
func TestAddMovesOneShare(t *testing.T) {
	const tolerance = 0.01
	tests := []struct {
		name  string
		set   []Backend
		added Backend
	}{
		{"3+1", nodes(3, nil), Backend{ID: "new", Weight: 1}},
		{"10+1", nodes(10, nil), Backend{ID: "new", Weight: 1}},
		{"weights 1..4 + weight 5", nodes(4, func(i int) int { return i + 1 }), Backend{ID: "new", Weight: 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			us := users(100000)
			before := picks(New(tt.set, Options{}), us)
			after := New(append(slices.Clone(tt.set), tt.added), Options{})
			total := tt.added.Weight
			for _, b := range tt.set {
				total += max(b.Weight, 1)
			}
			moved := 0
			for i, user := range us {
				got, _ := after.Pick(user)
				if got.ID == before[i] {
					continue
				}
				moved++
				if got.ID != tt.added.ID {
					t.Fatalf("Pick(%q) = %q, was %q: a user moved somewhere other than to %q",
						user, got.ID, before[i], tt.added.ID)
				}
			}
			frac, want := float64(moved)/float64(len(us)), float64(tt.added.Weight)/float64(total)
			if math.Abs(frac-want) > tolerance {
				t.Errorf("%.4f of users moved, want %.4f ± %.2f", frac, want, tolerance)
			}
		})
	}
}

// TestWeights checks shares for weights 1, 2, 3 within ±2 percentage points
// of 1/6, 2/6, 3/6. Sampling alone has a standard deviation of at most 0.16
// points at 100k users, so only a wrong formula can fail this.
func TestWeights(t *testing.T) {
	const tolerance = 0.02
	us := users(100000)
	counts := map[string]int{}
	for _, id := range picks(New(abc123, Options{}), us) {
		counts[id]++
	}
	for _, b := range abc123 {
		got, want := float64(counts[b.ID])/float64(len(us)), float64(b.Weight)/6
		if math.Abs(got-want) > tolerance {
			t.Errorf("%s (weight %d) got %.4f of users, want %.4f ± %.2f", b.ID, b.Weight, got, want, tolerance)
		}
	}
}

// TestOrderFailover checks that Order is the sequence Pick walks through as
// backends fail: after removing the first k entries, Pick returns entry k
// and Order returns the rest unchanged.
func TestOrderFailover(t *testing.T) {
	for name, set := range map[string][]Backend{
		"uniform":  nodes(5, nil),
		"weighted": nodes(5, func(i int) int { return 5 - i }),
	} {
		t.Run(name, func(t *testing.T) {
			r := New(set, Options{})
			for _, user := range users(2000) {
				order := r.Order(user, nil)
				if len(order) != len(set) {
					t.Fatalf("Order(%q) has %d backends, want %d", user, len(order), len(set))
				}
				if first, _ := r.Pick(user); order[0] != first {
					t.Fatalf("Order(%q)[0] = %q, want Pick = %q", user, order[0].ID, first.ID)
				}
				left := slices.Clone(set)
				for k := 1; k < len(order); k++ {
					left = slices.DeleteFunc(left, func(b Backend) bool { return b.ID == order[k-1].ID })
					rest := New(left, Options{})
					if got, _ := rest.Pick(user); got != order[k] {
						t.Fatalf("without %q: Pick(%q) = %q, want Order[%d] = %q",
							ids(order[:k]), user, got.ID, k, order[k].ID)
					}
					if got := ids(rest.Order(user, nil)); !slices.Equal(got, ids(order[k:])) {
						t.Fatalf("without %q: Order(%q) = %q, want %q", ids(order[:k]), user, got, ids(order[k:]))
					}
				}
			}
		})
	}
}

func TestOrderAppends(t *testing.T) {
	r := New(abc, Options{})
	prefix := Backend{ID: "prefix"}
	dst := make([]Backend, 1, 8)
	dst[0] = prefix
	got := r.Order("alice@example.com", dst)
	want := []string{"prefix", "imap-a", "imap-b", "imap-c"}
	if !slices.Equal(ids(got), want) {
		t.Errorf("Order(%q, [prefix]) = %q, want %q", "alice@example.com", ids(got), want)
	}
	if &got[0] != &dst[0] {
		t.Errorf("Order reallocated although cap(dst) sufficed")
	}
	if want := r.Backends()[0]; got[1] != want {
		t.Errorf("Order(%q)[1] = %+v, want %+v (all fields)", "alice@example.com", got[1], want)
	}
}

func TestKey(t *testing.T) {
	tests := []struct {
		mode KeyMode
		user string
		want string
	}{
		{KeyLowercase, "alice@example.com", "alice@example.com"},
		{KeyLowercase, "Alice@Example.COM", "alice@example.com"},
		{KeyLowercase, "ÄLICE@MÜNCHEN.DE", "älice@münchen.de"},
		{KeyLowercase, "\u212aelvin", "kelvin"}, // KELVIN SIGN: 3 bytes to 1
		{KeyLowercase, "\u023aB", "\u2c65b"},    // 2 bytes to 3
		{KeyLowercase, "A\xffB", "a\xffb"},      // invalid UTF-8 kept, not made U+FFFD
		{KeyLowercase, "", ""},
		{KeyExact, "Alice@Example.COM", "Alice@Example.COM"},
		{KeyDomain, "Alice@Example.COM", "example.com"},
		{KeyDomain, "a@b@Example.org", "example.org"}, // the last '@' separates the domain
		{KeyDomain, "Dave", "dave"},
		{KeyDomain, "dave@", ""},
	}
	for _, tt := range tests {
		r := New(abc, Options{Key: tt.mode})
		if got := r.Key(tt.user); got != tt.want {
			t.Errorf("mode %d: Key(%q) = %q, want %q", tt.mode, tt.user, got, tt.want)
		}
	}
}

// TestKeyHash checks that the stack-buffer lowercasing in Pick hashes exactly
// the bytes Key returns, including names longer than the buffer and runes
// whose lowercase form has a different length.
func TestKeyHash(t *testing.T) {
	long := strings.Repeat("MiXeD.\u212a\u023a", 40) + "@Example.COM" // well past lowerBuf
	names := []string{"", "a", "A", "alice@example.com", "Alice@Example.COM", "ÄLICE@MÜNCHEN.DE",
		"A\xffB\xc3", long, long[:lowerBuf-1], long[:lowerBuf+3], strings.Repeat("\u023a", 200)}
	for _, mode := range []KeyMode{KeyLowercase, KeyExact, KeyDomain} {
		def := New(abc, Options{Key: mode})
		explicit := New(abc, Options{Key: mode, Hash: xxhash.Sum64String})
		for _, name := range names {
			key := def.Key(name)
			if got, want := def.keyHash(name), xxhash.Sum64String(key); got != want {
				t.Errorf("mode %d: keyHash(%q) = %#x, want xxhash(Key) = %#x", mode, name, got, want)
			}
			if got, want := explicit.keyHash(name), xxhash.Sum64String(key); got != want {
				t.Errorf("mode %d, explicit hash: keyHash(%q) = %#x, want %#x", mode, name, got, want)
			}
			if mode == KeyLowercase && !strings.ContainsRune(strings.ToValidUTF8(name, "\uFFFD"), '\uFFFD') &&
				key != strings.ToLower(name) {
				t.Errorf("Key(%q) = %q, want strings.ToLower = %q", name, key, strings.ToLower(name))
			}
		}
	}
}

func TestKeyModes(t *testing.T) {
	set := nodes(10, nil)
	us := users(1000)

	lower := New(set, Options{Key: KeyLowercase})
	exact := New(set, Options{Key: KeyExact})
	domain := New(set, Options{Key: KeyDomain})
	differs := 0
	for _, user := range us {
		upper := strings.ToUpper(user)
		a, _ := lower.Pick(user)
		if b, _ := lower.Pick(upper); a != b {
			t.Errorf("KeyLowercase: Pick(%q) = %q, want %q as for %q", upper, b.ID, a.ID, user)
		}
		a, _ = exact.Pick(user)
		if b, _ := exact.Pick(upper); a != b {
			differs++
		}
	}
	// With 10 backends a case variant lands elsewhere 90% of the time; had
	// KeyExact folded case, none would.
	if differs < len(us)/2 {
		t.Errorf("KeyExact: only %d of %d upper-cased names moved, want case to matter", differs, len(us))
	}

	perDomain := map[string]map[string]bool{}
	for i, user := range us {
		d := fmt.Sprintf("Domain%d.Example", i%7)
		b, _ := domain.Pick(strings.Split(user, "@")[0] + "@" + d)
		if perDomain[strings.ToLower(d)] == nil {
			perDomain[strings.ToLower(d)] = map[string]bool{}
		}
		perDomain[strings.ToLower(d)][b.ID] = true
	}
	spread := map[string]bool{}
	for d, backends := range perDomain {
		if len(backends) != 1 {
			t.Errorf("KeyDomain: users of %s went to %d backends, want 1", d, len(backends))
		}
		for id := range backends {
			spread[id] = true
		}
	}
	if len(spread) < 2 {
		t.Errorf("KeyDomain: 7 domains all on %v, want them spread", spread)
	}
}

func TestPickAllocs(t *testing.T) {
	long := strings.Repeat("Mixed.Case.", 30) + "@Example.COM"
	rings := map[string]*Ring{
		"lowercase": New(nodes(16, nil), Options{}),
		"weighted":  New(nodes(16, func(i int) int { return i + 1 }), Options{}),
		"exact":     New(nodes(16, nil), Options{Key: KeyExact}),
		"domain":    New(nodes(16, nil), Options{Key: KeyDomain}),
		"large":     New(nodes(100, func(i int) int { return 1 + i%3 }), Options{}),
	}
	for name, r := range rings {
		for _, user := range []string{"alice@example.com", "Alice@Example.COM", "ÄLICE@MÜNCHEN.DE", long} {
			if n := testing.AllocsPerRun(100, func() { r.Pick(user) }); n != 0 {
				t.Errorf("%s: Pick(%q) allocates %v times, want 0", name, user, n)
			}
			dst := make([]Backend, 0, r.Len())
			if n := testing.AllocsPerRun(100, func() { r.Order(user, dst[:0]) }); n != 0 {
				t.Errorf("%s: Order(%q) with room in dst allocates %v times, want 0", name, user, n)
			}
		}
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{3, 8, 16, 128, 512} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) { benchPick(b, New(nodes(n, nil), Options{}), users(1024)) })
	}
}

func BenchmarkPickMixedCase(b *testing.B) {
	us := users(1024)
	for i := range us {
		us[i] = strings.ToUpper(us[i][:1]) + us[i][1:]
	}
	for _, n := range []int{16, 512} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) { benchPick(b, New(nodes(n, nil), Options{}), us) })
	}
}

func BenchmarkPickWeighted(b *testing.B) {
	for _, n := range []int{3, 8, 16, 128, 512} {
		r := New(nodes(n, func(i int) int { return 1 + i%4 }), Options{})
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) { benchPick(b, r, users(1024)) })
	}
}

func BenchmarkOrder(b *testing.B) {
	for _, n := range []int{16, 512} {
		b.Run(fmt.Sprintf("n=%d", n), func(b *testing.B) {
			r, us := New(nodes(n, nil), Options{}), users(1024)
			dst := make([]Backend, 0, n)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				dst = r.Order(us[i&1023], dst[:0])
				i++
			}
		})
	}
}

func benchPick(b *testing.B, r *Ring, us []string) {
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		r.Pick(us[i&(len(us)-1)])
		i++
	}
}

// nodes returns n backends "imap-00".."imap-nn"; weight(i) sets weights when
// non-nil.
func nodes(n int, weight func(int) int) []Backend {
	bs := make([]Backend, n)
	for i := range bs {
		bs[i] = Backend{ID: fmt.Sprintf("imap-%02d", i), Addr: fmt.Sprintf("10.0.%d.%d:143", i/256, i%256)}
		if weight != nil {
			bs[i].Weight = weight(i)
		}
	}
	return bs
}

// byWeightThenID is the order a constant hash must give: all u are equal,
// so scores rank as weights, and equal weights by ID.
func byWeightThenID(bs []Backend) []string {
	bs = slices.Clone(bs)
	slices.SortFunc(bs, func(a, b Backend) int {
		if c := cmp.Compare(b.Weight, a.Weight); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	return ids(bs)
}

func reversed(bs []Backend) []Backend {
	out := slices.Clone(bs)
	slices.Reverse(out)
	return out
}

func users(n int) []string {
	us := make([]string, n)
	for i := range us {
		us[i] = fmt.Sprintf("user%d@example%d.com", i, i%13)
	}
	return us
}

func picks(r *Ring, us []string) []string {
	out := make([]string, len(us))
	for i, u := range us {
		b, _ := r.Pick(u)
		out[i] = b.ID
	}
	return out
}

func ids(bs []Backend) []string {
	out := make([]string, len(bs))
	for i, b := range bs {
		out[i] = b.ID
	}
	return out
}

// TestNeedsLower holds the word-at-a-time needsLower to the byte rule: every
// byte value at every position of names up to 17 bytes long.
func TestNeedsLower(t *testing.T) {
	want := func(s string) bool {
		for i := 0; i < len(s); i++ {
			if c := s[i]; c >= 0x80 || 'A' <= c && c <= 'Z' {
				return true
			}
		}
		return false
	}
	for n := 0; n <= 17; n++ {
		base := []byte(strings.Repeat("a", n))
		if got := needsLower(string(base)); got {
			t.Fatalf("needsLower(%q) = true", base)
		}
		for pos := 0; pos < n; pos++ {
			for c := 0; c < 256; c++ {
				b := append([]byte(nil), base...)
				b[pos] = byte(c)
				if got := needsLower(string(b)); got != want(string(b)) {
					t.Fatalf("needsLower(%q) = %v, want %v", b, got, !got)
				}
			}
		}
	}
}

// TestSumLowerWords holds sumLower's word-at-a-time lowercasing to the byte
// rule: every byte value at every position of names up to 17 bytes long.
func TestSumLowerWords(t *testing.T) {
	for n := 1; n <= 17; n++ {
		base := []byte(strings.Repeat("q", n))
		for pos := 0; pos < n; pos++ {
			for c := 0; c < 256; c++ {
				b := append([]byte(nil), base...)
				b[pos] = byte(c)
				want := xxhash.Sum64(appendLower(nil, string(b)))
				if got := sumLower(string(b)); got != want {
					t.Fatalf("sumLower(%q) = %x, want the hash of %q", b, got, appendLower(nil, string(b)))
				}
			}
		}
	}
}
