package discovery

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
)

// Damper delays the return of backends that left the set recently. It
// sits between a source of sets (Watcher.Run, Static.Run) and their
// consumer: a backend whose health check flaps would otherwise be removed
// and re-added at every flip, and each flip moves its users to their
// fallback backend and back, closing cached connections and logging in
// afresh on both sides.
//
// Removals, and changes to the address, TLS mode or weight of a backend
// that stays, pass at once: a failing backend must leave fast. The first
// set passes whole, and so does a backend never seen before. A backend
// that returns less than hold after it left the source's set is withheld
// until it has been in the source's sets continuously for hold; a timer
// then delivers the source's latest set with it. Should it leave again
// before that, the wait starts over at its next return.
//
// Damping only ever keeps users from moving back and forth; it never
// lengthens an outage. A withheld backend is delivered as held: healthy
// by the source, so the consumer ends no session on it, but taking no
// new logins. And when every backend the source has is withheld, they
// are all let in at once: with nowhere else to go, a login waiting for
// the hold would only fail. (A user may log in on any backend of the set,
// in the user's order, so "every backend of a user" is every backend.)
//
// Identity is Backend.ID, as in Normalize: a backend that comes back with
// another address is still the one that left, and waits.
type Damper struct {
	// Log, if set before the first Update, says when a backend is held
	// back and when it is let in: without it an operator sees a backend
	// healthy in Consul and unused by the proxy, and no reason.
	Log hclog.Logger

	hold   time.Duration
	update func(in, held []backend.Backend)

	// mu is held across each call of update as well: that is what keeps
	// the calls from the source's goroutine and from the timer apart and
	// in order, and lets Stop promise that none follows it.
	mu       sync.Mutex
	stopped  bool
	src      []backend.Backend    // the source's latest set, normalized
	last     []backend.Backend    // last set delivered; nil before the first
	lastHeld []backend.Backend    // last held set delivered
	left     map[string]time.Time // ID -> when it last left src; pruned after hold
	withheld map[string]time.Time // ID in src -> when it may be delivered
	timer    *time.Timer          // armed for the earliest time in withheld
}

// NewDamper returns a Damper that passes sets on to update. hold <= 0
// disables damping: every change passes at once.
//
// update gets the set to use (in) and the backends of the source's set
// withheld from it (held); together they are the source's set. It is
// never called concurrently with itself, never twice in a row with equal
// sets, and always with normalized sets the consumer may keep.
// It is called from the goroutine that called Update, or from a timer's
// own goroutine when a withheld backend is let in, with the Damper's lock
// held: it must not call Update or Stop.
func NewDamper(hold time.Duration, update func(in, held []backend.Backend)) *Damper {
	return &Damper{
		hold:     hold,
		update:   update,
		left:     make(map[string]time.Time),
		withheld: make(map[string]time.Time),
	}
}

// Update takes each set the source delivers, in any order (it is
// normalized), and calls update at once if the set to deliver changed.
// Its signature fits Watcher.Run and Static.Run. After Stop it does
// nothing.
func (d *Damper) Update(bs []backend.Backend) {
	set := backend.Normalize(bs)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		return
	}
	now := time.Now()
	if d.hold > 0 {
		d.trackLocked(set, now)
	}
	d.src = set
	d.deliverLocked(now)
}

// Stop cancels the pending timer, if any. Once Stop returns, update is
// not called again (Stop waits for a call in progress) and Update does
// nothing. Stop may be called more than once.
func (d *Damper) Stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stopped = true
	if d.timer != nil {
		d.timer.Stop()
	}
}

// trackLocked notes, between d.src and the source's new set, the IDs that
// left and those that came back soon enough to be withheld.
func (d *Damper) trackLocked(set []backend.Backend, now time.Time) {
	for id, at := range d.left {
		if now.Sub(at) >= d.hold {
			delete(d.left, id) // a return from now on is not damped
		}
	}
	for _, b := range d.src {
		if !containsID(set, b.ID) {
			// Its wait starts over on return; meanwhile withheld keeps
			// to IDs in src, so a backend gone for good leaves no trace.
			d.left[b.ID] = now
			if _, held := d.withheld[b.ID]; held && d.Log != nil {
				d.Log.Info("backend left again while held back: flapping", "backend", b.ID)
			}
			delete(d.withheld, b.ID)
		}
	}
	for _, b := range set {
		if containsID(d.src, b.ID) {
			continue
		}
		if _, ok := d.left[b.ID]; ok {
			d.withheld[b.ID] = now.Add(d.hold)
			delete(d.left, b.ID)
			if d.Log != nil {
				d.Log.Info("backend came back soon after it left; held back from the set", "backend", b.ID, "for", d.hold)
			}
		}
	}
}

// deliverLocked calls update with d.src less the backends still withheld
// at now, and those, unless that is what it delivered last, and arms the
// timer for the next backend due.
func (d *Damper) deliverLocked(now time.Time) {
	out := make([]backend.Backend, 0, len(d.src))
	held := make([]backend.Backend, 0, len(d.withheld))
	var next time.Time
	for _, b := range d.src {
		if due, ok := d.withheld[b.ID]; ok {
			if now.Before(due) {
				if next.IsZero() || due.Before(next) {
					next = due
				}
				held = append(held, b)
				continue
			}
			delete(d.withheld, b.ID)
			if d.Log != nil {
				d.Log.Info("backend stayed; back in the set", "backend", b.ID)
			}
		}
		out = append(out, b)
	}
	if len(out) == 0 && len(held) > 0 {
		// Holding them back would leave every login without a backend
		// while the source has healthy ones.
		for _, b := range held {
			delete(d.withheld, b.ID)
			if d.Log != nil {
				d.Log.Info("backend let in at once: no other backend is healthy", "backend", b.ID)
			}
		}
		out, held, next = held, held[:0:0], time.Time{}
	}

	switch {
	case next.IsZero():
		if d.timer != nil {
			d.timer.Stop()
		}
	case d.timer == nil:
		d.timer = time.AfterFunc(next.Sub(now), d.fire)
	default:
		d.timer.Reset(next.Sub(now))
	}

	if d.last != nil && backend.Equal(d.last, out) && backend.Equal(d.lastHeld, held) {
		return
	}
	d.last, d.lastHeld = out, held
	d.update(slices.Clone(out), slices.Clone(held))
}

// fire runs on the timer's goroutine. It may run after a Reset or Stop it
// raced with; since it only delivers what is due by then, and never a
// repeat, a stale firing is harmless.
func (d *Damper) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		return
	}
	d.deliverLocked(time.Now())
}

// containsID reports whether the normalized set bs holds a backend with
// the given ID.
func containsID(bs []backend.Backend, id string) bool {
	_, found := slices.BinarySearchFunc(bs, id, func(b backend.Backend, id string) int { return cmp.Compare(b.ID, id) })
	return found
}
