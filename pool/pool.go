// Package pool keeps logged-in upstream IMAP connections after their client
// logged out, so the same user's next login can skip the backend's LOGIN.
//
// There is one Table per backend and one Pool over them all. The Pool owns
// the global connection budget (max_connections counts active and cached
// connections alike) and runs the one sweeper that closes connections idle
// for longer than the expiration, as up-imapproxy's sweeper thread does.
//
// Ownership: a Lease is the only way in and out of the budget. Table.Take
// hands a cached connection to the caller with its lease, Table.Lease a
// slot for a new connection; the lease's Put, Discard or Abort hands the
// connection back, its Release a slot whose connection was never made.
// A connection in a table belongs to the table. The lease carries the
// connection's slot with it and settles once, whatever the caller does
// twice, so that no path can give a slot back twice or keep it for ever:
// the pool alone counts. No lock is held while a connection does I/O:
// entries are taken out under the lock and checked or closed outside it.
//
// Closing is asynchronous: a connection that leaves the pool is logged out
// by a background closer, never by the goroutine that decided to close it.
// The backend being closed is often the one that hangs (that is why it
// left the set), and the callers are SetBackends, a login, an operator's
// request or the sweeper, none of which may wait for it. At most
// maxClosers connections of a backend log out at once, each for at most
// CloseTimeout, so that a hung backend delays the closes of no other; a
// connection keeps its slot of the budget until its socket is closed.
package pool

