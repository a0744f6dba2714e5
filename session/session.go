// Package session runs one client connection of the proxy: the greeting
// and pre-login commands, STARTTLS, LOGIN and AUTHENTICATE, the choice of
// a backend connection (from the pool's cache or a fresh login), the
// relay after login (command framing, literals, IDLE, in-flight
// tracking), and the LOGOUT that hands a clean connection back to the
// pool. It reaches the server that accepted it only through Host and
// Server (server.go); every status line it writes comes from the reply
// table (reply.go).
package session

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/internal/logx"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

// session is one client connection. It owns conn, and the upstream
// connection while it is checked out of the pool.
type Session struct {
	srv     *Server
	id      string
	conn    net.Conn // the client; replaced by its TLS conn at STARTTLS
	raw     net.Conn // the accepted socket, for other goroutines to wake or close
	tlsMode backend.TLSMode
	log     hclog.Logger

	r   *imapwire.Reader
	wmu sync.Mutex // serialises whole responses to the client
	w   *imapwire.Writer
	// silenced is set once the session has said its last word (BYE);
	// relayed responses after that are dropped. Guarded by wmu.
	silenced bool
	// evicted is set when an eviction has its last say; the write of it
	// is bounded short. Guarded by wmu.
	evicted bool

	tls         bool
	cacheByAddr bool // the client address is part of the cache key
	nbad        int
	nfail       int         // failed logins
	idParams    [][2][]byte // the client's ID, "x-" keys removed

	draining atomic.Bool
	rl       atomic.Pointer[relay] // set while relaying
	loginAt  atomic.Int64          // unix nanoseconds of the login, for the admin view

	ip string // the client's address, bound into the cache key by cacheByAddr
}

func (sess *Session) serve() {
	defer sess.srv.Host.Ended(sess)
	defer sess.conn.Close()
	sess.log = logx.With(sess.srv.Log, "session", sess.id, "client", sess.conn.RemoteAddr().String())
	defer func() {
		if p := recover(); p != nil {
			sess.log.Error("session panic", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		}
	}()
	// The relay runs from this small frame, not from start's: a session
	// waiting for its client then parks shallow enough for a 4 KiB stack.
	if rl := sess.start(); rl != nil {
		rl.run()
	}
}

// start greets the client and runs the session up to its login; it
// returns the relay of a logged-in session, nil when the session ended.
func (sess *Session) start() *relay {
	if sess.tlsMode == backend.TLSImplicit {
		if sess.srv.options().TLSConfig == nil {
			sess.log.Error("implicit TLS listener without a certificate")
			return nil
		}
		tc := tls.Server(sess.conn, sess.srv.options().TLSConfig)
		tc.SetDeadline(time.Now().Add(sess.srv.options().preAuthTimeout()))
		if err := tc.Handshake(); err != nil {
			sess.log.Debug("client tls handshake failed", "error", err)
			return nil
		}
		sess.conn = tc
		sess.tls = true
	}
	sess.r = imapwire.NewReader(sess.conn, sess.srv.options().maxLine())
	sess.w = imapwire.NewWriter(clientDst{sess})
	sess.conn.SetReadDeadline(time.Now().Add(sess.srv.options().preAuthTimeout()))

	sess.reply(imapwire.Status{Type: imapwire.StatusOK, Code: imapwire.CodeCapability, Arg: sess.capabilities(), Text: sess.srv.options().banner()})
	if err := sess.flush(); err != nil {
		return nil
	}
	rl, err := sess.preAuth()
	if err != nil {
		sess.endWithError(err)
		return nil
	}
	return rl
}

func (sess *Session) capabilities() string {
	o := sess.srv.options()
	startTLS := sess.tlsMode == backend.TLSStartTLS && !sess.tls && o.TLSConfig != nil
	loginDisabled := o.RequireTLSForLogin && !sess.tls
	return preLoginCaps(sess.srv.Host.BackendCaps(), startTLS, loginDisabled)
}

func (sess *Session) flush() error { return sess.w.Flush() }

// clientDst is the client's socket as the session's Writer sees it: each
// write gets a fresh write deadline, whether Flush makes it or the Writer
// does on its own when a burst fills its buffer. A deadline set only at
// Flush would be stale for the second kind, and a burst after a quiet
// spell longer than the write timeout would fail at once.
type clientDst struct{ sess *Session }

func (d clientDst) Write(p []byte) (int, error) {
	sess := d.sess
	timeout := sess.srv.options().writeTimeout()
	if sess.evicted {
		// The session ends whether the client reads this or not.
		// (Read without wmu only before the relay runs, when nothing
		// sets it.)
		timeout = lastWordsTimeout
	}
	sess.conn.SetWriteDeadline(time.Now().Add(timeout))
	return sess.conn.Write(p)
}

// lastWordsTimeout bounds the write of the message to a client that is
// being put out: one that does not read must not hold up an eviction.
const lastWordsTimeout = time.Second

// endWithError says goodbye as the error deserves. Ordinary ends of a
// connection are not worth a log line above debug.
func (sess *Session) endWithError(err error) {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		sess.log.Debug("client closed connection")
	case errors.As(err, &ne) && ne.Timeout():
		if sess.draining.Load() {
			sess.reply(replyTo(errShutdown, preLogin, ""))
		} else {
			sess.reply(replyTo(errIdle, preLogin, ""))
		}
		sess.flush()
		sess.log.Debug("client timed out")
	case errors.Is(err, imapwire.ErrNonSyncTooBig):
		sess.reply(replyTo(err, preLogin, ""))
		sess.flush()
		sess.log.Info("client sent an oversized literal")
	case errors.Is(err, errTooManyBad):
		sess.reply(replyTo(err, preLogin, ""))
		sess.flush()
		sess.srv.Events.Log(sess.log, hclog.Info, "too many invalid commands", "too many invalid commands")
	case errors.Is(err, errTooManyFailures):
		sess.reply(replyTo(err, preLogin, ""))
		sess.flush()
		sess.srv.Events.Log(sess.log, hclog.Info, "too many failed logins", "too many failed logins")
	case errors.Is(err, errLogout):
	default:
		sess.log.Debug("session ended", "error", err)
	}
}

