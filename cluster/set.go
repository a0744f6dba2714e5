// Package cluster is the backend set as this proxy sees it: the members
// discovery reports (after damping), which of them an operator drained,
// which discovery holds back after a flap, which this proxy saw fail
// lately, and the ring that ranks the ones in service for each user.
//
// It is named for the configuration's cluster block, whose settings
// (hash_key, rejoin_hold, backend_drain) it serves, and for what it will
// grow into: the place where a fleet of proxies agrees on where each user
// is. A Set is an immutable snapshot, read without a lock on every login;
// a Roster owns the current one and is the only writer. It installs
// memberships, drains and undrains, and marks backends down, and tells its
// caller what changed (a Change) instead of acting on it: ending sessions
// and closing cached connections belong to the proxy and the pool, which
// sit below this package. Nothing here does I/O, calls back or logs.
//
// Later cluster features land here: drains and user moves read from
// Consul KV become further inputs of the Roster beside the operator's
// drains, with overrides that Order consults before the ring; slow start
// becomes a ramp in the Set that Order reads with the time; session-aware
// moves act on what a Change reports (backends that left, were drained,
// returned or changed weight).
package cluster

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
)

// Set is one state of the backend set, never changed once published: a
// Roster builds a new Set for every change and swaps it in whole.
type Set struct {
	key  balancer.KeyMode
	ring *balancer.Ring // of the serving backends
	// serving holds the backends in service: the members less those an
	// operator drained. Sessions check their backend against it, so that
	// a login under way to a drained backend moves on and a session on
	// one does not cache its connection.
	serving map[string]backend.Backend
	members map[string]backend.Backend // discovery's set, drained ones included
	// held are backends discovery finds healthy but holds back from the
	// set for a while after a flap (cluster.rejoin_hold): they take no
	// new login, but their sessions go on. Not in members.
	held map[string]backend.Backend
	// health is of members. A member that stays the same from one Set to
	// the next keeps its *health, so a mark is not lost to a change.
	health map[string]*health
}

// empty is the Set of a Roster that has installed nothing yet.
var empty = &Set{}

// health is this proxy's own view of a backend, from failed dials and
// logins. Discovery decides the set; this only reorders failover for a
// short while. Read and written without a lock.
type health struct {
	downUntil atomic.Int64 // unix nanoseconds
}

func (h *health) down(now time.Time) bool { return now.UnixNano() < h.downUntil.Load() }

// downAt reports whether id is marked down at now, and until when.
func (s *Set) downAt(id string, now time.Time) (time.Time, bool) {
	h := s.health[id]
	if h == nil || !h.down(now) {
		return time.Time{}, false
	}
	return time.Unix(0, h.downUntil.Load()), true
}

// Ring returns the ring of the backends in service.
func (s *Set) Ring() *balancer.Ring { return s.ring }

// Len returns the number of backends in service; 0 for a nil Set.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.serving)
}

// HeldLen returns the number of backends held back; 0 for a nil Set.
func (s *Set) HeldLen() int {
	if s == nil {
		return 0
	}
	return len(s.held)
}

// Serves reports whether b, as it is, is in service: a member with the
// same address and TLS mode, and not drained.
func (s *Set) Serves(b backend.Backend) bool {
	cur, ok := s.serving[b.ID]
	return ok && cur.Same(b)
}

// Healthy reports whether discovery has b, as it is, as healthy: in
// service, drained by an operator, or held back after a flap. Sessions on
// a healthy backend are never ended for its sake.
func (s *Set) Healthy(b backend.Backend) bool {
	if cur, ok := s.members[b.ID]; ok && cur.Same(b) {
		return true
	}
	cur, ok := s.held[b.ID]
	return ok && cur.Same(b)
}

// Serving returns the backends in service as installed, sorted by ID.
func (s *Set) Serving() []backend.Backend {
	out := make([]backend.Backend, 0, len(s.serving))
	for _, b := range s.serving {
		out = append(out, b)
	}
	slices.SortFunc(out, byID)
	return out
}

func byID(a, b backend.Backend) int { return cmp.Compare(a.ID, b.ID) }

// Candidates are a user's backends for one login, in the order to try.
type Candidates struct {
	// All are the backends in service in the user's rendezvous order,
	// those this proxy marked down moved behind the others; each part
	// keeps the user's order. The backends are as installed.
	All []backend.Backend
	// Live is how many of All, from the front, are not marked down.
	Live  int
	first int // index in All of the user's first choice
}

