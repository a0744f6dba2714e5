package cluster

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
)

var (
	// ErrUnknownBackend is returned for a backend ID not in the set.
	ErrUnknownBackend = errors.New("cluster: unknown backend")
	// ErrLastBackend refuses to drain the last backend in service, which
	// would make every login fail.
	ErrLastBackend = errors.New("cluster: last backend in service")
)

// Options configure a Roster. The zero value works.
type Options struct {
	// Key says what of a user name the ring hashes.
	Key balancer.KeyMode
}

// Roster owns the current Set and makes every change to it. Changes are
// serialised by a mutex under which it only computes; readers load the
// Set without a lock. The zero Roster holds an empty set.
type Roster struct {
	cur atomic.Pointer[Set]

	mu  sync.Mutex       // serialises changes
	key balancer.KeyMode // guarded by mu
	// drained are the backend IDs an operator drained, all of them
	// members: a drain is forgotten when its backend leaves the set.
	// Guarded by mu.
	drained map[string]bool
}

// New returns a Roster with an empty set.
func New(opts Options) *Roster {
	r := &Roster{key: opts.Key}
	r.cur.Store(&Set{key: opts.Key, ring: balancer.New(nil, balancer.Options{Key: opts.Key})})
	return r
}

// Load returns the current set.
func (r *Roster) Load() *Set {
	if s := r.cur.Load(); s != nil {
		return s
	}
	return empty
}

// Change is what one change did to the set, for the caller to act on:
// the Roster has installed New by the time it returns one. Lists are
// sorted by ID.
type Change struct {
	Old, New *Set
	// Left were in service and are not now, nor members as they were
	// (gone, or back with another address or TLS mode): their cached
	// connections are no good, and their sessions are to end unless the
	// backend is healthy again by then.
	Left []backend.Backend
	// Drained were in service and are still members as they were, but an
	// operator drained them: no new logins or caching, sessions go on.
	Drained []backend.Backend
	// Undrained were drained and are in service again.
	Undrained []backend.Backend
	// HeldLeft were held back and are not healthy now: sessions still on
	// them from before they were held are to end as for Left.
	HeldLeft []backend.Backend
	// Dropped are the IDs of members that are members no more.
	Dropped []string
	// Reweighted are members that stayed as they were but for their
	// weight, as they are now: only some users' choices move.
	Reweighted []backend.Backend
}

// Changed reports whether the set lost backends in service or changed
// size: worth a line in the log.
func (c Change) Changed() bool {
	return len(c.Left) > 0 || c.Old.Len() != c.New.Len() || c.Old.HeldLen() != c.New.HeldLen()
}

// Install makes bs the members and held the backends held back (see
// discovery.Damper: healthy, but taking no new login for now). A backend
// in both is a member; a repeated ID counts once, the first. Drains of
// members that stay are kept; a member that stays the same (weight
// aside) keeps its down mark.
func (r *Roster) Install(bs, held []backend.Backend) Change {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.installLocked(bs, held)
}