var (
	errTooManyBad      = errors.New("too many invalid commands")
	errTooManyFailures = errors.New("too many failed logins")
	errLogout          = errors.New("logout")
)

// bad answers a command error and counts it; too many end the session.
func (sess *Session) bad(st imapwire.Status) error {
	sess.reply(st)
	sess.nbad++
	if sess.nbad >= sess.srv.options().maxBad() {
		return errTooManyBad
	}
	return sess.flush()
}

// preAuth runs the not-authenticated state until a login succeeds
// (returning the relay to run), the client logs out, or an error.
func (sess *Session) preAuth() (*relay, error) {
	o := sess.srv.options()
	dec := &imapwire.Decoder{
		R:          sess.r,
		MaxLiteral: o.maxLiteralPreAuth(),
		MaxCommand: o.maxCommandPreAuth(),
		ArgLimit:   preAuthArgs,
		Continue: func() error {
			enc := imapwire.Encoder{W: sess.w}
			enc.Continuation("Ready for literal data")
			return sess.flush()
		},
	}
	for {
		if sess.draining.Load() {
			sess.reply(replyTo(errShutdown, preLogin, ""))
			sess.flush()
			return nil, errLogout
		}
		cmd, err := dec.ReadCommand()
		if cmd == nil {
			// The line failed before a tag could be read.
			cmd = &imapwire.Command{}
		}
		var se *imapwire.SyntaxError
		switch {
		case err == nil:
		case errors.As(err, &se) && cmd.Name != "" && preAuthArgs(cmd.Name) < 0:
			if err := sess.bad(badStatus(cmd.Tag, "Command not valid before login")); err != nil {
				return nil, err
			}
			continue
		case errors.As(err, &se):
			if err := sess.bad(replyTo(se, preLogin, cmd.Tag)); err != nil {
				return nil, err
			}
			continue
		case errors.Is(err, imapwire.ErrLineTooLong):
			if err := sess.bad(replyTo(err, preLogin, "")); err != nil {
				return nil, err
			}
			continue
		case errors.Is(err, imapwire.ErrLiteralTooBig):
			sess.reply(replyTo(err, preLogin, cmd.Tag))
			if err := sess.flush(); err != nil {
				return nil, err
			}
			continue
		default:
			return nil, err
		}
		rl, err := sess.preAuthCommand(cmd)
		if rl != nil || err != nil {
			return rl, err
		}
		if err := sess.flush(); err != nil {
			return nil, err
		}
	}
}

