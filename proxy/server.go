// Package proxy is the client side of imapproxy: listeners, the per-client
// session (greeting, pre-login commands, STARTTLS, LOGIN/AUTHENTICATE),
// the relay after login, and LOGOUT interception that hands clean upstream
// connections to the pool.
package proxy

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
	"github.com/imapproxy/imapproxy/cluster"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// Options configure a Server. The zero value works with a backend set
// given by SetBackends.
type Options struct {
	Logger hclog.Logger
	Pool   *pool.Pool       // nil: a pool with default options
	Dialer *upstream.Dialer // nil: defaults

	// TLSConfig holds the client-facing certificate; nil disables
	// STARTTLS and implicit TLS listeners.
	TLSConfig          *tls.Config
	RequireTLSForLogin bool

	Banner string // greeting text; default "imapproxy ready."

	PreAuthTimeout  time.Duration // whole time allowed before login (60s)
	AuthIdleTimeout time.Duration // client silence after login (30m)
	IdleTimeout     time.Duration // silence while in IDLE (60m)
	LiteralTimeout  time.Duration // to transfer one literal (60s)
	WriteTimeout    time.Duration // one write to the client (60s)
	LogoutWait      time.Duration // wait for outstanding commands at LOGOUT (30s)
	// ResponseTimeout bounds a backend's silence while it owes an answer
	// to a command in flight (120s); progress of any kind restarts it.
	ResponseTimeout time.Duration

	// HashKey says what of the username is hashed onto a backend.
	HashKey balancer.KeyMode
	// BackendDrain is how long sessions on a backend that left the set may
	// go on before they get BYE (30s).
	BackendDrain time.Duration
	// DownTime is how long a backend that failed a dial or refused a
	// login as unavailable is skipped (10s).
	DownTime time.Duration

	MaxLineLength     int // 64 KiB
	MaxLiteralPreAuth int // 8 KiB
	// MaxCommandPreAuth bounds one whole command before login, its
	// lines and literals together (40 KiB: RFC 2971's largest ID is
	// about 31 KiB).
	MaxCommandPreAuth int
	MaxLiteral        int64 // 64 MiB, after login
	MaxBadCommands    int   // 3

	// MaxUserLength and MaxPasswordLength bound the credentials of a
	// login (256 and 4096 bytes); longer ones are refused before any
	// backend sees them: Dovecot answers an over-long user name by
	// dropping the connection.
	MaxUserLength     int
	MaxPasswordLength int
	// MaxLoginFailures is how many failed logins a connection may have;
	// the last is followed by BYE (3; negative: no limit).
	MaxLoginFailures int
	// LoginFailureDelay is waited before a failed login is answered, as
	// Dovecot's auth_failure_delay (1s; negative: none).
	LoginFailureDelay time.Duration

	// Client limits; 0 means no limit. A connection over a limit gets
	// "* BYE [UNAVAILABLE]" and is closed at once; a login over the
	// per-user limit gets "NO [LIMIT]".
	MaxClients      int // client connections in all
	MaxClientsPerIP int // client connections from one address
	MaxPreAuth      int // connections not yet logged in
	// MaxPreAuthPerIP bounds the connections not yet logged in from one
	// client address, an IPv6 one counted with its /64 (which one
	// subscriber usually has whole). Unlike the others it is on by
	// default (100); negative means no limit.
	MaxPreAuthPerIP    int
	MaxSessionsPerUser int // logged-in sessions of one user

	// Metrics, if not nil, receive latencies and backend login results.
	Metrics *Metrics
}

