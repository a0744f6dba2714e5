// Package balancer maps each user onto one backend with weighted rendezvous
// (highest random weight) hashing, so that proxy processes that see the same
// backend set agree on every user's backend without talking to each other.
//
// For a user with normalised key k (see KeyMode) and a backend b, the
// rendezvous hash is
//
//	h = mix64(Hash(k) ^ Hash(b.ID))
//
// where mix64 is the SplitMix64 finalizer. Combining two hashes instead of
// hashing k+"\x00"+b.ID keeps Pick to one pass over the key and one multiply
// chain per backend; the ID hashes are computed once in New. Each score still
// depends only on the key and that backend's own ID, which is the property
// rendezvous hashing needs: removing a backend moves only its users, adding
// one moves users only onto it.
//
// h is mapped to u = (h>>11 + 1) / 2^53 in (0, 1] and scored as
// -Weight / ln(u); the highest score wins and equal scores go to the smaller
// ID. With weights w_i that makes backend i win for w_i/Σw of users.
//
// Nothing depends on a random seed, map order or input order, so every
// process builds the same mapping from the same set. One caveat for weighted
// rings only: math.Log is assembly on amd64 and Go elsewhere, and the two may
// differ in the last bit, so a fleet mixing architectures can disagree on a
// user whose two best scores are within about 1e-16 of each other.
package balancer

import (
	"cmp"
	"math"
	"slices"

	"github.com/cespare/xxhash/v2"

	"github.com/imapproxy/imapproxy/backend"
)

// KeyMode selects how a username is normalised into the hash key.
type KeyMode int

const (
	// KeyLowercase hashes the Unicode-lowercased name, so that "Bob" and
	// "bob" share a backend, as they share a mailbox on most servers.
	KeyLowercase KeyMode = iota
	// KeyExact hashes the name byte for byte.
	KeyExact
	// KeyDomain hashes the lowercased part after the last '@' (the whole
	// lowercased name when there is no '@'), keeping a domain's users on one
	// backend for shared folders.
	KeyDomain
)

// Options configures a Ring. The zero value hashes with xxhash and folds case.
type Options struct {
	// Hash hashes both keys and backend IDs; nil means xxhash.Sum64String.
	// Every proxy process must use the same function. Only the default is
	// allocation-free for names that need lowercasing: an arbitrary function
	// must be given a string, the default can be fed bytes from the stack.
	Hash func(string) uint64
	Key  KeyMode
}

// Ring is an immutable rendezvous table. A changed backend set gets a new
// Ring rather than an edit, published by swapping a pointer, so lookups
// need no lock. The zero Ring, and a nil *Ring, are empty.
type Ring struct {
	backends []backend.Backend // sorted by ID, weights normalised
	// idHash[i] = Hash(backends[i].ID) and weight[i] = backends[i].Weight,
	// in slices of their own so that the uniform Pick loop streams through
	// 8 bytes per backend.
	idHash []uint64
	weight []float64
	// uniform is set when all weights are equal. Then -w/ln(u) is increasing
	// in u, so comparing u ranks as the score does, without a logarithm and
	// without the rounding that could give two nearby u the same float score.
	uniform bool
	hash    func(string) uint64 // nil: xxhash, fed without allocating
	key     KeyMode
}

// New builds a Ring from a copy of backends. The order of the input does not
// matter; when IDs repeat, the first occurrence is kept.
func New(backends []backend.Backend, opts Options) *Ring {
	bs := slices.Clone(backends)
	// Stable, so that "keep the first" refers to the caller's order.
	slices.SortStableFunc(bs, func(a, b backend.Backend) int { return cmp.Compare(a.ID, b.ID) })
	bs = slices.CompactFunc(bs, func(a, b backend.Backend) bool { return a.ID == b.ID })
	bs = slices.Clip(bs)

	r := &Ring{
		backends: bs,
		idHash:   make([]uint64, len(bs)),
		weight:   make([]float64, len(bs)),
		uniform:  true,
		hash:     opts.Hash,
		key:      opts.Key,
	}
	for i := range bs {
		if bs[i].Weight <= 0 {
			bs[i].Weight = 1
		}
		r.idHash[i] = r.sum(bs[i].ID)
		r.weight[i] = float64(bs[i].Weight)
		if bs[i].Weight != bs[0].Weight {
			r.uniform = false
		}
	}
	return r
}

// Len returns the number of distinct backends.
func (r *Ring) Len() int {
	if r == nil {
		return 0
	}
	return len(r.backends)
}

// Backends returns a copy of the backends sorted by ID, with weights as used
// (<= 0 replaced by 1).
func (r *Ring) Backends() []backend.Backend {
	if r == nil {
		return nil
	}
	return slices.Clone(r.backends)
}

