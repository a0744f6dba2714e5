package proxy

import (
	"cmp"
	"slices"
	"strings"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/cluster"
	"github.com/imapproxy/imapproxy/session"
)

// The operator's view and controls. Everything here returns plain values
// for the admin API: names, addresses, counts and times, never a password,
// a credential digest or anything a client sent after login.

var (
	// ErrUnknownBackend is returned for a backend ID not in the set.
	ErrUnknownBackend = cluster.ErrUnknownBackend
	// ErrLastBackend refuses to drain the last backend in service, which
	// would make every login fail.
	ErrLastBackend = cluster.ErrLastBackend
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
	for _, ss := range s.activeSessions(func(session.Info) bool { return true }) {
		active[ss.Backend]++
	}
	members := set.Members()
	out := make([]BackendInfo, 0, len(members))
	for _, m := range members {
		out = append(out, BackendInfo{
			ID:        m.ID,
			Address:   m.Addr,
			Weight:    max(m.Weight, 1), // as the ring counts it
			TLS:       s.tlsMode(m.Backend),
			Down:      m.Down,
			DownUntil: m.DownUntil,
			Drained:   m.Drained,
			Held:      m.Held,
			Cached:    cached[m.ID],
			Active:    active[m.ID],
		})
	}
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
	pl := s.backends.Load().Place(user)
	ui := UserInfo{User: user, Key: pl.Key, Backend: pl.Backend}
	for _, r := range pl.Order {
		ui.Order = append(ui.Order, Choice{ID: r.ID, Down: r.Down, Drained: r.Drained})
	}
	now := time.Now()
	for _, t := range s.pool.Tables() {
		for _, ci := range t.Conns() {
			if ownsKey(user, ci.User) {
				ui.Cached = append(ui.Cached, CachedConn{Backend: t.Name(), Age: now.Sub(ci.Born), Idle: now.Sub(ci.Since)})
			}
		}
	}
	ui.Sessions = s.activeSessions(func(in session.Info) bool { return ownsKey(user, in.Key) })
	return ui
}

// activeSessions describes the relaying sessions whose relay passes match,
// oldest login first.
func (s *Server) activeSessions(match func(session.Info) bool) []SessionInfo {
	var out []SessionInfo
	s.mu.Lock()
	for sess := range s.sessions {
		if in, ok := sess.Info(); ok && match(in) {
			out = append(out, SessionInfo{
				ID:      in.ID,
				User:    in.User,
				AuthzID: in.AuthzID,
				Backend: in.Backend.ID,
				Client:  in.Client,
				Since:   in.Since,
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
	ch, err := s.backends.Drain(id)
	if err != nil {
		return err
	}
	s.applyLocked(ch)
	return nil
}

// UndrainBackend puts a drained backend back in service: its users'
// new logins return to it. Undraining one not drained is no error.
func (s *Server) UndrainBackend(id string) error {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	ch, err := s.backends.Undrain(id)
	if err != nil {
		return err
	}
	s.applyLocked(ch)
	if len(ch.Undrained) > 0 {
		s.log.Info("backend back in service", "backend", id)
	}
	return nil
}

// KickUser ends the user's sessions with a BYE and closes their cached
// connections, on every backend, matching names as UserInfo does. It
// returns how many of each it ended.
func (s *Server) KickUser(user string) (sessions, cached int) {
	var victims []*session.Session
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
		if in, ok := sess.Info(); ok && ownsKey(user, in.Key) {
			victims = append(victims, sess)
		}
	}
	s.mu.Unlock()
	// Sessions first: an evicted session does not cache its connection,
	// so the tables are emptied after the last of them could have.
	for _, sess := range victims {
		sess.Evict(session.ErrKicked)
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
