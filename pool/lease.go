package pool

import (
	"context"
	"sync/atomic"
	"time"
)

// Lease is a slot of the connection budget in a caller's hands: the slot
// of a connection being dialled (Table.Lease) or of a cached one checked
// out (Table.Take). It travels with the connection it pays for until Put,
// Discard, Abort or Release settles it. The first of these settles it and
// the others then do nothing, to the budget or to the connection they are
// given: a caller with several ways out settles on each without keeping
// count, and a slot is neither given back twice nor kept for ever. As with
// database/sql's driverConn, the pool does the counting; the caller only
// says what became of the connection.
type Lease struct {
	t       *Table
	conn    Conn      // the cached connection Take handed out; nil from Lease
	born    time.Time // conn's first authentication
	settled atomic.Bool
}

// Lease takes a slot of the budget for a new connection to t's backend,
// before it is dialled. When the budget is spent, the oldest cached
// connection of any backend is aborted to make room, or else a
// connection logging out is, its LOGOUT cut short. It fails with ErrFull
// when none can.
func (t *Table) Lease() (*Lease, error) {
	if err := t.pool.reserve(); err != nil {
		return nil, err
	}
	t.pool.inUse.Add(1)
	return &Lease{t: t}, nil
}

// Take checks out a cached connection of user authenticated with the
// same credential digest d, proven alive by Check within ctx, as l.Conn(),
// with its lease. It tries the most recently cached first. It reports
// false when there is none; the caller then leases a slot for a new
// connection. A digest that matches none of the user's connections leaves
// them all in place: a wrong password evicts nothing. A connection that
// fails its check is aborted, not logged out: it is broken, and the login
// must not wait for it.
func (t *Table) Take(ctx context.Context, user string, d Digest) (l *Lease, ok bool) {
	e := t.get(ctx, user, d)
	if e == nil {
		return nil, false
	}
	t.pool.inUse.Add(1)
	return &e.lease, true
}

// Conn is the cached connection Take handed out with the lease, nil for a
// lease of Table.Lease.
func (l *Lease) Conn() Conn { return l.conn }

// Born is when Conn was first authenticated.
func (l *Lease) Born() time.Time { return l.born }

// Table is the table the lease was taken from, whose backend its
// connection belongs to.
func (l *Lease) Table() *Table { return l.t }

// Put caches c, an idle connection at a command boundary and in the
// authenticated state, for user with credential digest d, the slot going
// with it, and settles the lease. born is when c was first authenticated.
// If the table or pool is closed, caching is off, or c is older than
// MaxAge, c is closed instead, in the background. The user's oldest cached
// connection is closed when MaxPerUser is reached.
func (l *Lease) Put(user string, d Digest, c Conn, born time.Time) {
	if l.settle() {
		l.t.put(user, d, c, born)
	}
}

// Discard logs c out and closes it in the background, and settles the
// lease: its slot comes back once c is closed.
func (l *Lease) Discard(c Conn) {
	if l.settle() {
		l.t.closeAsync(c, true)
	}
}

// Abort closes c at once, without a word to the server, and gives the
// slot back: for a connection whose stream is in doubt, where a LOGOUT
// would only wait, or one that has logged out already.
func (l *Lease) Abort(c Conn) {
	if l.settle() {
		c.Abort()
		l.t.pool.release()
	}
}

// Release gives the slot back: for a lease whose connection was never
// made (a dial failed) or is closed already.
func (l *Lease) Release() {
	if l.settle() {
		l.t.pool.release()
	}
}

// settle reports whether this call is the one that settles l.
func (l *Lease) settle() bool {
	if !l.settled.CompareAndSwap(false, true) {
		return false
	}
	l.t.pool.inUse.Add(-1)
	return true
}