import (
	"container/list"
	"context"
	"crypto/subtle"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// ErrFull means max_connections upstream connections are open and none of
// them is idle: there is nothing to close to make room.
var ErrFull = errors.New("pool: all upstream connections in use")

// Conn is an authenticated upstream connection as the pool sees it.
type Conn interface {
	// Check proves the connection alive and at a command boundary, with a
	// round trip bounded by ctx.
	Check(ctx context.Context) error
	// Close logs out (bounded) and closes the connection.
	Close() error
	// Abort closes the connection without a word to the server. It may
	// be called while Close runs, from another goroutine, to cut it
	// short, and after Close, when it does nothing.
	Abort()
}

// maxClosers is how many connections of one backend log out at once.
// Enough that a hung backend's few dozen cached connections are gone in a
// few rounds of CloseTimeout; few enough that a mass close does not knock
// on a struggling backend with hundreds of LOGOUTs at once.
const maxClosers = 8

// Digest identifies the credential a connection was authenticated with.
// It is an HMAC, never the password.
type Digest [32]byte

// Options configure a Pool. The zero value works.
type Options struct {
	Expiration    time.Duration // idle time after which a cached conn is closed (300s)
	SweepInterval time.Duration // how often the sweeper runs (60s)
	MaxAge        time.Duration // conns first authenticated longer ago are not reused (1h)
	MaxPerUser    int           // cached conns per user and table (4)
	MaxConns      int           // upstream conns in total, active + cached (1000)
	Disabled      bool          // cache nothing; Lease.Put closes
	// CloseTimeout bounds the LOGOUT of a connection being closed (2s);
	// one not done by then is aborted. A healthy backend answers in
	// milliseconds: the bound is for one that hangs.
	CloseTimeout time.Duration
	Logger       hclog.Logger
}

func (o *Options) expiration() time.Duration { return orDuration(o.Expiration, 300*time.Second) }
func (o *Options) sweepInterval() time.Duration {
	return orDuration(o.SweepInterval, 60*time.Second)
}
func (o *Options) maxAge() time.Duration { return orDuration(o.MaxAge, time.Hour) }
func (o *Options) closeTimeout() time.Duration {
	return orDuration(o.CloseTimeout, 2*time.Second)
}
func (o *Options) maxPerUser() int { return orInt(o.MaxPerUser, 4) }
func (o *Options) maxConns() int   { return orInt(o.MaxConns, 1000) }

func orDuration(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

func orInt(n, def int) int {
	if n > 0 {
		return n
	}
	return def
}

// Stats are cumulative counts, plus the current gauges.
type Stats struct {
	Open    int // upstream conns open: active + cached + closing
	Cached  int
	Closing int // conns logging out in the background
	// InUse counts the leases not settled: connections checked out with
	// Take and slots taken with Table.Lease. It is back to 0 when every
	// session has given its connection back.
	InUse int

	Hits   uint64 // Take returned a conn
	Misses uint64 // Take found nothing reusable

	// Closes of cached connections, by cause.
	ClosedExpired     uint64 // idle longer than Expiration (sweeper)
	ClosedMaxAge      uint64 // authenticated longer ago than MaxAge
	ClosedDead        uint64 // failed the liveness check on Take
	ClosedUserLimit   uint64 // pushed out by MaxPerUser
	ClosedFull        uint64 // pushed out to make room under MaxConns
	ClosedBackendGone uint64 // table removed or pool closed
	ClosedAdmin       uint64 // by an operator (Flush, CloseUser)
	// Closes cut short: the LOGOUT took longer than CloseTimeout, or was
	// still under way when Shutdown's deadline came.
	CloseAborted uint64
}

type counters struct {
	hits, misses                                 atomic.Uint64
	expired, maxAge, dead, userLimit, full, gone atomic.Uint64
	admin, aborted                               atomic.Uint64
}

// Pool is the set of per-backend tables and their shared budget.
type Pool struct {
	opts atomic.Pointer[Options] // replaced whole by SetOptions
	log  hclog.Logger

	open  atomic.Int64 // active + cached
	inUse atomic.Int64 // leases not settled (see Lease)

	mu     sync.Mutex // guards tables and closed
	tables map[string]*Table
	closed bool

	c counters

	// Background closes (see closeAsync). stop ends them at Shutdown's
	// deadline: those under way are aborted, those waiting are aborted
	// without starting.
	closing   atomic.Int64  // closes not finished, waiting ones included
	closeDone chan struct{} // a token after each close finishes; cap 1
	// closes are the closes under way that hold a slot of the budget:
	// reserve takes one back, aborting its connection, before it
	// refuses a login (see reclaim).
	closesMu sync.Mutex
	closes   map[*closeOp]struct{}
	stop     context.Context
	abortAll context.CancelFunc
}

// New returns a Pool. Call Run to start its sweeper.
func New(opts Options) *Pool {
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	p := &Pool{
		log:       log,
		tables:    make(map[string]*Table),
		closeDone: make(chan struct{}, 1),
		closes:    make(map[*closeOp]struct{}),
	}
	p.stop, p.abortAll = context.WithCancel(context.Background())
	p.opts.Store(&opts)
	return p
}

// Table returns the table of a backend, creating it on first use.
func (p *Pool) Table(backend string) *Table {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.tables[backend]
	if t == nil {
		t = &Table{pool: p, name: backend, byUser: make(map[string][]*list.Element), closers: make(chan struct{}, maxClosers), hung: make(chan struct{})}
		t.closed = p.closed
		p.tables[backend] = t
	}
	return t
}

// RemoveTable closes a backend's cached connections (it left the healthy
// set) and makes a connection put back to it later close instead of
// caching. It returns at once: the connections log out in the background.
func (p *Pool) RemoveTable(backend string) {
	p.mu.Lock()
	t := p.tables[backend]
	delete(p.tables, backend)
	p.mu.Unlock()
	if t != nil {
		t.closeConns(t.takeAll(true), &p.c.gone)
	}
}

// Close closes every cached connection and makes the pool cache nothing
// more. Active connections are their sessions' business. It returns at
// once: the connections log out in the background (see Shutdown).
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	tables := p.snapshotLocked()
	p.mu.Unlock()
	for _, t := range tables {
		t.closeConns(t.takeAll(true), &p.c.gone)
	}
}

// Shutdown is Close, then a wait until every connection the pool is
// closing has logged out, or ctx ends: then those still logging out, and
// any the pool is given to close later, are aborted without LOGOUT.
// Shutdown returns ctx's error in that case, once every socket is closed.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.Close()
	if err := p.WaitCloses(ctx); err != nil {
		p.abortAll()
		p.WaitCloses(context.Background()) // aborts take no time
		return err
	}
	return nil
}