// Pick returns the user's backend, or false when the ring is empty.
// It takes no lock and does not allocate (with the default Hash).
func (r *Ring) Pick(user string) (backend.Backend, bool) {
	if r.Len() == 0 {
		return backend.Backend{}, false
	}
	kh := r.keyHash(user)
	ids := r.idHash
	best := 0
	if r.uniform {
		bu := unit(kh, ids[0])
		for i := 1; i < len(ids); i++ {
			// Strict: on a tie the earlier, smaller ID stays.
			if u := unit(kh, ids[i]); u > bu {
				best, bu = i, u
			}
		}
		return r.backends[best], true
	}
	ws := r.weight[:len(ids)]
	bs := score(unit(kh, ids[0]), ws[0])
	for i := 1; i < len(ids); i++ {
		x := unit(kh, ids[i])
		// With t = 1-u, -ln(u) = t + t²/2 + t³/3 + ... >= t + t²/2, which
		// bounds the score by w/(t + t²/2), tightly for the u near 1 that
		// win. Skipping the logarithm when even the bound loses, with a
		// margin far above rounding error so that a skip never changes the
		// result, leaves about one log per record-breaking backend.
		t := float64(int64(1<<53-1-x)) * 0x1p-53 // exact
		if ws[i]*(1+1e-9) < bs*(t+t*t*0.5) {
			continue
		}
		if s := score(x, ws[i]); s > bs {
			best, bs = i, s
		}
	}
	return r.backends[best], true
}

// Order appends every backend to dst, best first: the user's failover
// sequence. Order(u, nil)[0] is Pick(u), and Order(u, nil)[1] is what Pick
// returns once the first is removed. It allocates only to grow dst.
func (r *Ring) Order(user string, dst []backend.Backend) []backend.Backend {
	n := r.Len()
	if n == 0 {
		return dst
	}
	kh := r.keyHash(user)
	start := len(dst)
	dst = slices.Grow(dst, n)[:start+n]
	out := dst[start:]

	if n <= orderStack {
		// Typical clusters: rank each backend once into a stack buffer.
		var buf [orderStack]ranked
		rs := buf[:n]
		for i := range rs {
			rs[i] = ranked{r.rankKey(kh, i), i}
		}
		slices.SortFunc(rs, compareRanked)
		for i, x := range rs {
			out[i] = r.backends[x.i]
		}
		return dst
	}
	// Large rings: out doubles as the sort's scratch space, each slot
	// carrying its backend's index in Weight until the final pass, so that
	// Order needs no buffer of its own. Keys are recomputed per comparison.
	for i := range out {
		out[i] = backend.Backend{Weight: i}
	}
	slices.SortFunc(out, func(a, b backend.Backend) int {
		return compareRanked(ranked{r.rankKey(kh, a.Weight), a.Weight}, ranked{r.rankKey(kh, b.Weight), b.Weight})
	})
	for i := range out {
		out[i] = r.backends[out[i].Weight]
	}
	return dst
}

// orderStack is the largest ring that Order ranks in a stack buffer (1 KiB).
const orderStack = 64

type ranked struct {
	key uint64
	i   int
}

// compareRanked puts higher keys first and equal keys in index (ID) order.
func compareRanked(a, b ranked) int {
	if c := cmp.Compare(b.key, a.key); c != 0 {
		return c
	}
	return cmp.Compare(a.i, b.i)
}

// rankKey is backend i's rank for key hash kh as Pick sees it: u itself for
// a uniform ring, otherwise the score's bits, which for positive floats and
// +Inf order as the floats do.
func (r *Ring) rankKey(kh uint64, i int) uint64 {
	x := unit(kh, r.idHash[i])
	if r.uniform {
		return x
	}
	return math.Float64bits(score(x, r.weight[i]))
}

// unit returns 2^53·u - 1 for the pair's u = (h>>11 + 1) / 2^53: the integer
// that u grows with, cheaper to compare than u itself.
func unit(kh, idh uint64) uint64 {
	return mix64(kh^idh) >> 11
}

// score is the weighted rendezvous score -w/ln(u) for unit x.
func score(x uint64, w float64) float64 {
	if x == 1<<53-1 {
		// u == 1: ln(u) is +0 and -w/+0 would be -Inf, the opposite of the
		// limit as u approaches 1.
		return math.Inf(1)
	}
	u := float64(int64(x+1)) * 0x1p-53 // exact: x+1 <= 2^53; int64 converts faster
	return -w / math.Log(u)
}

// mix64 is the SplitMix64 finalizer: a bijection with full avalanche, so
// XOR-combined inputs that differ in one bit give unrelated outputs.
func mix64(z uint64) uint64 {
	z ^= z >> 30
	z *= 0xbf58476d1ce4e5b9
	z ^= z >> 27
	z *= 0x94d049bb133111eb
	z ^= z >> 31
	return z
}

// sum is the configured hash of s.
func (r *Ring) sum(s string) uint64 {
	if r.hash == nil {
		return xxhash.Sum64String(s)
	}
	return r.hash(s)
}

// Key returns the normalised key that user is hashed by.
func (r *Ring) Key(user string) string {
	s, fold := r.keySource(user)
	if fold && needsLower(s) {
		return string(appendLower(make([]byte, 0, len(s)+utf8Max), s))
	}
	return s
}

// keyHash is r.sum(r.Key(user)) without building the key string when the
// default hash is in use.
func (r *Ring) keyHash(user string) uint64 {
	s, fold := r.keySource(user)
	if !fold || !needsLower(s) {
		return r.sum(s)
	}
	if r.hash == nil {
		return sumLower(s)
	}
	return r.hash(string(appendLower(make([]byte, 0, len(s)+utf8Max), s)))
}

// keySource returns the part of user that the key is made from, and whether
// it is to be lowercased.
func (r *Ring) keySource(user string) (string, bool) {
	switch r.key {
	case KeyExact:
		return user, false
	case KeyDomain:
		for i := len(user) - 1; i >= 0; i-- {
			if user[i] == '@' {
				return user[i+1:], true
			}
		}
		return user, true
	default:
		return user, true
	}
}
