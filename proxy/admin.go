package proxy

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
)

// The operator's view and controls. Everything here returns plain values
// for the admin API: names, addresses, counts and times, never a password,
// a credential digest or anything a client sent after login.

var (
	// ErrUnknownBackend is returned for a backend ID not in the set.
	ErrUnknownBackend = errors.New("proxy: unknown backend")
	// ErrLastBackend refuses to drain the last backend in service, which
	// would make every login fail.
	ErrLastBackend = errors.New("proxy: last backend in service")
)

// BackendInfo is one backend of the set as this proxy sees it.
type BackendInfo struct {
	ID      string
	Address string
	Weight  int
	TLS     backend.TLSMode // the dialer's default applied

	// Down is set while this proxy skips the backend after a failed dial
	// or an UNAVAILABLE login, until DownUntil.
	Down      bool
	DownUntil time.Time
	// Drained is set while an operator keeps new logins off it.
	Drained bool
	// Held is set while discovery has it healthy but holds it back
	// after a flap (cluster.rejoin_hold): no new logins, sessions go on.
	Held bool

	Cached int // connections cached for reuse
	Active int // sessions relaying to it
}

// BackendStatus describes every backend of the set, drained and held
// ones included, sorted by ID.
func (s *Server) BackendStatus() []BackendInfo {
	set := s.backends.Load()
	cached := map[string]int{}
	for _, t := range s.pool.Tables() {
		cached[t.Name()] = t.Len()
	}
	active := map[string]int{}
	for _, ss := range s.activeSessions(func(*relay) bool { return true }) {
		active[ss.Backend]++
	}
	now := time.Now()
	out := make([]BackendInfo, 0, len(set.all))
	for id, b := range set.all {
		bi := BackendInfo{
			ID:      id,
			Address: b.Addr,
			Weight:  max(b.Weight, 1), // as the ring counts it
			TLS:     s.tlsMode(b),
			Cached:  cached[id],
			Active:  active[id],
		}
		_, inService := set.byID[id]
		bi.Drained = !inService
		if h := set.health[id]; h != nil && h.down(now) {
			bi.Down, bi.DownUntil = true, time.Unix(0, h.downUntil.Load())
		}
		out = append(out, bi)
	}
	for id, b := range set.held {
		out = append(out, BackendInfo{
			ID: id, Address: b.Addr, Weight: max(b.Weight, 1), TLS: s.tlsMode(b),
			Held: true, Cached: cached[id], Active: active[id],
		})
	}
	slices.SortFunc(out, func(a, b BackendInfo) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

func (s *Server) tlsMode(b backend.Backend) backend.TLSMode {
	return b.TLS.Or(s.dialer().TLS).Or(backend.TLSNone)
}

// UserInfo is where a user's logins go and what the user holds now.
type UserInfo struct {
	User string
	// Key is what the ring hashes: the name as cluster.hash_key makes it.
	Key string
	// Backend is where a login of the user goes now: the first of Order
	// in service and not marked down (the first in service if all are
	// down); "" when no backend is in service.
	Backend string
	// Order is every backend of the set in the user's rendezvous order,
	// drained ones included: the failover sequence.
	Order []Choice
	// Cached are the user's cached connections, on any backend.
	Cached []CachedConn
	// Sessions are the user's logged-in sessions.
	Sessions []SessionInfo
}

// Choice is one backend in a user's order.
type Choice struct {
	ID      string
	Down    bool
	Drained bool
}

// CachedConn is one cached connection of a user.
type CachedConn struct {
	Backend string
	Age     time.Duration // since it first logged in
	Idle    time.Duration // since it was cached
}

// SessionInfo is one logged-in client session.
type SessionInfo struct {
	ID      string // as in the log's "session" key
	User    string // the name that logged in
	AuthzID string // the user it acts for, after a SASL login on behalf of another
	Backend string
	Client  string // the client's address
	Since   time.Time
}

// UserInfo describes user. Names are matched as the cache matches them,
// exactly; only the backend choice folds case, as cluster.hash_key says.
// A SASL login on behalf of another user counts for both names.
func (s *Server) UserInfo(user string) UserInfo {
	set := s.backends.Load()
	key := s.options().HashKey
	// The set's own ring leaves drained backends out; the order among the
	// others is the same in a ring of all, rendezvous scores being per
	// backend.
	members := make([]backend.Backend, 0, len(set.all))
	for _, b := range set.all {
		members = append(members, backend.Backend{ID: b.ID, Addr: b.Addr, Weight: b.Weight})
	}
	full := balancer.New(members, balancer.Options{Key: key})
	ui := UserInfo{User: user, Key: full.Key(user)}
	now := time.Now()
	first := ""
	for _, b := range full.Order(user, nil) {
		_, inService := set.byID[b.ID]
		h := set.health[b.ID]
		c := Choice{ID: b.ID, Drained: !inService, Down: h != nil && h.down(now)}
		ui.Order = append(ui.Order, c)
		if inService && first == "" {
			first = b.ID
		}
		if inService && !c.Down && ui.Backend == "" {
			ui.Backend = b.ID
		}
	}
	if ui.Backend == "" {
		ui.Backend = first // every backend in service is down: login tries them all
	}
	for _, t := range s.pool.Tables() {
		for _, ci := range t.Conns() {
			if ownsKey(user, ci.User) {
				ui.Cached = append(ui.Cached, CachedConn{Backend: t.Name(), Age: now.Sub(ci.Born), Idle: now.Sub(ci.Since)})
			}
		}
	}
	ui.Sessions = s.activeSessions(func(rl *relay) bool { return ownsKey(user, rl.user) })
	return ui
}

// activeSessions describes the relaying sessions whose relay passes match,
// oldest login first.
func (s *Server) activeSessions(match func(*relay) bool) []SessionInfo {
	var out []SessionInfo
	s.mu.Lock()
	for sess := range s.sessions {
		if rl := sess.rl.Load(); rl != nil && match(rl) {
			user, authz := rl.user, ""
			if a, u, ok := strings.Cut(rl.user, "\x00"); ok {
				user, authz = u, a
			}
			out = append(out, SessionInfo{
				ID:      sess.id,
				User:    user,
				AuthzID: authz,
				Backend: rl.backend.ID,
				Client:  sess.raw.RemoteAddr().String(),
				Since:   time.Unix(0, sess.loginAt.Load()),
			})
		}
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b SessionInfo) int {
		return cmp.Or(a.Since.Compare(b.Since), strings.Compare(a.ID, b.ID))
	})
	return out
}

// kickedSince reports whether an operator kicked the owner of cache key
// after born, the first login of a connection.
func (s *Server) kickedSince(key string, born time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for u, at := range s.kicked {
		if at.After(born) && ownsKey(u, key) {
			return true
		}
	}
	return false
}

// ownsKey reports whether a cache key, which is the login name or, for a
// SASL login on behalf of another user, authzid NUL name, belongs to user
// under either name.
func ownsKey(user, key string) bool {
	if key == user {
		return true
	}
	authz, authc, ok := strings.Cut(key, "\x00")
	return ok && (authz == user || authc == user)
}

// DrainBackend stops new logins to a backend: it leaves the ring, so its
// users' logins go to their next backend, and its cached connections are
// closed. Sessions on it go on until they end (KickUser ends them) and
// their connections are not cached. The drain holds across SetBackends
// while the backend stays in the set; draining twice is no error.
func (s *Server) DrainBackend(id string) error {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	set := s.backends.Load()
	if _, ok := set.all[id]; !ok {
		return fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	if s.drained[id] {
		return nil
	}
	if _, ok := set.byID[id]; ok && len(set.byID) == 1 {
		return fmt.Errorf("%w: %q", ErrLastBackend, id)
	}
	if s.drained == nil {
		s.drained = map[string]bool{}
	}
	s.drained[id] = true
	s.setBackendsLocked(set.members(), set.heldMembers())
	return nil
}

// UndrainBackend puts a drained backend back in service: its users'
// new logins return to it. Undraining one not drained is no error.
func (s *Server) UndrainBackend(id string) error {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	set := s.backends.Load()
	if _, ok := set.all[id]; !ok {
		return fmt.Errorf("%w %q", ErrUnknownBackend, id)
	}
	if !s.drained[id] {
		return nil
	}
	delete(s.drained, id)
	s.setBackendsLocked(set.members(), set.heldMembers())
	s.log.Info("backend back in service", "backend", id)
	return nil
}

// members returns the whole set, for a rebuild.
func (set *backendSet) members() []backend.Backend {
	bs := make([]backend.Backend, 0, len(set.all))
	for _, b := range set.all {
		bs = append(bs, b)
	}
	return bs
}

// heldMembers returns the held backends, for a rebuild.
func (set *backendSet) heldMembers() []backend.Backend {
	bs := make([]backend.Backend, 0, len(set.held))
	for _, b := range set.held {
		bs = append(bs, b)
	}
	return bs
}

// drainedLocked is SetBackends' part for drains. Of the IDs that left the
// ring (gone), it takes out those still in the set, which were drained:
// it closes their cached connections but, unlike for a backend that left,
// lets their sessions run. It forgets drains of backends that left the
// set. The caller holds setMu.
func (s *Server) drainedLocked(old, next *backendSet, gone []backend.Backend) []backend.Backend {
	for id := range s.drained {
		if _, ok := next.all[id]; !ok {
			delete(s.drained, id)
		}
	}
	return slices.DeleteFunc(gone, func(ob backend.Backend) bool {
		nb, ok := next.all[ob.ID]
		if !ok || !nb.Same(ob) {
			return false
		}
		s.log.Info("backend drained; closing its cached connections", "backend", ob.ID)
		s.pool.RemoveTable(ob.ID)
		return true
	})
}

// KickUser ends the user's sessions with a BYE and closes their cached
// connections, on every backend, matching names as UserInfo does. It
// returns how many of each it ended.
func (s *Server) KickUser(user string) (sessions, cached int) {
	var victims []*session
	s.mu.Lock()
	// A session between its LOGOUT and caching its connection is no
	// longer found below: remember the kick, so that such a connection
	// (authenticated before it) is closed instead of cached.
	now := time.Now()
	if s.kicked == nil {
		s.kicked = map[string]time.Time{}
	}
	for u, at := range s.kicked {
		if now.Sub(at) > 24*time.Hour {
			delete(s.kicked, u)
		}
	}
	s.kicked[user] = now
	for sess := range s.sessions {
		if rl := sess.rl.Load(); rl != nil && ownsKey(user, rl.user) {
			victims = append(victims, sess)
		}
	}
	s.mu.Unlock()
	// Sessions first: an evicted session does not cache its connection,
	// so the tables are emptied after the last of them could have.
	for _, sess := range victims {
		sess.evict(replyTo(errKicked, loggedIn, ""))
	}
	for _, t := range s.pool.Tables() {
		for key := range t.Users() {
			if ownsKey(user, key) {
				cached += t.CloseUser(key)
			}
		}
	}
	return len(victims), cached
}

// FlushCache closes every cached connection; caching goes on afterwards.
// It returns how many it closed.
func (s *Server) FlushCache() int {
	return s.pool.Flush()
}