// WaitCloses waits until no connection is being closed in the background,
// or ctx ends.
func (p *Pool) WaitCloses(ctx context.Context) error {
	for p.closing.Load() > 0 {
		select {
		case <-p.closeDone:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// closeAsync closes c, a connection of t's backend, in the background: a
// LOGOUT bounded by CloseTimeout, after waiting for one of t's maxClosers
// turns. With release, c's budget slot is given back once its socket is
// closed; without, the caller has passed the slot on already.
func (t *Table) closeAsync(c Conn, release bool) {
	op := &closeOp{c: c}
	p := t.pool
	p.closing.Add(1)
	if release {
		p.closesMu.Lock()
		p.closes[op] = struct{}{}
		p.closesMu.Unlock()
	} else {
		op.state.Store(opNoSlot)
	}
	go p.close(t, op)
}

// closeOp is one background close. Its slot of the budget is given back
// by whoever moves state from opClosing: the close when it ends
// (opDone), or reserve taking the slot over (opReclaimed).
type closeOp struct {
	c     Conn
	state atomic.Int32
}

const (
	opClosing = iota
	opDone
	opReclaimed
	opNoSlot // the slot was passed on before the close began
)

// reclaim aborts a background close that holds a slot and hands the slot
// to the caller, so that LOGOUTs waiting on a hung backend never make the
// pool refuse a login: a closing connection is as good as an idle one to
// make room with. It reports whether there was one.
func (p *Pool) reclaim() bool {
	p.closesMu.Lock()
	var op *closeOp
	for o := range p.closes {
		if o.state.CompareAndSwap(opClosing, opReclaimed) {
			op = o
			delete(p.closes, o)
			break
		}
	}
	p.closesMu.Unlock()
	if op == nil {
		return false
	}
	p.c.aborted.Add(1)
	op.c.Abort()
	return true
}

func (p *Pool) close(t *Table, op *closeOp) {
	c := op.c
	defer func() {
		if op.state.CompareAndSwap(opClosing, opDone) {
			p.closesMu.Lock()
			delete(p.closes, op)
			p.closesMu.Unlock()
			p.release()
		}
		p.closing.Add(-1)
		select {
		case p.closeDone <- struct{}{}:
		default:
		}
	}()
	abort := func() {
		p.c.aborted.Add(1)
		c.Abort()
	}
	hung := t.hungCh()
	select {
	case <-p.stop.Done():
		abort()
		return
	case <-hung:
		abort()
		return
	case t.closers <- struct{}{}:
		defer func() { <-t.closers }()
	}
	if op.state.Load() == opReclaimed {
		return // aborted by reclaim while it waited
	}
	// The turn may have come with the news.
	select {
	case <-p.stop.Done():
		abort()
		return
	case <-t.hungCh():
		abort()
		return
	default:
	}
	ctx, cancel := context.WithTimeout(p.stop, p.options().closeTimeout())
	defer cancel()
	var cut atomic.Bool
	stop := context.AfterFunc(ctx, func() {
		cut.Store(true)
		c.Abort()
	})
	_ = c.Close()
	if op.state.Load() == opReclaimed {
		stop()
		return // aborted by reclaim: says nothing of the backend
	}
	if !stop() && cut.Load() {
		p.c.aborted.Add(1)
		if p.stop.Err() == nil {
			t.setHung(true)
		}
		return
	}
	t.setHung(false)
}

func (t *Table) hungCh() chan struct{} {
	t.hungMu.Lock()
	defer t.hungMu.Unlock()
	if isClosed(t.hung) && time.Since(t.hungAt) > t.pool.options().closeTimeout() {
		t.hung = make(chan struct{})
	}
	return t.hung
}

func (t *Table) setHung(hung bool) {
	t.hungMu.Lock()
	defer t.hungMu.Unlock()
	switch {
	case hung && !isClosed(t.hung):
		close(t.hung)
		t.hungAt = time.Now()
	case !hung && isClosed(t.hung):
		t.hung = make(chan struct{})
	}
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Tables returns the backends' tables, sorted by name, for the admin
// view. Unlike Table it creates none.
func (p *Pool) Tables() []*Table {
	p.mu.Lock()
	ts := p.snapshotLocked()
	p.mu.Unlock()
	slices.SortFunc(ts, func(a, b *Table) int { return strings.Compare(a.name, b.name) })
	return ts
}

// Flush closes every cached connection of every table, for an operator.
// Unlike Close and RemoveTable it leaves the tables open: later logouts
// cache again. It returns how many connections it closed.
func (p *Pool) Flush() int {
	n := 0
	for _, t := range p.Tables() {
		n += t.closeConns(t.takeAll(false), &p.c.admin)
	}
	return n
}

func (p *Pool) snapshotLocked() []*Table {
	ts := make([]*Table, 0, len(p.tables))
	for _, t := range p.tables {
		ts = append(ts, t)
	}
	return ts
}

// reserve takes one slot of the connection budget, for Table.Lease. When
// the budget is spent it closes the oldest cached connection of any
// backend to make room, else takes over the slot of a close under way
// (reclaim), and fails with ErrFull if there is neither. Every successful
// reserve is matched by one release, or by a put of the connection that
// used the slot: a Lease keeps that count.
func (p *Pool) reserve() error {
	for {
		n := p.open.Load()
		if n < int64(p.options().maxConns()) {
			if p.open.CompareAndSwap(n, n+1) {
				return nil
			}
			continue
		}
		t, e := p.oldest()
		if e == nil {
			if p.reclaim() {
				return nil
			}
			return ErrFull
		}
		if !t.remove(e) {
			continue // someone else took it meanwhile
		}
		p.c.full.Add(1)
		// The evicted conn's slot passes to the caller, so its socket
		// goes at once, without LOGOUT: behind a hung backend's
		// closers it would stay open, and sockets over the budget
		// would pile up as fast as logins make room.
		e.lease.conn.Abort()
		return nil
	}
}

// release gives back a slot whose connection is closed or was never made.
func (p *Pool) release() { p.open.Add(-1) }

func (p *Pool) oldest() (*Table, *entry) {
	p.mu.Lock()
	tables := p.snapshotLocked()
	p.mu.Unlock()
	var (
		bt *Table
		be *entry
	)
	for _, t := range tables {
		t.mu.Lock()
		if f := t.lru.Front(); f != nil {
			e := f.Value.(*entry)
			if be == nil || e.since.Before(be.since) {
				bt, be = t, e
			}
		}
		t.mu.Unlock()
	}
	return bt, be
}

// Stats returns the pool's counters.
func (p *Pool) Stats() Stats {
	s := Stats{
		Open:              int(p.open.Load()),
		Closing:           int(p.closing.Load()),
		InUse:             int(p.inUse.Load()),
		Hits:              p.c.hits.Load(),
		Misses:            p.c.misses.Load(),
		ClosedExpired:     p.c.expired.Load(),
		ClosedMaxAge:      p.c.maxAge.Load(),
		ClosedDead:        p.c.dead.Load(),
		ClosedUserLimit:   p.c.userLimit.Load(),
		ClosedFull:        p.c.full.Load(),
		ClosedBackendGone: p.c.gone.Load(),
		ClosedAdmin:       p.c.admin.Load(),
		CloseAborted:      p.c.aborted.Load(),
	}
	p.mu.Lock()
	tables := p.snapshotLocked()
	p.mu.Unlock()
	for _, t := range tables {
		s.Cached += t.Len()
	}
	return s
}

// Run is the sweeper: every SweepInterval it closes the cached connections
// of all tables that have been idle longer than Expiration or were
// authenticated longer ago than MaxAge. So, as with up-imapproxy, a
// connection lives at most Expiration + SweepInterval after its logout.
// Run returns when ctx is done.
func (p *Pool) Run(ctx context.Context) {
	every := p.options().sweepInterval()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			p.Sweep(time.Now())
		}
		if d := p.options().sweepInterval(); d != every {
			every = d
			tick.Reset(every)
		}
	}
}

func (p *Pool) options() *Options { return p.opts.Load() }

// SetOptions replaces the options of a running pool, as a configuration
// reload does; the Logger cannot change. Cached connections stay: a
// shorter Expiration or MaxAge closes them at the next sweep, a smaller
// MaxPerUser or MaxConns as connections come back, and Disabled caches
// nothing more from then on (those cached are swept as usual). A new
// SweepInterval applies after the next sweep.
func (p *Pool) SetOptions(opts Options) {
	opts.Logger = p.options().Logger
	p.opts.Store(&opts)
}

// Sweep does one sweeper pass as of now.
func (p *Pool) Sweep(now time.Time) {
	p.mu.Lock()
	tables := p.snapshotLocked()
	p.mu.Unlock()
	var nExpired, nAged int
	for _, t := range tables {
		expired, aged := t.collectExpired(now, nil, nil)
		p.c.expired.Add(uint64(len(expired)))
		p.c.maxAge.Add(uint64(len(aged)))
		for _, c := range expired {
			t.closeAsync(c, true)
		}
		for _, c := range aged {
			t.closeAsync(c, true)
		}
		nExpired, nAged = nExpired+len(expired), nAged+len(aged)
	}
	if nExpired+nAged > 0 {
		p.log.Debug("sweep closed cached connections", "expired", nExpired, "max_age", nAged)
	}
}

// entry is one cached connection.
type entry struct {
	user   string
	digest Digest
	since  time.Time // cached at
	// lease holds the connection, its first authentication and its
	// table: Take hands it out as it is, once the entry has left the
	// table for good, so that a checkout allocates nothing.
	lease Lease
}

// Table holds one backend's cached connections.
type Table struct {
	pool *Pool
	name string
	// closers holds a token per close of this backend's connections
	// under way: a backend's closes wait for each other, not for those
	// of another backend.
	closers chan struct{}
	// hung is closed once a LOGOUT of this backend's runs out of
	// CloseTimeout: the backend does not answer, and the closes queued
	// then, and those begun within a CloseTimeout, abort at once instead
	// of each waiting its turn and its timeout with a slot of the budget
	// held. After that LOGOUT is tried again.
	hungMu sync.Mutex
	hung   chan struct{}
	hungAt time.Time

	mu     sync.Mutex
	lru    list.List                  // of *entry, oldest first
	byUser map[string][]*list.Element // per user, oldest first
	closed bool
}

// Name is the backend's identity.
func (t *Table) Name() string { return t.name }

// Len is the number of cached connections.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lru.Len()
}

// get takes out the entry of a cached connection of user authenticated
// with digest d, proven alive by Check, for Take; nil if there is none.
// Its slot goes with it to the caller.
func (t *Table) get(ctx context.Context, user string, d Digest) *entry {
	for {
		e := t.take(user, d)
		if e == nil {
			t.pool.c.misses.Add(1)
			return nil
		}
		if time.Since(e.lease.born) > t.pool.options().maxAge() {
			t.pool.c.maxAge.Add(1)
			t.closeAsync(e.lease.conn, true)
			continue
		}
		if err := e.lease.conn.Check(ctx); err != nil {
			t.pool.c.dead.Add(1)
			t.pool.log.Debug("cached connection failed check", "backend", t.name, "error", err)
			e.lease.conn.Abort()
			t.pool.release()
			continue
		}
		t.pool.c.hits.Add(1)
		return e
	}
}

// take removes and returns the newest entry of user whose digest equals d.
func (t *Table) take(user string, d Digest) *entry {
	t.mu.Lock()
	defer t.mu.Unlock()
	els := t.byUser[user]
	found := -1
	// Compare every candidate in constant time, and all of them, so
	// that timing says nothing about which digest matched.
	for i, el := range els {
		e := el.Value.(*entry)
		if subtle.ConstantTimeCompare(e.digest[:], d[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return nil
	}
	el := els[found]
	t.unlinkLocked(el, found)
	return el.Value.(*entry)
}

// put caches c, for Lease.Put, its slot going into the table with it; or
// closes it in the background, the slot coming back once it is closed.
func (t *Table) put(user string, d Digest, c Conn, born time.Time) {
	now := time.Now()
	if t.pool.options().Disabled || now.Sub(born) > t.pool.options().maxAge() {
		if !t.pool.options().Disabled {
			t.pool.c.maxAge.Add(1)
		}
		t.closeAsync(c, true)
		return
	}
	e := &entry{user: user, digest: d, since: now, lease: Lease{t: t, conn: c, born: born}}
	var evicted *entry
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		t.pool.c.gone.Add(1)
		t.closeAsync(c, true)
		return
	}
	if els := t.byUser[user]; len(els) >= t.pool.options().maxPerUser() {
		evicted = els[0].Value.(*entry)
		t.unlinkLocked(els[0], 0)
	}
	el := t.lru.PushBack(e)
	t.byUser[user] = append(t.byUser[user], el)
	t.mu.Unlock()
	if evicted != nil {
		t.pool.c.userLimit.Add(1)
		t.closeAsync(evicted.lease.conn, true)
	}
}

// Users returns how many connections each user has cached (for tests and
// the admin view; no secrets).
func (t *Table) Users() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	m := make(map[string]int, len(t.byUser))
	for u, els := range t.byUser {
		m[u] = len(els)
	}
	return m
}

// ConnInfo describes one cached connection, without its credential.
type ConnInfo struct {
	User  string    // the key it is cached under
	Born  time.Time // first authenticated
	Since time.Time // cached at
}

// Conns describes the table's cached connections, oldest cached first.
func (t *Table) Conns() []ConnInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]ConnInfo, 0, t.lru.Len())
	for el := t.lru.Front(); el != nil; el = el.Next() {
		e := el.Value.(*entry)
		out = append(out, ConnInfo{User: e.user, Born: e.lease.born, Since: e.since})
	}
	return out
}