func (o *Options) banner() string {
	if o.Banner != "" {
		return o.Banner
	}
	return "imapproxy ready."
}
func (o *Options) preAuthTimeout() time.Duration  { return orDur(o.PreAuthTimeout, 60*time.Second) }
func (o *Options) authIdleTimeout() time.Duration { return orDur(o.AuthIdleTimeout, 30*time.Minute) }
func (o *Options) idleTimeout() time.Duration     { return orDur(o.IdleTimeout, 60*time.Minute) }
func (o *Options) literalTimeout() time.Duration  { return orDur(o.LiteralTimeout, 60*time.Second) }
func (o *Options) writeTimeout() time.Duration    { return orDur(o.WriteTimeout, 60*time.Second) }
func (o *Options) logoutWait() time.Duration      { return orDur(o.LogoutWait, 30*time.Second) }
func (o *Options) responseTimeout() time.Duration { return orDur(o.ResponseTimeout, 120*time.Second) }
func (o *Options) maxLine() int                   { return orInt(o.MaxLineLength, 64*1024) }
func (o *Options) backendDrain() time.Duration    { return orDur(o.BackendDrain, 30*time.Second) }
func (o *Options) downTime() time.Duration        { return orDur(o.DownTime, 10*time.Second) }
func (o *Options) maxLiteralPreAuth() int         { return orInt(o.MaxLiteralPreAuth, 8*1024) }
func (o *Options) maxCommandPreAuth() int         { return orInt(o.MaxCommandPreAuth, 40*1024) }
func (o *Options) maxPreAuthPerIP() int {
	if o.MaxPreAuthPerIP < 0 {
		return 0
	}
	return orInt(o.MaxPreAuthPerIP, 100)
}
func (o *Options) maxUserLength() int     { return orInt(o.MaxUserLength, 256) }
func (o *Options) maxPasswordLength() int { return orInt(o.MaxPasswordLength, 4096) }
func (o *Options) maxLoginFailures() int {
	if o.MaxLoginFailures < 0 {
		return 0
	}
	return orInt(o.MaxLoginFailures, 3)
}
func (o *Options) loginFailureDelay() time.Duration {
	if o.LoginFailureDelay < 0 {
		return 0
	}
	return orDur(o.LoginFailureDelay, time.Second)
}
func (o *Options) maxBad() int { return orInt(o.MaxBadCommands, 3) }
func (o *Options) maxLiteral() int64 {
	if o.MaxLiteral > 0 {
		return o.MaxLiteral
	}
	return 64 << 20
}

