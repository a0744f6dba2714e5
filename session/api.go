package session

import (
	"net"
	"strings"
	"time"

	"github.com/imapproxy/imapproxy/backend"
)

// New returns a session of the client connection c, accepted on a
// listener of the given TLS mode; id names it in logs and to the backend
// (ID's x-session-id). ip is the client's address; with cacheByAddr it is
// part of the cache key, so that a backend checks each new address.
// The session owns c from here on; Serve runs it.
func New(srv *Server, c net.Conn, tlsMode backend.TLSMode, id, ip string, cacheByAddr bool) *Session {
	return &Session{srv: srv, id: id, conn: c, raw: c, tlsMode: tlsMode, ip: ip, cacheByAddr: cacheByAddr}
}

// Serve runs the session until it ends, then closes its connections and
// calls the Host's Ended.
func (sess *Session) Serve() { sess.serve() }

// ID returns the session's name, as given to New.
func (sess *Session) ID() string { return sess.id }

// Conn returns the accepted client connection.
func (sess *Session) Conn() net.Conn { return sess.raw }

// Drain asks the session to end at its next command boundary with a BYE,
// as at shutdown.
func (sess *Session) Drain() { sess.drain() }

// Evict ends a logged-in session with the BYE that err (ErrDrained,
// ErrKicked) stands for, at its next command boundary; its backend
// connection is not cached. A session not logged in is left alone.
func (sess *Session) Evict(err error) { sess.evict(replyTo(err, loggedIn, "")) }

// Kill ends the session at once, closing both connections under it.
func (sess *Session) Kill() { sess.kill() }

// Info is what an operator sees of a logged-in session.
type Info struct {
	ID      string
	Key     string // the cache key: the login name, or authzid NUL name
	User    string // the login name
	AuthzID string // for a SASL login on behalf of another user
	Backend backend.Backend
	Client  string // the client's address
	Since   time.Time
}

// Info describes the session once it is logged in; ok is false before.
func (sess *Session) Info() (info Info, ok bool) {
	rl := sess.rl.Load()
	if rl == nil {
		return Info{}, false
	}
	info = Info{ID: sess.id, Key: rl.user, User: rl.user, Backend: rl.backend,
		Client: sess.raw.RemoteAddr().String(), Since: time.Unix(0, sess.loginAt.Load())}
	if a, u, ok := strings.Cut(rl.user, "\x00"); ok {
		info.User, info.AuthzID = u, a
	}
	return info, true
}

// InFlight counts the client's commands the backend has not answered
// yet, for tests and diagnostics.
func (sess *Session) InFlight() int {
	rl := sess.rl.Load()
	if rl == nil {
		return 0
	}
	rl.mu.Lock()
	defer rl.mu.Unlock()
	return len(rl.inflight)
}

// Trace has a logged-in session write its protocol lines to tr; nil
// stops it. It reports whether the session is logged in.
func (sess *Session) Trace(tr *Tracer) bool {
	rl := sess.rl.Load()
	if rl == nil {
		return false
	}
	rl.trace.Store(tr)
	return true
}

// Untrace stops the session's trace if it is tr.
func (sess *Session) Untrace(tr *Tracer) {
	if rl := sess.rl.Load(); rl != nil {
		rl.trace.CompareAndSwap(tr, nil)
	}
}