// CloseUser closes the connections cached for user, for an operator, and
// returns how many there were. The table stays open.
func (t *Table) CloseUser(user string) int {
	t.mu.Lock()
	els := t.byUser[user]
	conns := make([]Conn, 0, len(els))
	for len(els) > 0 {
		conns = append(conns, els[0].Value.(*entry).lease.conn)
		t.unlinkLocked(els[0], 0)
		els = t.byUser[user]
	}
	t.mu.Unlock()
	return t.closeConns(conns, &t.pool.c.admin)
}

func (t *Table) remove(e *entry) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, el := range t.byUser[e.user] {
		if el.Value.(*entry) == e {
			t.unlinkLocked(el, i)
			return true
		}
	}
	return false
}

// unlinkLocked removes el, which is byUser[user][i].
func (t *Table) unlinkLocked(el *list.Element, i int) {
	e := t.lru.Remove(el).(*entry)
	els := t.byUser[e.user]
	els = append(els[:i], els[i+1:]...)
	if len(els) == 0 {
		delete(t.byUser, e.user)
	} else {
		t.byUser[e.user] = els
	}
}

func (t *Table) collectExpired(now time.Time, expired, aged []Conn) ([]Conn, []Conn) {
	exp, maxAge := t.pool.options().expiration(), t.pool.options().maxAge()
	t.mu.Lock()
	defer t.mu.Unlock()
	for el := t.lru.Front(); el != nil; {
		next := el.Next()
		e := el.Value.(*entry)
		switch {
		case now.Sub(e.lease.born) > maxAge:
			aged = append(aged, e.lease.conn)
		case now.Sub(e.since) > exp:
			expired = append(expired, e.lease.conn)
		default:
			el = next
			continue
		}
		t.unlinkLocked(el, indexOf(t.byUser[e.user], el))
		el = next
	}
	return expired, aged
}

func indexOf(els []*list.Element, el *list.Element) int {
	for i, x := range els {
		if x == el {
			return i
		}
	}
	return -1
}

// takeAll empties the table and returns its connections for the caller to
// close; with closed, the table caches nothing more.
func (t *Table) takeAll(closed bool) []Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	if closed {
		t.closed = true
	}
	var conns []Conn
	for el := t.lru.Front(); el != nil; el = el.Next() {
		conns = append(conns, el.Value.(*entry).lease.conn)
	}
	t.lru.Init()
	t.byUser = make(map[string][]*list.Element)
	return conns
}

// closeConns closes conns, taken out of the table, in the background,
// counting them under cause.
func (t *Table) closeConns(conns []Conn, cause *atomic.Uint64) int {
	cause.Add(uint64(len(conns)))
	for _, c := range conns {
		t.closeAsync(c, true)
	}
	return len(conns)
}