func orDur(d, def time.Duration) time.Duration {
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

// Server accepts IMAP clients and proxies them.
type Server struct {
	// opts is replaced whole by SetOptions: a session reads it when it
	// needs a value, so a reload reaches sessions already running.
	opts atomic.Pointer[Options]
	log  hclog.Logger
	pool *pool.Pool
	key  [32]byte // HMAC key for credential digests, drawn at start

	backends *cluster.Roster          // the backend set, read by every login
	preCaps  atomic.Pointer[[]string] // latest backend pre-login capabilities

	nextID atomic.Uint64
	stats  counters

	// ctx is cancelled by Close: logins under way toward backends end
	// with it, as sessions do.
	ctx    context.Context
	cancel context.CancelFunc
	events *eventLog // lines of events clients can repeat at will

	// setMu serialises changes of the backend set with acting on them,
	// and SetOptions.
	setMu sync.Mutex

	// reserve is a descriptor held to be closed when accept runs out of
	// them, so that one waiting client can be told so (see shed).
	reserveMu     sync.Mutex
	reserve       *os.File
	closedReserve bool // the server is shut down: no more reserve

	mu        sync.Mutex
	perIP     map[string]int // client connections by address
	perUser   map[string]int // logged-in sessions by user
	preAuth   int            // connections not yet logged in
	preAuthBy map[string]int // connections not yet logged in, by preAuthNet
	drains    map[*time.Timer]struct{}
	listeners map[net.Listener]*atomic.Pointer[ListenerOptions]
	sessions  map[*session]struct{}
	traces    map[string]*tracer    // by traceKey(user)
	kicked    map[string]time.Time  // users an operator kicked, and when
	pending   map[net.Conn]struct{} // from load balancers, header not read yet
	shutdown  bool
	wg        sync.WaitGroup // sessions
}

// New returns a Server.
func New(opts Options) *Server {
	s := &Server{
		listeners: map[net.Listener]*atomic.Pointer[ListenerOptions]{},
		sessions:  map[*session]struct{}{},
		drains:    map[*time.Timer]struct{}{},
		perIP:     map[string]int{},
		perUser:   map[string]int{},
		preAuthBy: map[string]int{},
		events:    newEventLog(eventInterval),
	}
	s.log = opts.Logger
	if s.log == nil {
		s.log = hclog.NewNullLogger()
	}
	s.pool = opts.Pool
	if s.pool == nil {
		s.pool = pool.New(pool.Options{})
	}
	opts.Pool = s.pool
	if opts.Dialer == nil {
		opts.Dialer = &upstream.Dialer{}
	}
	s.opts.Store(&opts)
	if _, err := rand.Read(s.key[:]); err != nil {
		panic("proxy: no randomness for the credential key: " + err.Error())
	}
	s.reserve, _ = os.Open(os.DevNull)
	s.backends = cluster.New(cluster.Options{Key: opts.HashKey})
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

func (s *Server) options() *Options { return s.opts.Load() }

func (s *Server) dialer() *upstream.Dialer { return s.options().Dialer }

// SetOptions replaces the options of a running server, as a
// configuration reload does. Timeouts, limits, TLS and dialer settings
// apply to new connections and to each session's next use of them;
// sessions and cached connections are kept. Logger and Pool cannot
// change and are ignored. A new HashKey re-maps users at once.
func (s *Server) SetOptions(opts Options) {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	old := s.options()
	opts.Logger, opts.Pool = old.Logger, old.Pool
	if opts.Dialer == nil {
		opts.Dialer = &upstream.Dialer{}
	}
	s.opts.Store(&opts)
	if opts.HashKey != old.HashKey {
		s.backends.SetKey(opts.HashKey)
		s.log.Warn("hash_key changed: users are mapped anew", "from", old.HashKey, "to", opts.HashKey)
	}
}

// SetBackends replaces the backend set. Cached connections of backends
// that left it (or whose address or TLS mode changed) are closed, in the
// background; sessions still using them get BackendDrain to finish, then
// BYE, unless the backend is back by then. A change of weight only
// re-ranks users. A backend drained by an operator stays drained while it
// is in the set.
func (s *Server) SetBackends(bs []backend.Backend) {
	s.SetBackendsHeld(bs, nil)
}

// SetBackendsHeld is SetBackends with the backends discovery finds
// healthy but holds back for now (see discovery.Damper): they take no new
// login, but sessions on them are not ended; one that was in bs is
// treated as having left it. A backend in both is in bs.
func (s *Server) SetBackendsHeld(bs, held []backend.Backend) {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	s.applyLocked(s.backends.Install(bs, held))
}

// applyLocked acts on a change of the backend set for the sessions and
// the pool; the caller holds setMu. It does no I/O: the pool closes what
// it is given in the background, so a backend that hangs delays no later
// change.
func (s *Server) applyLocked(ch cluster.Change) {
	for _, id := range ch.Dropped {
		s.options().Metrics.forget(id)
	}
	// Drained backends lose their cached connections but, unlike those
	// that left, keep their sessions.
	for _, b := range ch.Drained {
		s.log.Info("backend drained; closing its cached connections", "backend", b.ID)
		s.pool.RemoveTable(b.ID)
	}
	for _, b := range ch.Left {
		s.log.Info("backend left the set; closing its cached connections", "backend", b.ID, "drain", s.options().backendDrain())
		s.pool.RemoveTable(b.ID)
		s.scheduleDrain(b)
	}
	// A held backend that leaves may still have sessions from before it
	// was held: they drain as for any backend that left.
	for _, b := range ch.HeldLeft {
		s.log.Info("held back backend left the set", "backend", b.ID, "drain", s.options().backendDrain())
		s.scheduleDrain(b)
	}
	if ch.Changed() {
		s.log.Info("backend set changed", "backends", ch.New.Len(), "removed", len(ch.Left), "held", ch.New.HeldLen())
	}
}

// scheduleDrain ends, after BackendDrain, the sessions still relaying to
// a backend that left the set, unless discovery has it as healthy by then:
// back in the set, or held back after a flap (its users' new logins go
// elsewhere for a while, but its sessions are fine where they are).
func (s *Server) scheduleDrain(b backend.Backend) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutdown {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(s.options().backendDrain(), func() {
		s.mu.Lock()
		delete(s.drains, t)
		if s.backends.Load().Healthy(b) {
			s.mu.Unlock()
			return
		}
		var victims []*session
		for sess := range s.sessions {
			if rl := sess.rl.Load(); rl != nil && rl.backend.Same(b) {
				victims = append(victims, sess)
			}
		}
		s.mu.Unlock()
		if len(victims) > 0 {
			s.log.Info("ending sessions on a drained backend", "backend", b.ID, "sessions", len(victims))
		}
		s.stats.drained.Add(uint64(len(victims)))
		for _, sess := range victims {
			sess.evict(replyTo(errDrained, loggedIn, ""))
		}
	})
	s.drains[t] = struct{}{}
}

// markDown makes this proxy skip a backend for DownTime.
func (s *Server) markDown(id string, why error) {
	if s.backends.MarkDown(id, s.options().downTime()) {
		s.stats.down.Add(1)
		s.log.Warn("backend marked down", "backend", id, "for", s.options().downTime(), "error", why)
	}
}

// Stats are the server's cumulative counters and gauges.
type Stats struct {
	Sessions        int    // client connections open now
	LoginsFresh     uint64 // client logins on a new backend connection
	LoginsReused    uint64 // client logins on a cached connection
	LoginsRefused   uint64 // refused by the backend (wrong password and the like)
	LoginsFailed    uint64 // no backend could take the login
	Failovers       uint64 // logins that went past the user's first backend
	BackendsDown    uint64 // times a backend was marked down by this proxy
	BackendsDrained uint64 // sessions ended because their backend left
	Rejected        uint64 // connections refused by a client limit
	UserLimited     uint64 // logins refused by the per-user session limit
	BytesToServer   uint64 // relayed from clients to backends after login
	BytesToClient   uint64 // relayed from backends to clients after login
}

type counters struct {
	fresh, reused, refused, failed, failovers, down, drained atomic.Uint64
	rejected, userLimited                                    atomic.Uint64
	bytesUp, bytesDown                                       atomic.Uint64
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	n := len(s.sessions)
	s.mu.Unlock()
	return Stats{
		Sessions:        n,
		LoginsFresh:     s.stats.fresh.Load(),
		LoginsReused:    s.stats.reused.Load(),
		LoginsRefused:   s.stats.refused.Load(),
		LoginsFailed:    s.stats.failed.Load(),
		Failovers:       s.stats.failovers.Load(),
		BackendsDown:    s.stats.down.Load(),
		BackendsDrained: s.stats.drained.Load(),
		Rejected:        s.stats.rejected.Load(),
		UserLimited:     s.stats.userLimited.Load(),
		BytesToServer:   s.stats.bytesUp.Load(),
		BytesToClient:   s.stats.bytesDown.Load(),
	}
}

// Backends returns the backends in service, sorted by ID: the current
// set less those drained by an operator.
func (s *Server) Backends() []backend.Backend {
	return s.backends.Load().Serving()
}

// Pool returns the server's connection pool.
func (s *Server) Pool() *pool.Pool { return s.pool }

// ProbeCapabilities fetches a backend's pre-login capabilities for the
// greeting. Later fresh connections refresh them.
func (s *Server) ProbeCapabilities(ctx context.Context) error {
	var err error
	for _, b := range s.backends.Load().Serving() {
		var u *upstream.Conn
		u, err = s.dialer().Dial(ctx, b)
		if err != nil {
			continue
		}
		caps := u.PreCaps()
		s.preCaps.Store(&caps)
		u.Close()
		return nil
	}
	if err == nil {
		err = errors.New("no backends")
	}
	return err
}

func (s *Server) backendCaps() []string {
	if p := s.preCaps.Load(); p != nil {
		return *p
	}
	return []string{"IDLE", "ENABLE"}
}

// digest binds a credential to the process key. The password itself is
// never kept: only this HMAC, compared in constant time by the pool.
// A client address, when given, is bound in too: a cached connection is
// then found only by logins from that address, while the pool still
// files it under the user, where CloseUser and kicks find it.
func (s *Server) digest(cr *upstream.Credentials, addr string) pool.Digest {
	m := hmac.New(sha256.New, s.key[:])
	m.Write(cr.User)
	m.Write([]byte{0})
	m.Write(cr.Authzid)
	m.Write([]byte{0})
	m.Write(cr.Pass)
	if addr != "" {
		m.Write([]byte{0})
		m.Write([]byte(addr))
	}
	var d pool.Digest
	m.Sum(d[:0])
	return d
}

// Serve accepts connections on l until it fails or the server shuts down.
// tlsMode is the listener's client TLS: TLSNone, TLSStartTLS or
// TLSImplicit.
func (s *Server) Serve(l net.Listener, tlsMode backend.TLSMode) error {
	return s.ServeListener(l, ListenerOptions{TLS: tlsMode})
}

// ListenerOptions say how the connections of one listener begin.
type ListenerOptions struct {
	TLS backend.TLSMode
	// ProxyProtocolFrom are the load balancers whose connections start
	// with a PROXY protocol header (v1 or v2): the address in it is the
	// client's from then on, for limits, logs and the ID sent to the
	// backend. A connection from them without a valid header is closed.
	// Other peers are served as they are.
	ProxyProtocolFrom proxyproto.Trusted
	// CacheByClientAddress makes the client's address part of what a
	// cached backend connection is found by, so that a login from
	// another address is a real backend login, which the backend checks
	// against its address rules (Dovecot allow_nets, auth policy). For
	// listeners that face end users; behind a webmail every login comes
	// from the webmail's address and this changes nothing.
	CacheByClientAddress bool
}

// ServeListener is Serve with more to say about the listener.
func (s *Server) ServeListener(l net.Listener, lo ListenerOptions) error {
	opts := new(atomic.Pointer[ListenerOptions])
	opts.Store(&lo)
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = opts
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			down := s.shutdown
			s.mu.Unlock()
			if down {
				return ErrServerClosed
			}
			if outOfFiles(err) && s.shed(l) {
				// A client waiting in the queue was told to come
				// back later; go on at once with the next.
				continue
			}
			// Out of file descriptors and the like: back off as
			// net/http does, instead of spinning.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "error", err, "delay", delay)
				t := time.NewTimer(delay)
				<-t.C
				continue
			}
			return err
		}
		delay = 0
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		lo := opts.Load()
		tlsMode := lo.TLS
		if lo.ProxyProtocolFrom.Contains(c.RemoteAddr()) {
			// The header may be slow to come: read it off the
			// accept loop.
			go s.acceptProxied(c, *lo)
			continue
		}
		sess := s.newSession(c, tlsMode)
		if sess == nil {
			continue
		}
		sess.cacheByAddr = lo.CacheByClientAddress
		go sess.serve()
	}
}