// Drain takes a member out of service: it leaves the ring, so its users'
// logins go to their next backend. The drain holds across Install while
// the backend stays a member. Draining a drained backend changes nothing.
func (r *Roster) Drain(id string) (Change, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.Load()
	if _, ok := set.members[id]; !ok {
		return Change{}, fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	if r.drained[id] {
		return Change{Old: set, New: set}, nil
	}
	if _, ok := set.serving[id]; ok && len(set.serving) == 1 {
		return Change{}, fmt.Errorf("%w: %q", ErrLastBackend, id)
	}
	if r.drained == nil {
		r.drained = map[string]bool{}
	}
	r.drained[id] = true
	return r.reinstallLocked(), nil
}

// Undrain puts a drained member back in service. Undraining one in
// service changes nothing.
func (r *Roster) Undrain(id string) (Change, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.Load()
	if _, ok := set.members[id]; !ok {
		return Change{}, fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	if !r.drained[id] {
		return Change{Old: set, New: set}, nil
	}
	delete(r.drained, id)
	return r.reinstallLocked(), nil
}

// SetKey changes what the ring hashes; users are mapped anew at once.
func (r *Roster) SetKey(key balancer.KeyMode) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.Load()
	r.key = key
	if set.key == key {
		return
	}
	next := *set
	next.key = key
	next.ring = balancer.New(set.Serving(), balancer.Options{Key: key})
	r.cur.Store(&next)
}

// MarkDown makes the current set's failover order put the member id
// behind the others for d from now, and reports whether id is a member.
// It takes no lock: a mark races only with other marks.
func (r *Roster) MarkDown(id string, d time.Duration) bool {
	h := r.Load().health[id]
	if h == nil {
		return false
	}
	h.downUntil.Store(time.Now().Add(d).UnixNano())
	return true
}

// reinstallLocked rebuilds the current set with the drains as they are
// now; the caller holds mu.
func (r *Roster) reinstallLocked() Change {
	set := r.Load()
	return r.installLocked(mapValues(set.members), mapValues(set.held))
}

func mapValues(m map[string]backend.Backend) []backend.Backend {
	out := make([]backend.Backend, 0, len(m))
	for _, b := range m {
		out = append(out, b)
	}
	return out
}

// installLocked builds and publishes the set of bs less the drained, and
// held, and reports the change; the caller holds mu.
func (r *Roster) installLocked(bs, held []backend.Backend) Change {
	old := r.Load()
	next := &Set{
		key:     r.key,
		serving: make(map[string]backend.Backend, len(bs)),
		members: make(map[string]backend.Backend, len(bs)),
		health:  make(map[string]*health, len(bs)),
		held:    make(map[string]backend.Backend, len(held)),
	}
	in := make([]backend.Backend, 0, len(bs))
	for _, b := range bs {
		if _, dup := next.members[b.ID]; dup {
			continue
		}
		next.members[b.ID] = b
		if ob, ok := old.members[b.ID]; ok && ob.Same(b) {
			next.health[b.ID] = old.health[b.ID]
		} else {
			next.health[b.ID] = &health{}
		}
		if r.drained[b.ID] {
			continue
		}
		next.serving[b.ID] = b
		in = append(in, b)
	}
	for _, b := range held {
		if _, member := next.members[b.ID]; !member {
			next.held[b.ID] = b
		}
	}
	for id := range r.drained {
		if _, ok := next.members[id]; !ok {
			delete(r.drained, id)
		}
	}
	next.ring = balancer.New(in, balancer.Options{Key: r.key})
	r.cur.Store(next)
	return diff(old, next)
}

// diff says what changed from old to next.
func diff(old, next *Set) Change {
	c := Change{Old: old, New: next}
	for id, ob := range old.serving {
		if nb, ok := next.serving[id]; ok && nb.Same(ob) {
			continue
		}
		if nb, ok := next.members[id]; ok && nb.Same(ob) {
			c.Drained = append(c.Drained, ob)
		} else {
			c.Left = append(c.Left, ob)
		}
	}
	for id, ob := range old.members {
		nb, member := next.members[id]
		if !member {
			c.Dropped = append(c.Dropped, id)
			continue
		}
		if !nb.Same(ob) {
			continue
		}
		if _, was := old.serving[id]; !was {
			if _, is := next.serving[id]; is {
				c.Undrained = append(c.Undrained, nb)
			}
		}
		if nb.Weight != ob.Weight {
			c.Reweighted = append(c.Reweighted, nb)
		}
	}
	for _, ob := range old.held {
		if !next.Healthy(ob) {
			c.HeldLeft = append(c.HeldLeft, ob)
		}
	}
	for _, l := range [][]backend.Backend{c.Left, c.Drained, c.Undrained, c.HeldLeft, c.Reweighted} {
		slices.SortFunc(l, byID)
	}
	slices.Sort(c.Dropped)
	return c
}
