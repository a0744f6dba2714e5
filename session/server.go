package session

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/cluster"
	"github.com/imapproxy/imapproxy/internal/logx"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

// Config is what a session reads of the server's settings. The server
// swaps it whole on a reload, and a session reads it each time it needs a
// value, so a reload reaches sessions already running. Zero fields take
// the defaults in brackets (see proxy.Options, which they come from).
type Config struct {
	Dialer             *upstream.Dialer
	TLSConfig          *tls.Config // client-facing; nil: no STARTTLS, no implicit TLS
	RequireTLSForLogin bool
	Banner             string   // ["imapproxy ready."]
	Metrics            *Metrics // nil records nothing

	PreAuthTimeout  time.Duration // [60s]
	AuthIdleTimeout time.Duration // [30m]
	IdleTimeout     time.Duration // [60m]
	LiteralTimeout  time.Duration // [60s]
	WriteTimeout    time.Duration // [60s]
	LogoutWait      time.Duration // [30s]
	ResponseTimeout time.Duration // [120s]

	MaxLineLength     int   // [64 KiB]
	MaxLiteralPreAuth int   // [8 KiB]
	MaxCommandPreAuth int   // [40 KiB]
	MaxLiteral        int64 // [64 MiB]
	MaxBadCommands    int   // [3]
	MaxUserLength     int   // [256]
	MaxPasswordLength int   // [4096]
	MaxLoginFailures  int   // [3]; negative: no limit
	// LoginFailureDelay [1s]; negative: none.
	LoginFailureDelay time.Duration
}

func (o *Config) banner() string {
	if o.Banner != "" {
		return o.Banner
	}
	return "imapproxy ready."
}
func (o *Config) preAuthTimeout() time.Duration  { return orDur(o.PreAuthTimeout, 60*time.Second) }
func (o *Config) authIdleTimeout() time.Duration { return orDur(o.AuthIdleTimeout, 30*time.Minute) }
func (o *Config) idleTimeout() time.Duration     { return orDur(o.IdleTimeout, 60*time.Minute) }
func (o *Config) literalTimeout() time.Duration  { return orDur(o.LiteralTimeout, 60*time.Second) }
func (o *Config) writeTimeout() time.Duration    { return orDur(o.WriteTimeout, 60*time.Second) }
func (o *Config) logoutWait() time.Duration      { return orDur(o.LogoutWait, 30*time.Second) }
func (o *Config) responseTimeout() time.Duration { return orDur(o.ResponseTimeout, 120*time.Second) }
func (o *Config) maxLine() int                   { return orInt(o.MaxLineLength, 64*1024) }
func (o *Config) maxLiteralPreAuth() int         { return orInt(o.MaxLiteralPreAuth, 8*1024) }
func (o *Config) maxCommandPreAuth() int         { return orInt(o.MaxCommandPreAuth, 40*1024) }
func (o *Config) maxUserLength() int             { return orInt(o.MaxUserLength, 256) }
func (o *Config) maxPasswordLength() int         { return orInt(o.MaxPasswordLength, 4096) }
func (o *Config) maxBad() int                    { return orInt(o.MaxBadCommands, 3) }
func (o *Config) maxLoginFailures() int {
	if o.MaxLoginFailures < 0 {
		return 0
	}
	return orInt(o.MaxLoginFailures, 3)
}
func (o *Config) loginFailureDelay() time.Duration {
	if o.LoginFailureDelay < 0 {
		return 0
	}
	return orDur(o.LoginFailureDelay, time.Second)
}
func (o *Config) maxLiteral() int64 {
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

// Host is the server's side of the sessions it accepted: its registry of
// who is logged in, and its view of the backends. proxy.Server provides
// it. Its methods are called without any lock of the session's held.
type Host interface {
	// Config returns the current settings.
	Config() *Config
	// Backends returns the current backend set.
	Backends() *cluster.Set
	// MarkDown has the server skip a backend for a while: a dial to it
	// failed, or it refused a login as unavailable.
	MarkDown(id string, why error)
	// BackendCaps returns the pre-login capabilities of the backends,
	// as last seen; SawCaps records those of a fresh connection.
	BackendCaps() []string
	SawCaps(caps []string)

	// UserFull reports whether user is at the per-user session limit,
	// so that a login can be refused before it costs a backend anything.
	UserFull(user string) bool
	// LoggedIn counts s for user, the session's login name; ok is false,
	// and nothing counted, when user is at the limit. tr is the trace an
	// operator runs for user, if any.
	LoggedIn(s *Session, user string) (tr *Tracer, ok bool)
	// LeftUser takes s out of its user's count when it says its last
	// word: a webmail logs in again the moment LOGOUT is answered.
	LeftUser(s *Session)
	// Ended is called once when s is over.
	Ended(s *Session)
	// KickedSince reports whether an operator kicked the owner of cache
	// key after born, a connection's first login: such a connection is
	// closed, not cached.
	KickedSince(key string, born time.Time) bool
}

// Server is what the sessions of one server share: fixed for the
// server's life, filled in by it before the first session.
type Server struct {
	Host   Host
	Log    hclog.Logger
	Pool   *pool.Pool
	Events *logx.Events // lines of events clients can repeat at will
	Stats  *Counters
	// Ctx ends with the server's Close: logins under way toward
	// backends end with it, as sessions do.
	Ctx context.Context
	Key [32]byte // HMAC key of credential digests, drawn at start
}

// Counters are the sessions' contributions to the server's statistics.
type Counters struct {
	Fresh, Reused, Refused, Failed, Failovers, UserLimited atomic.Uint64
	BytesUp, BytesDown                                     atomic.Uint64
}

func (s *Server) options() *Config            { return s.Host.Config() }
func (s *Server) dialer() *upstream.Dialer    { return s.Host.Config().Dialer }
func (s *Server) backends() *cluster.Set      { return s.Host.Backends() }
func (s *Server) markDown(id string, e error) { s.Host.MarkDown(id, e) }

// Digest binds a credential to the process key. The password itself is
// never kept: only this HMAC, compared in constant time by the pool.
// A client address, when given, is bound in too: a cached connection is
// then found only by logins from that address, while the pool still
// files it under the user, where CloseUser and kicks find it.
func (s *Server) Digest(cr *upstream.Credentials, addr string) pool.Digest {
	m := hmac.New(sha256.New, s.Key[:])
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
