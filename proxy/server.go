// Package proxy is the server of imapproxy: it accepts clients on its
// listeners (PROXY protocol from load balancers, shedding when out of
// descriptors), admits them under the client limits, keeps the registry of
// its sessions (per address, per user, traces, kicks), acts on changes of
// the backend set (ending sessions on a backend that left, closing its
// cached connections) and answers the admin queries. One client's session
// is package session.
package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
	"github.com/imapproxy/imapproxy/cluster"
	"github.com/imapproxy/imapproxy/internal/logx"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/session"
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
	Metrics *session.Metrics
}

func (o *Options) preAuthTimeout() time.Duration { return orDur(o.PreAuthTimeout, 60*time.Second) }
func (o *Options) backendDrain() time.Duration   { return orDur(o.BackendDrain, 30*time.Second) }
func (o *Options) downTime() time.Duration       { return orDur(o.DownTime, 10*time.Second) }
func (o *Options) maxPreAuthPerIP() int {
	if o.MaxPreAuthPerIP < 0 {
		return 0
	}
	return orInt(o.MaxPreAuthPerIP, 100)
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
	opts          atomic.Pointer[Options]
	sessionConfig atomic.Pointer[session.Config] // what sessions read of opts
	log           hclog.Logger
	pool          *pool.Pool
	shared        *session.Server // what every session shares

	backends *cluster.Roster          // the backend set, read by every login
	preCaps  atomic.Pointer[[]string] // latest backend pre-login capabilities

	nextID atomic.Uint64
	stats  counters // the sessions' own are in shared.Stats

	// ctx is cancelled by Close: logins under way toward backends end
	// with it, as sessions do.
	ctx    context.Context
	cancel context.CancelFunc
	events *logx.Events // lines of events clients can repeat at will

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
	sessions  map[*session.Session]*member
	traces    map[string]*session.Tracer // by traceKey(user)
	kicked    map[string]time.Time       // users an operator kicked, and when
	pending   map[net.Conn]struct{}      // from load balancers, header not read yet
	shutdown  bool
	wg        sync.WaitGroup // sessions
}

// New returns a Server.
func New(opts Options) *Server {
	s := &Server{
		listeners: map[net.Listener]*atomic.Pointer[ListenerOptions]{},
		sessions:  map[*session.Session]*member{},
		drains:    map[*time.Timer]struct{}{},
		perIP:     map[string]int{},
		perUser:   map[string]int{},
		preAuthBy: map[string]int{},
		events:    logx.NewEvents(logx.Interval),
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
	s.storeOptions(&opts)
	s.reserve, _ = os.Open(os.DevNull)
	s.backends = cluster.New(cluster.Options{Key: opts.HashKey})
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.shared = &session.Server{
		Host: host{s}, Log: s.log, Pool: s.pool, Events: s.events,
		Stats: &session.Counters{}, Ctx: s.ctx,
	}
	if _, err := rand.Read(s.shared.Key[:]); err != nil {
		panic("proxy: no randomness for the credential key: " + err.Error())
	}
	return s
}

// storeOptions installs opts and the session settings drawn from them.
func (s *Server) storeOptions(o *Options) {
	s.opts.Store(o)
	s.sessionConfig.Store(&session.Config{
		Dialer: o.Dialer, TLSConfig: o.TLSConfig, RequireTLSForLogin: o.RequireTLSForLogin,
		Banner: o.Banner, Metrics: o.Metrics,
		PreAuthTimeout: o.PreAuthTimeout, AuthIdleTimeout: o.AuthIdleTimeout, IdleTimeout: o.IdleTimeout,
		LiteralTimeout: o.LiteralTimeout, WriteTimeout: o.WriteTimeout, LogoutWait: o.LogoutWait,
		ResponseTimeout: o.ResponseTimeout,
		MaxLineLength:   o.MaxLineLength, MaxLiteralPreAuth: o.MaxLiteralPreAuth,
		MaxCommandPreAuth: o.MaxCommandPreAuth, MaxLiteral: o.MaxLiteral, MaxBadCommands: o.MaxBadCommands,
		MaxUserLength: o.MaxUserLength, MaxPasswordLength: o.MaxPasswordLength,
		MaxLoginFailures: o.MaxLoginFailures, LoginFailureDelay: o.LoginFailureDelay,
	})
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
	s.storeOptions(&opts)
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
		s.options().Metrics.Forget(id)
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
		s.mu.Unlock()
		victims := s.sessionsOn(b)
		if len(victims) > 0 {
			s.log.Info("ending sessions on a drained backend", "backend", b.ID, "sessions", len(victims))
		}
		s.stats.drained.Add(uint64(len(victims)))
		for _, sess := range victims {
			sess.Evict(session.ErrDrained)
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
	down, drained, rejected atomic.Uint64
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	n := len(s.sessions)
	s.mu.Unlock()
	return Stats{
		Sessions:        n,
		LoginsFresh:     s.shared.Stats.Fresh.Load(),
		LoginsReused:    s.shared.Stats.Reused.Load(),
		LoginsRefused:   s.shared.Stats.Refused.Load(),
		LoginsFailed:    s.shared.Stats.Failed.Load(),
		Failovers:       s.shared.Stats.Failovers.Load(),
		BackendsDown:    s.stats.down.Load(),
		BackendsDrained: s.stats.drained.Load(),
		Rejected:        s.stats.rejected.Load(),
		UserLimited:     s.shared.Stats.UserLimited.Load(),
		BytesToServer:   s.shared.Stats.BytesUp.Load(),
		BytesToClient:   s.shared.Stats.BytesDown.Load(),
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
			if session.OutOfFiles(err) && s.shed(l) {
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
		if lo.ProxyProtocolFrom.Contains(c.RemoteAddr()) {
			// The header may be slow to come: read it off the
			// accept loop.
			go s.acceptProxied(c, *lo)
			continue
		}
		if sess := s.newSession(c, lo); sess != nil {
			go sess.Serve()
		}
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
	if sess := s.newSession(pc, &lo); sess != nil {
		sess.Serve()
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
	session.Refuse(c, session.ErrOutOfFiles)
	return true
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
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
	sessions := make([]*session.Session, 0, len(s.sessions))
	for sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	for _, sess := range sessions {
		sess.Drain()
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
	s.events.Close()
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
		sess.Kill()
	}
	s.mu.Unlock()
	s.dropReserve()
	s.stopTraces()
	s.events.Close()
}

func (s *Server) stopDrainsLocked() {
	for t := range s.drains {
		t.Stop()
		delete(s.drains, t)
	}
}