// acceptProxied reads the PROXY protocol header of a connection from a
// trusted load balancer, then serves it as coming from the client the
// header names.
func (s *Server) acceptProxied(c net.Conn, lo ListenerOptions) {
	// Shutdown closes connections still waiting for their header.
	s.mu.Lock()
	if s.shutdown {
		s.mu.Unlock()
		c.Close()
		return
	}
	if s.pending == nil {
		s.pending = map[net.Conn]struct{}{}
	}
	s.pending[c] = struct{}{}
	s.mu.Unlock()
	pc, err := proxyproto.Accept(c, s.options().preAuthTimeout())
	s.mu.Lock()
	delete(s.pending, c)
	s.mu.Unlock()
	if err != nil {
		s.log.Warn("connection closed: no valid PROXY protocol header from a load balancer", "peer", c.RemoteAddr().String(), "error", err)
		c.Close()
		return
	}
	if sess := s.newSession(pc, lo.TLS); sess != nil {
		sess.cacheByAddr = lo.CacheByClientAddress
		sess.serve()
	}
}

// ErrNotServing is returned by SetListenerOptions for a listener that
// the server does not serve.
var ErrNotServing = errors.New("proxy: listener not served")

// SetListenerOptions changes how the connections a served listener
// accepts from now on begin (TLS mode, PROXY protocol sources), without
// closing the listener: a reload keeps its socket, so no client is
// refused in between. Connections already accepted keep their options.
func (s *Server) SetListenerOptions(l net.Listener, lo ListenerOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	opts, ok := s.listeners[l]
	if !ok {
		return ErrNotServing
	}
	opts.Store(&lo)
	return nil
}