// preAuthArgs is the most tokens each command may have before login, so
// that none can be stretched into a chain of pieces the proxy would hold:
// LOGIN's two strings, AUTHENTICATE's mechanism and initial response,
// ID's list of RFC 2971's 30 pairs in parentheses. A command the proxy
// does not take before login gets -1: none, and it is refused whatever
// it carries.
func preAuthArgs(name string) int {
	switch name {
	case "CAPABILITY", "NOOP", "LOGOUT", "STARTTLS":
		return 0
	case "LOGIN", "AUTHENTICATE":
		return 2
	case "ID":
		return 2*maxIDPairs + 2
	}
	return -1
}

func (sess *Session) preAuthCommand(cmd *imapwire.Command) (*relay, error) {
	o := sess.srv.options()
	sess.log.Trace("command", "tag", logx.Clip(cmd.Tag), "command", logx.Clip(cmd.Name))
	switch cmd.Name {
	case "CAPABILITY":
		if len(cmd.Args) != 0 {
			return nil, sess.bad(badStatus(cmd.Tag, "CAPABILITY takes no arguments"))
		}
		enc := imapwire.Encoder{W: sess.w}
		enc.Atom("* CAPABILITY ").Atom(sess.capabilities()).CRLF()
		sess.reply(okStatus(cmd.Tag, "CAPABILITY completed"))
	case "NOOP":
		sess.reply(okStatus(cmd.Tag, "NOOP completed"))
	case "LOGOUT":
		sess.reply(statusLogout)
		sess.reply(okStatus(cmd.Tag, "LOGOUT completed"))
		sess.flush()
		return nil, errLogout
	case "STARTTLS":
		return nil, sess.startTLS(cmd)
	case "ID":
		return nil, sess.idCommand(cmd)
	case "LOGIN":
		if len(cmd.Args) != 2 || !isString(cmd.Args[0]) || !isString(cmd.Args[1]) {
			return nil, sess.bad(badStatus(cmd.Tag, "LOGIN expects user name and password"))
		}
		if o.RequireTLSForLogin && !sess.tls {
			sess.reply(replyTo(errNeedTLS, preLogin, cmd.Tag, "login"))
			clear(cmd.Args[1].Value)
			return nil, nil
		}
		cr := &upstream.Credentials{User: cmd.Args[0].Value, Pass: cmd.Args[1].Value}
		return sess.login(cmd.Tag, cr)
	case "AUTHENTICATE":
		return sess.authenticate(cmd)
	default:
		return nil, sess.bad(badStatus(cmd.Tag, "Command not valid before login"))
	}
	return nil, nil
}

func isString(t imapwire.Token) bool { return t.Kind == imapwire.String || t.Kind == imapwire.Atom }

func (sess *Session) startTLS(cmd *imapwire.Command) error {
	if sess.tlsMode != backend.TLSStartTLS || sess.tls || sess.srv.options().TLSConfig == nil {
		return sess.bad(badStatus(cmd.Tag, "STARTTLS not available"))
	}
	if sess.r.Buffered() > 0 {
		// Commands pipelined behind STARTTLS were sent in the clear and
		// could have been injected (CVE-2011-0411 and kin).
		sess.reply(replyTo(errPipelinedTLS, preLogin, ""))
		sess.flush()
		return errLogout
	}
	sess.reply(okStatus(cmd.Tag, "Begin TLS negotiation now"))
	if err := sess.flush(); err != nil {
		return err
	}
	tc := tls.Server(sess.conn, sess.srv.options().TLSConfig)
	if err := tc.Handshake(); err != nil {
		sess.log.Debug("client starttls handshake failed", "error", err)
		return errLogout
	}
	sess.conn = tc
	sess.tls = true
	sess.r.Reset(tc)
	sess.w.Reset(clientDst{sess}) // now writing to tc
	return nil
}

