package proxy

import (
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/cluster"
	"github.com/imapproxy/imapproxy/session"
)

// member is the server's record of one of its sessions: the counts it is
// in. Guarded by Server.mu.
type member struct {
	ip       string
	preNet   string // preAuthNet(ip)
	user     string // set at login; until then the session counts as pre-auth
	userLeft bool   // no longer in the user's count (see LeftUser)
}

// newSession admits a client connection under the client limits, or
// turns it away with a BYE and returns nil.
func (s *Server) newSession(c net.Conn, lo *ListenerOptions) *session.Session {
	ip := remoteIP(c)
	pnet := preAuthNet(ip)
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		c.Close()
		return nil
	}
	o := s.options()
	var over string
	switch {
	case o.MaxClients > 0 && len(s.sessions) >= o.MaxClients:
		over = "clients"
	case o.MaxClientsPerIP > 0 && s.perIP[ip] >= o.MaxClientsPerIP:
		over = "clients per address"
	case o.MaxPreAuth > 0 && s.preAuth >= o.MaxPreAuth:
		over = "connections not logged in"
	case o.maxPreAuthPerIP() > 0 && s.preAuthBy[pnet] >= o.maxPreAuthPerIP():
		over = "connections not logged in per address"
	}
	if over != "" {
		s.mu.Unlock()
		// Written after the lock is let go: a client that does not
		// read would hold every other accept and login for the write
		// deadline.
		s.stats.rejected.Add(1)
		s.events.Log(s.log, hclog.Warn, "refused:"+over, "connection refused: limit reached", "limit", over, "client", c.RemoteAddr().String())
		session.Refuse(c, session.ErrTooManyClients)
		return nil
	}
	defer s.mu.Unlock()
	id := strconv.FormatUint(s.nextID.Add(1), 36)
	sess := session.New(s.shared, c, lo.TLS, id, ip, lo.CacheByClientAddress)
	s.sessions[sess] = &member{ip: ip, preNet: pnet}
	s.perIP[ip]++
	s.preAuth++
	s.preAuthBy[pnet]++
	s.wg.Add(1)
	return sess
}

// preAuthNet is what the per-address pre-login limit counts by: an IPv4
// address, or the /64 of an IPv6 one, since a subscriber usually has a
// whole /64 to pick addresses from.
func preAuthNet(ip string) string {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	a = a.Unmap()
	if a.Is4() {
		return a.String()
	}
	p, err := a.Prefix(64)
	if err != nil {
		return ip
	}
	return p.String()
}

func remoteIP(c net.Conn) string {
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		return c.RemoteAddr().String()
	}
	return host
}

// leavePreAuthLocked takes a session out of the pre-login counts; the
// caller holds s.mu.
func (s *Server) leavePreAuthLocked(m *member) {
	s.preAuth--
	if s.preAuthBy[m.preNet]--; s.preAuthBy[m.preNet] <= 0 {
		delete(s.preAuthBy, m.preNet)
	}
}

func (s *Server) leaveUserLocked(m *member) {
	if m.user == "" || m.userLeft {
		return
	}
	m.userLeft = true
	if s.perUser[m.user]--; s.perUser[m.user] <= 0 {
		delete(s.perUser, m.user)
	}
}

// host is the Server as its sessions see it (session.Host). It is a type
// of its own so that these methods stay out of the Server's API.
type host struct{ s *Server }

func (h host) Config() *session.Config                { return h.s.sessionConfig.Load() }
func (h host) Backends() *cluster.Set                 { return h.s.backends.Load() }
func (h host) MarkDown(id string, why error)          { h.s.markDown(id, why) }
func (h host) BackendCaps() []string                  { return h.s.backendCaps() }
func (h host) SawCaps(caps []string)                  { h.s.preCaps.Store(&caps) }
func (h host) Ended(sess *session.Session)            { h.s.endSession(sess) }
func (h host) KickedSince(k string, t time.Time) bool { return h.s.kickedSince(k, t) }

func (h host) UserFull(user string) bool {
	s := h.s
	s.mu.Lock()
	defer s.mu.Unlock()
	max := s.options().MaxSessionsPerUser
	return max > 0 && s.perUser[user] >= max
}

func (h host) LoggedIn(sess *session.Session, user string) (*session.Tracer, bool) {
	s := h.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if max := s.options().MaxSessionsPerUser; max > 0 && s.perUser[user] >= max {
		return nil, false
	}
	m := s.sessions[sess]
	s.perUser[user]++
	if m.user == "" {
		s.leavePreAuthLocked(m)
	}
	m.user = user
	// Under the lock StartTrace takes to match sessions by user: a trace
	// started at any moment finds the session or is found here.
	return s.traces[traceKey(user)], true
}

func (h host) LeftUser(sess *session.Session) {
	s := h.s
	s.mu.Lock()
	s.leaveUserLocked(s.sessions[sess])
	s.mu.Unlock()
}

func (s *Server) endSession(sess *session.Session) {
	s.mu.Lock()
	m := s.sessions[sess]
	delete(s.sessions, sess)
	if s.perIP[m.ip]--; s.perIP[m.ip] <= 0 {
		delete(s.perIP, m.ip)
	}
	if m.user == "" {
		s.leavePreAuthLocked(m)
	} else {
		s.leaveUserLocked(m)
	}
	s.mu.Unlock()
	s.wg.Done()
}

// sessionsOn lists the logged-in sessions on backend b.
func (s *Server) sessionsOn(b backend.Backend) []*session.Session {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*session.Session
	for sess := range s.sessions {
		if info, ok := sess.Info(); ok && info.Backend.Same(b) {
			out = append(out, sess)
		}
	}
	return out
}
