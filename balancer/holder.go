package balancer

import "sync/atomic"

// empty is what a Holder hands out before the first Store, so that callers
// never need a nil check: Pick on it reports false.
var empty = New(nil, Options{})

// Holder publishes the current Ring to concurrent readers. Discovery builds a
// new Ring for each backend set and stores it; sessions Load and Pick without
// a lock. The zero value is ready and holds an empty ring.
type Holder struct {
	p atomic.Pointer[Ring]
}

// Load returns the current ring, never nil.
func (h *Holder) Load() *Ring {
	if r := h.p.Load(); r != nil {
		return r
	}
	return empty
}

// Store replaces the current ring; nil stores an empty one.
func (h *Holder) Store(r *Ring) {
	h.p.Store(r)
}