// Limits from RFC 2971.
const (
	maxIDPairs    = 30
	maxIDKeyLen   = 30
	maxIDValueLen = 1024
)

func (sess *Session) idCommand(cmd *imapwire.Command) error {
	args := cmd.Args
	var params [][2][]byte
	switch {
	case len(args) == 1 && args[0].Kind == imapwire.Atom && strings.EqualFold(string(args[0].Value), "NIL"):
	case len(args) >= 2 && args[0].Kind == imapwire.ListStart && args[len(args)-1].Kind == imapwire.ListEnd:
		inner := args[1 : len(args)-1]
		if len(inner)%2 != 0 || len(inner)/2 > maxIDPairs {
			return sess.bad(badStatus(cmd.Tag, "Invalid ID parameters"))
		}
		for i := 0; i < len(inner); i += 2 {
			k, v := inner[i], inner[i+1]
			if k.Kind != imapwire.String || len(k.Value) > maxIDKeyLen || len(v.Value) > maxIDValueLen {
				return sess.bad(badStatus(cmd.Tag, "Invalid ID parameters"))
			}
			if v.Kind == imapwire.Atom && !strings.EqualFold(string(v.Value), "NIL") || v.Kind > imapwire.String {
				return sess.bad(badStatus(cmd.Tag, "Invalid ID parameters"))
			}
			// The proxy is trusted by the backend to tell it who the
			// client is; a client must not tell it that itself.
			if len(k.Value) >= 2 && (k.Value[0] == 'x' || k.Value[0] == 'X') && k.Value[1] == '-' {
				continue
			}
			var val []byte
			if v.Kind == imapwire.String {
				val = v.Value
			}
			params = append(params, [2][]byte{k.Value, val})
		}
	default:
		return sess.bad(badStatus(cmd.Tag, "Invalid ID parameters"))
	}
	sess.idParams = params
	enc := imapwire.Encoder{W: sess.w}
	enc.Atom("* ID ").List(2, func(i int) { enc.String([]byte(serverID[i])) }).CRLF()
	sess.reply(okStatus(cmd.Tag, "ID completed"))
	return nil
}

// backendID builds the ID parameter list sent to a backend before LOGIN:
// the client's own fields plus where it really connects from, which
// Dovecot honours from its login_trusted_networks.
func (sess *Session) backendID() []byte {
	buf := []byte{'('}
	add := func(k, v []byte) {
		if len(buf) > 1 {
			buf = append(buf, ' ')
		}
		var ok bool
		if buf, ok = imapwire.AppendQuoted(buf, k); !ok {
			return
		}
		buf = append(buf, ' ')
		if v == nil {
			buf = append(buf, "NIL"...)
		} else if nb, ok := imapwire.AppendQuoted(buf, v); ok {
			buf = nb
		} else {
			buf = append(buf, "NIL"...)
		}
	}
	for _, p := range sess.idParams {
		add(p[0], p[1])
	}
	if host, port, err := net.SplitHostPort(sess.conn.RemoteAddr().String()); err == nil {
		add([]byte("x-originating-ip"), []byte(host))
		add([]byte("x-originating-port"), []byte(port))
	}
	// Behind a load balancer, the address the client connected to is
	// the one its PROXY header gives.
	local := sess.raw.LocalAddr().String()
	if pc, ok := sess.raw.(*proxyproto.Conn); ok && !pc.Header().Local {
		local = pc.Header().Dest.String()
	}
	if host, port, err := net.SplitHostPort(local); err == nil {
		add([]byte("x-connected-ip"), []byte(host))
		add([]byte("x-connected-port"), []byte(port))
	}
	add([]byte("x-session-id"), []byte("imapproxy-"+sess.id))
	return append(buf, ')')
}