// outOfFiles reports whether err is the process or the system running out
// of file descriptors.
func outOfFiles(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// shed turns away one client waiting in l's accept queue when the process
// is out of descriptors: it closes the descriptor held in reserve for
// this, accepts, writes a BYE and closes, then takes the reserve back
// (the trick of nginx and libev). Without it the client would sit in the
// queue, greeted by nobody, until it gave up. It reports whether a client
// was turned away.
func (s *Server) shed(l net.Listener) bool {
	dl, ok := l.(interface{ SetDeadline(time.Time) error })
	if !ok {
		return false
	}
	s.reserveMu.Lock()
	defer s.reserveMu.Unlock()
	if s.closedReserve {
		return false
	}
	if s.reserve == nil {
		// A dial or another listener took the descriptor the last
		// shed freed: try to hold one again, for this time or next.
		f, err := os.Open(os.DevNull)
		if err != nil {
			return false
		}
		s.reserve = f
	}
	s.reserve.Close()
	s.reserve = nil
	defer func() {
		// The descriptor just closed is the lowest free one again,
		// unless another goroutine took it; then the next shed tries.
		if f, err := os.Open(os.DevNull); err == nil {
			s.reserve = f
		}
	}()
	// Linux fails accept for want of a descriptor before it looks at the
	// queue, so the queue may be empty: do not wait for a client.
	dl.SetDeadline(time.Now().Add(10 * time.Millisecond))
	c, err := l.Accept()
	dl.SetDeadline(time.Time{})
	if err != nil {
		return false
	}
	s.stats.rejected.Add(1)
	s.log.Warn("connection refused: out of file descriptors", "client", c.RemoteAddr().String())
	refuseConn(c, errOutOfFiles)
	return true
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (s *Server) newSession(c net.Conn, tlsMode backend.TLSMode) *session {
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
		s.events.log(s.log, hclog.Warn, "refused:"+over, "connection refused: limit reached", "limit", over, "client", c.RemoteAddr().String())
		refuseConn(c, errTooManyClients)
		return nil
	}
	defer s.mu.Unlock()
	sess := &session{
		srv:     s,
		id:      strconv.FormatUint(s.nextID.Add(1), 36),
		conn:    c,
		raw:     c,
		tlsMode: tlsMode,
		ip:      ip,
		preNet:  pnet,
	}
	s.sessions[sess] = struct{}{}
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

// leavePreAuthLocked takes a session out of the pre-login counts; the
// caller holds s.mu.
func (s *Server) leavePreAuthLocked(sess *session) {
	s.preAuth--
	if s.preAuthBy[sess.preNet]--; s.preAuthBy[sess.preNet] <= 0 {
		delete(s.preAuthBy, sess.preNet)
	}
}

func remoteIP(c net.Conn) string {
	host, _, err := net.SplitHostPort(c.RemoteAddr().String())
	if err != nil {
		return c.RemoteAddr().String()
	}
	return host
}

// loggedIn moves a session out of the pre-auth count and counts it for
// user; it reports false, counting nothing, when user has
// MaxSessionsPerUser sessions already.
func (s *Server) loggedIn(sess *session, rl *relay, user string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if max := s.options().MaxSessionsPerUser; max > 0 && s.perUser[user] >= max {
		return false
	}
	s.perUser[user]++
	if sess.user == "" {
		s.leavePreAuthLocked(sess)
	}
	sess.user = user
	// Under the lock StartTrace takes to match sessions by user: a trace
	// started at any moment finds the session or is found here.
	if tr := s.traces[traceKey(user)]; tr != nil {
		rl.trace.Store(tr)
	}
	return true
}

// userFull reports whether user is at MaxSessionsPerUser, so a login can
// be refused before it costs a backend anything.
func (s *Server) userFull(user string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	max := s.options().MaxSessionsPerUser
	return max > 0 && s.perUser[user] >= max
}

func (s *Server) endSession(sess *session) {
	s.mu.Lock()
	delete(s.sessions, sess)
	if s.perIP[sess.ip]--; s.perIP[sess.ip] <= 0 {
		delete(s.perIP, sess.ip)
	}
	if sess.user == "" {
		s.leavePreAuthLocked(sess)
	} else {
		s.leaveUserLocked(sess)
	}
	s.mu.Unlock()
	s.wg.Done()
}

// leaveUser takes a logged-in session out of its user's count before the
// session is over: when it says its last word. A webmail logs in again
// the moment the LOGOUT answer arrives, and must not be refused for the
// session it has just ended.
func (s *Server) leaveUser(sess *session) {
	s.mu.Lock()
	s.leaveUserLocked(sess)
	s.mu.Unlock()
}

func (s *Server) leaveUserLocked(sess *session) {
	if sess.user == "" || sess.userLeft {
		return
	}
	sess.userLeft = true
	if s.perUser[sess.user]--; s.perUser[sess.user] <= 0 {
		delete(s.perUser, sess.user)
	}
}

// Shutdown stops accepting, asks every session to end at its next command
// boundary with a BYE, waits until they have or ctx ends, then ends the
// rest and logs out the cached connections; those still logging out when
// ctx ends are closed without LOGOUT, so Shutdown returns by ctx's
// deadline even when a backend hangs.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	s.stopDrainsLocked()
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.pending {
		c.Close()
	}
	sessions := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	for _, sess := range sessions {
		sess.drain()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.Close()
		<-done
	}
	if perr := s.pool.Shutdown(ctx); err == nil {
		err = perr
	}
	s.dropReserve()
	s.stopTraces()
	s.events.close()
	return err
}

func (s *Server) dropReserve() {
	s.reserveMu.Lock()
	defer s.reserveMu.Unlock()
	s.closedReserve = true
	if s.reserve != nil {
		s.reserve.Close()
		s.reserve = nil
	}
}

// Close ends every session at once.
func (s *Server) Close() {
	s.cancel()
	s.mu.Lock()
	s.shutdown = true
	s.stopDrainsLocked()
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.pending {
		c.Close()
	}
	for sess := range s.sessions {
		sess.kill()
	}
	s.mu.Unlock()
	s.dropReserve()
	s.stopTraces()
	s.events.close()
}

func (s *Server) stopDrainsLocked() {
	for t := range s.drains {
		t.Stop()
		delete(s.drains, t)
	}
}