// First returns the user's first choice by the hash, marked down or not:
// a login served by another backend is a failover. It is empty when All
// is.
func (c Candidates) First() backend.Backend {
	if len(c.All) == 0 {
		return backend.Backend{}
	}
	// An index rather than a copy in the struct: a copied string would
	// tie All's storage to wherever the caller's copy of it goes, and
	// move the caller's buffer to the heap.
	return c.All[c.first]
}

// Try returns the backends a login tries, in order: those not marked
// down, or every one when all are, since a mark is a guess and a login
// that tries nothing fails for sure.
func (c Candidates) Try() []backend.Backend {
	if c.Live == 0 {
		return c.All
	}
	return c.All[:c.Live]
}

// Order appends the backends in service to dst in user's failover order
// (see Candidates) and returns them. It takes no lock and allocates only
// to grow dst: a login passes a buffer on its stack.
func (s *Set) Order(user string, dst []backend.Backend) Candidates {
	start := len(dst)
	dst = s.ring.Order(user, dst)
	all := dst[start:]
	if len(all) == 0 {
		return Candidates{All: all}
	}
	// The ring normalises weights; hand out the backends as installed.
	for i := range all {
		all[i] = s.serving[all[i].ID]
	}
	c := Candidates{All: all}
	now := time.Now()
	// A stable partition in place: usually nothing is down and nothing
	// moves.
	for i, b := range all {
		if _, down := s.downAt(b.ID, now); down {
			if i == 0 {
				c.first = -1 // the first of the down part, found below
			}
			continue
		}
		copy(all[c.Live+1:i+1], all[c.Live:i])
		all[c.Live] = b
		c.Live++
	}
	if c.first < 0 {
		c.first = c.Live
	}
	return c
}

// Placement is where a user's logins go, for an operator to read.
type Placement struct {
	// Key is what the ring hashes: the name as the key mode makes it.
	Key string
	// Order is every member in the user's rendezvous order, drained ones
	// included: the failover sequence. Nil when there is no member.
	Order []Rank
	// Backend is where a login of the user goes now: the first of Order
	// in service and not marked down (the first in service if all are
	// down); "" when no backend is in service.
	Backend string
}

// Rank is one member in a user's order.
type Rank struct {
	ID      string
	Down    bool
	Drained bool
}

// Place describes where user's logins go. It builds a ring, so it is for
// the operator's questions, not for logins.
func (s *Set) Place(user string) Placement {
	// The set's own ring leaves drained backends out; the order among the
	// others is the same in a ring of all, rendezvous scores being per
	// backend.
	all := make([]backend.Backend, 0, len(s.members))
	for _, b := range s.members {
		all = append(all, b)
	}
	full := balancer.New(all, balancer.Options{Key: s.key})
	p := Placement{Key: full.Key(user)}
	now := time.Now()
	first := ""
	for _, b := range full.Order(user, nil) {
		_, inService := s.serving[b.ID]
		_, down := s.downAt(b.ID, now)
		p.Order = append(p.Order, Rank{ID: b.ID, Drained: !inService, Down: down})
		if inService && first == "" {
			first = b.ID
		}
		if inService && !down && p.Backend == "" {
			p.Backend = b.ID
		}
	}
	if p.Backend == "" {
		p.Backend = first // every backend in service is down: a login tries them all
	}
	return p
}

// Member is one backend of the set with its state.
type Member struct {
	backend.Backend // as installed
	// Drained is set while an operator keeps new logins off it.
	Drained bool
	// Held is set while discovery has it healthy but holds it back after
	// a flap: no new logins, sessions go on. A held backend is no member
	// of the set proper, and is never drained or down.
	Held bool
	// Down is set while this proxy skips the backend after a failure,
	// until DownUntil.
	Down      bool
	DownUntil time.Time
}

// Members describes every member, drained ones included, and every held
// backend, sorted by ID.
func (s *Set) Members() []Member {
	now := time.Now()
	out := make([]Member, 0, len(s.members)+len(s.held))
	for id, b := range s.members {
		m := Member{Backend: b}
		_, inService := s.serving[id]
		m.Drained = !inService
		m.DownUntil, m.Down = s.downAt(id, now)
		out = append(out, m)
	}
	for _, b := range s.held {
		out = append(out, Member{Backend: b, Held: true})
	}
	slices.SortFunc(out, func(a, b Member) int { return cmp.Compare(a.ID, b.ID) })
	return out
}