// authenticate runs AUTHENTICATE PLAIN or LOGIN, with or without an
// initial response (SASL-IR).
func (sess *Session) authenticate(cmd *imapwire.Command) (*relay, error) {
	if len(cmd.Args) < 1 || len(cmd.Args) > 2 || cmd.Args[0].Kind != imapwire.Atom {
		return nil, sess.bad(badStatus(cmd.Tag, "AUTHENTICATE expects a mechanism"))
	}
	mech := strings.ToUpper(string(cmd.Args[0].Value))
	if mech != "PLAIN" && mech != "LOGIN" {
		sess.reply(replyTo(errMechanism, preLogin, cmd.Tag))
		return nil, nil
	}
	if sess.srv.options().RequireTLSForLogin && !sess.tls {
		sess.reply(replyTo(errNeedTLS, preLogin, cmd.Tag, "authentication"))
		return nil, nil
	}
	// step reads one client response: the initial response on the
	// command line for the first step when the client sent one (SASL-IR),
	// else after a continuation request with challenge.
	first := true
	step := func(challenge string) ([]byte, bool, error) {
		if first && len(cmd.Args) == 2 {
			first = false
			d, err := decodeSASL(cmd.Args[1].Value)
			return d, false, err
		}
		first = false
		return sess.saslStep(challenge)
	}
	// fail answers a cancelled or broken exchange; other errors end the
	// session.
	fail := func(cancel bool, err error) (*relay, error) {
		switch {
		case cancel:
			sess.reply(badStatus(cmd.Tag, "AUTHENTICATE cancelled"))
			return nil, nil
		case errors.Is(err, errBadBase64):
			return nil, sess.bad(badStatus(cmd.Tag, "Invalid base64 data in AUTHENTICATE"))
		case errors.Is(err, imapwire.ErrLineTooLong):
			// The reader skips the rest of the line; the exchange is over.
			return nil, sess.bad(badStatus(cmd.Tag, "AUTHENTICATE response too long"))
		}
		return nil, err
	}
	if mech == "PLAIN" {
		data, cancel, err := step("")
		if cancel || err != nil {
			return fail(cancel, err)
		}
		defer clear(data)
		cr, ok := parsePlain(data)
		if !ok {
			return nil, sess.bad(badStatus(cmd.Tag, "Invalid PLAIN credentials"))
		}
		return sess.login(cmd.Tag, cr)
	}
	user, cancel, err := step("VXNlcm5hbWU6") // "Username:"
	if cancel || err != nil {
		return fail(cancel, err)
	}
	pass, cancel, err := step("UGFzc3dvcmQ6") // "Password:"
	if cancel || err != nil {
		return fail(cancel, err)
	}
	return sess.login(cmd.Tag, &upstream.Credentials{User: user, Pass: pass})
}

var errBadBase64 = errors.New("bad base64")

// parsePlain splits a SASL PLAIN message (RFC 4616): authzid NUL authcid
// NUL passwd. The slices alias data. An authzid equal to the user is the
// user logging in as themself, not an authorization request.
func parsePlain(data []byte) (*upstream.Credentials, bool) {
	parts := bytes.SplitN(data, []byte{0}, 3)
	if len(parts) != 3 || len(parts[1]) == 0 || bytes.IndexByte(parts[2], 0) >= 0 {
		return nil, false
	}
	cr := &upstream.Credentials{Authzid: parts[0], User: parts[1], Pass: parts[2]}
	if bytes.Equal(cr.Authzid, cr.User) {
		cr.Authzid = nil
	}
	return cr, true
}

// saslStep sends a continuation request with challenge and reads the
// client's base64 answer; "*" cancels.
func (sess *Session) saslStep(challenge string) (data []byte, cancel bool, err error) {
	enc := imapwire.Encoder{W: sess.w}
	enc.Continuation(challenge)
	if err := sess.flush(); err != nil {
		return nil, false, err
	}
	line, lit, err := sess.r.ReadLine()
	if err != nil {
		return nil, false, err
	}
	if lit != nil {
		return nil, false, errBadBase64
	}
	l := imapwire.TrimEOL(line)
	if len(l) == 1 && l[0] == '*' {
		return nil, true, nil
	}
	data, err = decodeSASL(l)
	clear(line)
	return data, false, err
}

func decodeSASL(b []byte) ([]byte, error) {
	if len(b) == 1 && b[0] == '=' {
		return []byte{}, nil
	}
	out := make([]byte, base64.StdEncoding.DecodedLen(len(b)))
	n, err := base64.StdEncoding.Decode(out, b)
	if err != nil {
		return nil, errBadBase64
	}
	return out[:n], nil
}

// login authenticates the client through its backend: a cached
// connection of the same user and credential if one is alive, otherwise a
// new connection and a real LOGIN. The password is cleared before return.
func (sess *Session) login(tag string, cr *upstream.Credentials) (*relay, error) {
	defer clear(cr.Pass)
	srv := sess.srv
	user := string(cr.User)
	log := logx.With(sess.log, "user", logx.Clip(user))
	if answer, bad := sess.checkCredentials(tag, cr); bad {
		srv.Events.Log(log, hclog.Info, "login rejected", "login rejected: unacceptable credentials", "reason", untaggedLine(answer))
		return nil, sess.loginFailed(answer)
	}
	var addr string
	if sess.cacheByAddr {
		addr = sess.ip
	}
	digest := srv.Digest(cr, addr)
	set := srv.backends()
	if srv.Host.UserFull(user) {
		return sess.userLimited(tag, log)
	}
	// The mailbox owner picks the backend: the authorization identity
	// when a SASL client names one.
	pinUser := user
	if len(cr.Authzid) > 0 {
		pinUser = string(cr.Authzid)
	}
	var order [8]backend.Backend
	candidates := set.Order(pinUser, order[:0])
	if len(candidates.All) == 0 {
		srv.Stats.Failed.Add(1)
		srv.Events.Log(log, hclog.Warn, "no backend available", "login failed: no backend available")
		sess.reply(replyTo(errNoBackend, preLogin, tag))
		return nil, nil
	}
	cacheKey := user
	if len(cr.Authzid) > 0 {
		cacheKey = string(cr.Authzid) + "\x00" + user
	}
	// Backends this proxy saw fail lately are skipped; if all did, all
	// are tried anyway, in the user's order.
	usable := candidates.Try()
	var lastErr error
	var refused *upstream.LoginResult
	m := srv.options().Metrics
	start := time.Now()
	// take gives the session a logged-in backend connection and answers
	// the client; done is false when the login goes on to the next backend.
	take := func(up *upstream.Conn, b backend.Backend, lease *pool.Lease, born time.Time, reused bool, blog hclog.Logger) (rl *relay, done bool, err error) {
		rl = sess.newRelay(up, b, lease, cacheKey, digest, born, blog)
		if err := sess.adopt(rl, user); err != nil {
			rl.giveBack(upLogout)
			if err == errUserLimit {
				rl, err := sess.userLimited(tag, log)
				return rl, true, err
			}
			lastErr = err
			return nil, false, nil
		}
		served := "fresh"
		if reused {
			served = "reused"
			sess.reply(statusReused)
			srv.Stats.Reused.Add(1)
		} else {
			srv.Stats.Fresh.Add(1)
		}
		m.login(served, start)
		blog.Info("login", "reused", reused)
		sess.reply(imapwire.Status{Tag: tag, Type: imapwire.StatusOK, Code: imapwire.CodeCapability, Arg: postLoginCaps(up.PostCaps()), Text: "Logged in"})
		return rl, true, nil
	}
	// attempt logs the user in on backend b: from the cache, else with a
	// new connection.
	attempt := func(b backend.Backend) (rl *relay, done bool, err error) {
		// Each backend gets the whole login timeout: one that hangs
		// must not leave none for the user's next backend.
		ctx, cancel := context.WithTimeout(srv.Ctx, srv.dialer().LoginLimit())
		defer cancel()
		table := srv.Pool.Table(b.ID)
		blog := logx.With(log, "backend", b.ID)
		if first := candidates.First().ID; b.ID != first {
			srv.Stats.Failovers.Add(1)
			srv.Events.Log(blog, hclog.Info, "failover:"+first, "failing over to the next backend", "preferred", first)
		}
		if lease, ok := table.Take(ctx, cacheKey, digest); ok {
			return take(lease.Conn().(*upstream.Conn), b, lease, lease.Born(), true, blog)
		}
		lease, err := table.Lease()
		if err != nil {
			srv.Events.Log(blog, hclog.Warn, "connection limit", "login failed: connection limit reached", "error", err)
			sess.reply(replyTo(pool.ErrFull, preLogin, tag))
			return nil, true, nil
		}
		dialStart := time.Now()
		up, err := srv.dialer().Dial(ctx, b)
		if !OutOfFiles(err) {
			m.dial(b.ID, dialStart, err)
		}
		if err != nil {
			lease.Release()
			if OutOfFiles(err) {
				// Our trouble, not the backend's: marking it down
				// would move its users for nothing.
				blog.Error("login failed: out of file descriptors", "error", err)
				sess.reply(replyTo(ErrOutOfFiles, preLogin, tag))
				return nil, true, nil
			}
			srv.markDown(b.ID, fmt.Errorf("dial: %w", err))
			lastErr = err
			return nil, false, nil
		}
		caps := up.PreCaps()
		srv.Host.SawCaps(caps)
		var id []byte
		if srv.dialer().ForwardID {
			id = sess.backendID()
		}
		// Close (the end of a shutdown's grace) cuts a login that
		// waits on a hung backend, as it cuts sessions.
		res, err := up.Login(srv.Ctx, cr, id)
		if err != nil {
			m.backendLogin(b.ID, "error")
			lease.Abort(up)
			if !isTimeout(err) {
				// The backend greeted, so it is up: a connection
				// it ends in answer to a login is about this
				// login (Dovecot drops one whose user name it
				// cannot take), and must not send every user of
				// the backend elsewhere, nor this one.
				srv.Stats.Failed.Add(1)
				m.login("failed", start)
				srv.Events.Log(blog, hclog.Warn, "ended:"+b.ID, "login failed: backend ended the connection", "error", err)
				return nil, true, sess.loginFailed(replyTo(errBackendEnded, preLogin, tag))
			}
			// Greeting and not answering: the backend is sick.
			srv.markDown(b.ID, fmt.Errorf("login: %w", err))
			lastErr = err
			return nil, false, nil
		}
		if !res.OK {
			lease.Discard(up)
			if bytes.Contains(bytes.ToUpper(res.Text), []byte("[UNAVAILABLE]")) {
				// The server, not the user, is in trouble.
				m.backendLogin(b.ID, "unavailable")
				srv.markDown(b.ID, fmt.Errorf("login refused: %s", sanitizeText(res.Text)))
				refused = &res
				return nil, false, nil
			}
			// The backend's answer stands: a wrong password is the
			// client's to know, and caches nothing and evicts nothing.
			srv.Stats.Refused.Add(1)
			m.backendLogin(b.ID, "refused")
			m.login("refused", start)
			srv.Events.Log(blog, hclog.Info, "refused:"+b.ID, "login refused by backend", "status", res.Status)
			return nil, true, sess.loginFailed(refusal(tag, res.Status, res.Text))
		}
		m.backendLogin(b.ID, "ok")
		return take(up, b, lease, up.Born(), false, blog)
	}
	for _, c := range usable {
		if rl, done, err := attempt(c); done {
			return rl, err
		}
	}
	srv.Stats.Failed.Add(1)
	m.login("failed", start)
	if refused != nil {
		srv.Events.Log(log, hclog.Warn, "every backend unavailable", "login failed: every backend refused as unavailable")
		sess.reply(refusal(tag, refused.Status, refused.Text))
		return nil, nil
	}
	if srv.backends().Len() == 0 {
		// The backends left the set while the login was under way:
		// answer as the next login will be answered.
		srv.Events.Log(log, hclog.Warn, "no backend available", "login failed: no backend available", "error", lastErr)
		sess.reply(replyTo(errNoBackend, preLogin, tag))
		return nil, nil
	}
	srv.Events.Log(log, hclog.Warn, "no backend reachable", "login failed: no backend reachable", "error", lastErr)
	sess.reply(replyTo(errUnreachable, preLogin, tag))
	return nil, nil
}

// checkCredentials returns the answer to credentials that no backend
// should see, and false for acceptable ones. NUL, CR and LF would change
// the meaning of a SASL PLAIN message or a LOGIN line; over-long ones make
// Dovecot drop the connection instead of answering.
func (sess *Session) checkCredentials(tag string, cr *upstream.Credentials) (imapwire.Status, bool) {
	o := sess.srv.options()
	switch {
	case len(cr.User) > o.maxUserLength() || len(cr.Authzid) > o.maxUserLength():
		return replyTo(errUserTooLong, preLogin, tag, o.maxUserLength()), true
	case len(cr.Pass) > o.maxPasswordLength():
		return replyTo(errPassTooLong, preLogin, tag, o.maxPasswordLength()), true
	case bytes.ContainsAny(cr.User, "\x00\r\n") || bytes.ContainsAny(cr.Authzid, "\x00\r\n"):
		return replyTo(errUserChars, preLogin, tag), true
	case bytes.IndexByte(cr.Pass, 0) >= 0:
		return replyTo(errPassChars, preLogin, tag), true
	}
	return imapwire.Status{}, false
}

// loginFailed answers a failed login with answer after
// LoginFailureDelay, and ends the session after
// MaxLoginFailures of them: a client that guesses, or that sends what
// makes a backend fail, gets few tries per connection and those slowly.
func (sess *Session) loginFailed(answer imapwire.Status) error {
	o := sess.srv.options()
	sess.nfail++
	if d := o.loginFailureDelay(); d > 0 {
		// Bounded by the delay, and cut by Close; a drain meanwhile
		// finds the session at its next read.
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-sess.srv.Ctx.Done():
			t.Stop()
		}
	}
	sess.reply(answer)
	if max := o.maxLoginFailures(); max > 0 && sess.nfail >= max {
		return errTooManyFailures
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, upstream.ErrLoginTimeout) || errors.As(err, &ne) && ne.Timeout()
}

var (
	errBackendLeft = errors.New("backend left the set during the login")
	errUserLimit   = errors.New("too many sessions for this user")
)

// adopt makes rl the session's relay, unless its backend left the set while
// the login was under way. Registering first and checking second means a
// drain of that backend either finds the session or the session finds the
// backend gone: no session can slip past both.
func (sess *Session) adopt(rl *relay, user string) error {
	sess.loginAt.Store(time.Now().UnixNano())
	sess.rl.Store(rl)
	if !sess.srv.backends().Serves(rl.backend) {
		sess.rl.Store(nil)
		return errBackendLeft
	}
	tr, ok := sess.srv.Host.LoggedIn(sess, user)
	if !ok {
		// Another login of the user took the last place meanwhile.
		sess.rl.Store(nil)
		return errUserLimit
	}
	if tr != nil {
		rl.trace.Store(tr)
	}
	if tr := rl.trace.Load(); tr != nil {
		tr.Event(fmt.Sprintf("session %s of %s from %s logged in on %s", sess.id, user, sess.conn.RemoteAddr(), rl.backend.ID))
	}
	return nil
}

func (sess *Session) userLimited(tag string, log hclog.Logger) (*relay, error) {
	sess.srv.Stats.UserLimited.Add(1)
	sess.srv.Events.Log(log, hclog.Warn, "user limit", "login refused: too many sessions for this user")
	sess.reply(replyTo(errUserLimit, preLogin, tag))
	return nil, nil
}

// sanitizeText bounds a backend's response text before it is passed on
// or logged, and stands in for one with nothing printable. (The Encoder
// leaves control characters out of any text it writes; this also drops
// them for the logs and to find the empty ones.)
func sanitizeText(b []byte) string {
	if len(b) > 256 {
		b = b[:256]
	}
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c < ' ' || c == 0x7f {
			continue
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return "Authentication failed"
	}
	return string(out)
}

// drain asks the session to end at its next command boundary.
func (sess *Session) drain() {
	sess.draining.Store(true)
	if rl := sess.rl.Load(); rl != nil {
		rl.drain()
		return
	}
	// Before login: wake the reader; it answers with BYE.
	sess.raw.SetReadDeadline(time.Now())
}

// evict ends a logged-in session with a BYE of the proxy's own: its
// backend left the set, or an operator asked (see relay.evict).
func (sess *Session) evict(msg imapwire.Status) {
	if rl := sess.rl.Load(); rl != nil {
		rl.evict(msg)
	}
}

// kill ends the session at once: both connections are closed under the
// session's feet. Shutdown's drain is the polite way.
func (sess *Session) kill() {
	sess.raw.Close()
	if rl := sess.rl.Load(); rl != nil {
		rl.up.Abort()
	}
}
