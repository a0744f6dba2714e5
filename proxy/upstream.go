package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/imapwire"
)

var (
	errBackendBye   = errors.New("backend said BYE")
	errUnexpected   = errors.New("unexpected backend response")
	errPreauth      = errors.New("backend greeted with PREAUTH")
	errNoStartTLS   = errors.New("backend does not offer STARTTLS")
	errStaleData    = errors.New("unread data on cached connection")
	errLoginTimeout = errors.New("backend login timed out")
)

// upstream is a connection to a backend. Its owner is the session using it
// or, while cached, the pool.
type upstream struct {
	backend string
	conn    net.Conn
	raw     net.Conn // the TCP conn under TLS, or conn
	r       *imapwire.Reader
	w       *imapwire.Writer

	preCaps  []string // from the greeting (or CAPABILITY before login)
	postCaps []string // after login
	born     time.Time

	tags       atomic.Uint64
	tagPrefix  string // see nextTag
	checkLimit time.Duration
	// writeTimeout, once a session relays on the connection, bounds each
	// write to the backend (see upDst); before, the login's deadline does.
	writeTimeout time.Duration
}

// upDst is the backend's socket as the upstream's Writer sees it: each
// write gets a fresh deadline, whether Flush makes it or the Writer does
// on its own when a long command line or a pipelined burst fills its
// buffer. A deadline set once per flush would be stale for the second
// kind after a quiet spell, and the session would fail at once.
type upDst struct{ u *upstream }

func (d upDst) Write(p []byte) (int, error) {
	if t := d.u.writeTimeout; t > 0 {
		d.u.conn.SetWriteDeadline(time.Now().Add(t))
	}
	return d.u.conn.Write(p)
}

// nextTag returns a tag for the proxy's own commands. They are sent only
// when no client command is outstanding, and they begin with a secret
// drawn for the connection: a client that made the backend run a command
// the relay never saw (there are ways, see relay.tagged) cannot have it
// answer with the proxy's tag, and so cannot forge the answer to the
// clean-up that decides whether the connection is cached.
func (u *upstream) nextTag() string {
	return u.tagPrefix + strconv.FormatUint(u.tags.Add(1), 10)
}

// newTagPrefix draws the secret part of a connection's own tags.
func newTagPrefix() string {
	var b [8]byte
	rand.Read(b[:])
	return "IMAPPROXY" + hex.EncodeToString(b[:]) + "."
}

// Dialer opens and logs in upstream connections.
type Dialer struct {
	Timeout    time.Duration // per dial attempt
	Retries    int           // extra attempts after a failed dial
	RetryDelay time.Duration
	KeepAlive  time.Duration
	TLS        backend.TLSMode // default TLS mode
	TLSConfig  *tls.Config     // base config; ServerName is set per backend when empty
	// LoginTimeout bounds greeting, STARTTLS, ID and LOGIN together.
	LoginTimeout time.Duration
	LoginMethod  string // "auto", "login" or "plain"
	ForwardID    bool
	// CheckTimeout bounds the NOOP/UNSELECT round trips and LOGOUT.
	CheckTimeout time.Duration
}

func (d *Dialer) timeout() time.Duration      { return orDur(d.Timeout, 5*time.Second) }
func (d *Dialer) loginTimeout() time.Duration { return orDur(d.LoginTimeout, 30*time.Second) }
func (d *Dialer) checkTimeout() time.Duration { return orDur(d.CheckTimeout, 5*time.Second) }

func orDur(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// dial connects to b, retrying as configured, and reads the greeting.
func (d *Dialer) dial(ctx context.Context, b backend.Backend) (*upstream, error) {
	var err error
	for attempt := 0; attempt <= d.Retries; attempt++ {
		if attempt > 0 && d.RetryDelay > 0 {
			t := time.NewTimer(d.RetryDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
		}
		var u *upstream
		u, err = d.dialOnce(ctx, b)
		if err == nil {
			return u, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}

func (d *Dialer) dialOnce(ctx context.Context, b backend.Backend) (*upstream, error) {
	nd := net.Dialer{Timeout: d.timeout(), KeepAlive: d.KeepAlive}
	c, err := nd.DialContext(ctx, "tcp", b.Addr)
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	u := &upstream{backend: b.ID, conn: c, raw: c, checkLimit: d.checkTimeout(), tagPrefix: newTagPrefix()}
	// The greeting and TLS have a deadline; Close cuts them too.
	stop := onCancel(ctx, func() { c.Close() })
	defer stop()
	c.SetDeadline(time.Now().Add(d.loginTimeout()))
	mode := b.TLS.Or(d.TLS)
	if mode == backend.TLSImplicit {
		if err := u.startTLS(ctx, d.tlsConfig(b)); err != nil {
			c.Close()
			return nil, err
		}
	}
	u.r = imapwire.NewReader(u.conn, 0)
	u.w = imapwire.NewWriter(upDst{u})
	if err := u.readGreeting(); err != nil {
		c.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if mode == backend.TLSStartTLS {
		if err := u.doStartTLS(ctx, d.tlsConfig(b)); err != nil {
			c.Close()
			return nil, err
		}
	}
	if u.preCaps == nil {
		caps, err := u.capability()
		if err != nil {
			c.Close()
			return nil, err
		}
		u.preCaps = caps
	}
	return u, nil
}

func (d *Dialer) tlsConfig(b backend.Backend) *tls.Config {
	var cfg *tls.Config
	if d.TLSConfig != nil {
		cfg = d.TLSConfig.Clone()
	} else {
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(b.Addr)
		if err != nil {
			host = b.Addr
		}
		cfg.ServerName = host
	}
	return cfg
}

func (u *upstream) startTLS(ctx context.Context, cfg *tls.Config) error {
	tc := tls.Client(u.raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	u.conn = tc
	return nil
}

func (u *upstream) doStartTLS(ctx context.Context, cfg *tls.Config) error {
	if !hasCap(u.preCaps, "STARTTLS") {
		caps, err := u.capability()
		if err != nil {
			return err
		}
		if !hasCap(caps, "STARTTLS") {
			return errNoStartTLS
		}
	}
	tag := u.nextTag()
	fmt.Fprintf(u.w, "%s STARTTLS\r\n", tag)
	if err := u.w.Flush(); err != nil {
		return err
	}
	status, _, err := u.readTagged(tag, nil)
	if err != nil {
		return err
	}
	if status != "OK" {
		return fmt.Errorf("STARTTLS refused: %s", status)
	}
	if u.r.Buffered() > 0 {
		// Anything sent before the handshake could be injected by a
		// man in the middle.
		return fmt.Errorf("starttls: %w", errStaleData)
	}
	if err := u.startTLS(ctx, cfg); err != nil {
		return err
	}
	u.r.Reset(u.conn)
	u.w.Reset(upDst{u})
	// Capabilities from before TLS are not to be trusted (RFC 3501 6.2.1).
	u.preCaps = nil
	return nil
}

func (u *upstream) readGreeting() error {
	line, lit, err := u.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil {
		return errUnexpected
	}
	l := imapwire.TrimEOL(line)
	switch {
	case hasPrefixFold(l, "* OK"):
		u.preCaps = parseCapCode(l)
		return nil
	case hasPrefixFold(l, "* PREAUTH"):
		return errPreauth
	case hasPrefixFold(l, "* BYE"):
		return fmt.Errorf("%w: %s", errBackendBye, l)
	}
	return errUnexpected
}

// capability sends CAPABILITY and returns the list.
func (u *upstream) capability() ([]string, error) {
	tag := u.nextTag()
	fmt.Fprintf(u.w, "%s CAPABILITY\r\n", tag)
	if err := u.w.Flush(); err != nil {
		return nil, err
	}
	var caps []string
	status, text, err := u.readTagged(tag, func(l []byte) { caps = append(caps, parseCapLine(l)...) })
	if err != nil {
		return nil, err
	}
	if status != "OK" {
		return nil, fmt.Errorf("CAPABILITY: %s %s", status, text)
	}
	return caps, nil
}

// readTagged reads responses up to the tagged one for tag, passing each
// untagged line (without literals, which are skipped) to untagged.
func (u *upstream) readTagged(tag string, untagged func([]byte)) (status string, text []byte, err error) {
	for {
		line, lit, err := u.r.ReadLine()
		if err != nil {
			return "", nil, err
		}
		l := imapwire.TrimEOL(line)
		if t, rest, ok := imapwire.CutTag(l); ok && string(t) == tag {
			st, text := imapwire.CutAtom(rest)
			return strings.ToUpper(string(st)), bytes.Clone(bytes.TrimPrefix(text, []byte(" "))), nil
		}
		if hasPrefixFold(l, "* BYE") {
			return "", nil, fmt.Errorf("%w: %s", errBackendBye, l)
		}
		if untagged != nil && lit == nil {
			untagged(l)
		}
		for lit != nil {
			if err := u.r.DiscardLiteral(lit.Size); err != nil {
				return "", nil, err
			}
			if _, lit, err = u.r.ReadLine(); err != nil {
				return "", nil, err
			}
		}
	}
}

// loginResult is the backend's answer to a login.
type loginResult struct {
	ok     bool
	status string // OK, NO or BAD
	text   []byte // response text after the status, e.g. "[AUTHENTICATIONFAILED] ..."
}

type credentials struct {
	user    []byte
	authzid []byte
	pass    []byte
}

// login sends ID (when idParams is not nil) and LOGIN or AUTHENTICATE
// PLAIN, pipelined in one write where the protocol allows.
func (u *upstream) login(d *Dialer, cr *credentials, idParams []byte) (loginResult, error) {
	deadline := time.Now().Add(d.loginTimeout())
	u.conn.SetDeadline(deadline)
	defer u.conn.SetDeadline(time.Time{})

	var idTag string
	buf := make([]byte, 0, 512)
	if idParams != nil {
		idTag = u.nextTag()
		buf = append(buf, idTag...)
		buf = append(buf, " ID "...)
		buf = append(buf, idParams...)
		buf = append(buf, "\r\n"...)
	}
	tag := u.nextTag()
	method := d.LoginMethod
	if method == "" || method == "auto" {
		method = "login"
		if hasCap(u.preCaps, "AUTH=PLAIN") {
			method = "plain"
		}
	}
	if len(cr.authzid) > 0 {
		// Only SASL can carry an authorization identity.
		method = "plain"
	}
	// wantCont is set when the rest of the command (in rest) must wait
	// for a continuation request.
	var rest []byte
	switch method {
	case "plain":
		ir := plainResponse(cr)
		buf = append(buf, tag...)
		buf = append(buf, " AUTHENTICATE PLAIN"...)
		if hasCap(u.preCaps, "SASL-IR") {
			buf = append(buf, ' ')
			buf = append(buf, ir...)
			buf = append(buf, "\r\n"...)
		} else {
			buf = append(buf, "\r\n"...)
			rest = append(ir, "\r\n"...)
		}
	default:
		buf = append(buf, tag...)
		buf = append(buf, " LOGIN "...)
		var ok bool
		if buf, ok = imapwire.AppendAString(buf, cr.user); !ok {
			return loginResult{status: "NO", text: []byte("[CANNOT] User name not supported")}, nil
		}
		buf = append(buf, ' ')
		if nb, ok := imapwire.AppendAString(buf, cr.pass); ok {
			buf = append(nb, "\r\n"...)
		} else if hasCap(u.preCaps, "LITERAL+") {
			buf = strconv.AppendInt(append(buf, '{'), int64(len(cr.pass)), 10)
			buf = append(buf, "+}\r\n"...)
			buf = append(buf, cr.pass...)
			buf = append(buf, "\r\n"...)
		} else {
			buf = strconv.AppendInt(append(buf, '{'), int64(len(cr.pass)), 10)
			buf = append(buf, "}\r\n"...)
			rest = append(append([]byte(nil), cr.pass...), "\r\n"...)
		}
	}
	_, err := u.w.Write(buf)
	clear(buf)
	if err == nil {
		err = u.w.Flush()
	}
	if err != nil {
		clear(rest)
		return loginResult{}, err
	}
	if idTag != "" {
		if _, _, err := u.readTagged(idTag, nil); err != nil {
			clear(rest)
			return loginResult{}, err
		}
	}
	if rest != nil {
		err := u.awaitContinuation()
		if err == nil {
			_, err = u.w.Write(rest)
		}
		clear(rest)
		if err == nil {
			err = u.w.Flush()
		}
		if err != nil {
			return loginResult{}, err
		}
	}
	var caps []string
	status, text, err := u.readTagged(tag, func(l []byte) {
		if c := parseCapLine(l); c != nil {
			caps = c
		}
	})
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return loginResult{}, errLoginTimeout
		}
		return loginResult{}, err
	}
	if status != "OK" {
		return loginResult{status: status, text: text}, nil
	}
	if c := parseCapCode(text); c != nil {
		caps = c
	}
	if caps == nil {
		if caps, err = u.capability(); err != nil {
			return loginResult{}, err
		}
	}
	u.postCaps = caps
	u.born = time.Now()
	return loginResult{ok: true, status: status, text: text}, nil
}

// awaitContinuation reads up to a "+" continuation request.
func (u *upstream) awaitContinuation() error {
	line, lit, err := u.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil || len(line) == 0 || line[0] != '+' {
		return errUnexpected
	}
	return nil
}

// plainResponse is the base64 SASL PLAIN initial response.
func plainResponse(cr *credentials) []byte {
	raw := make([]byte, 0, len(cr.authzid)+len(cr.user)+len(cr.pass)+2)
	raw = append(raw, cr.authzid...)
	raw = append(raw, 0)
	raw = append(raw, cr.user...)
	raw = append(raw, 0)
	raw = append(raw, cr.pass...)
	out := make([]byte, base64.StdEncoding.EncodedLen(len(raw)))
	base64.StdEncoding.Encode(out, raw)
	clear(raw)
	return out
}

// Check proves the connection alive and at a command boundary: nothing may
// be waiting in the buffer, and a NOOP must be answered by exactly its
// tagged OK. Any other byte means the stream holds something this session
// did not ask for, and the connection must not be used.
func (u *upstream) Check(ctx context.Context) error {
	if u.r.Buffered() > 0 {
		return errStaleData
	}
	deadline := time.Now().Add(u.checkLimit)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	u.conn.SetDeadline(deadline)
	defer u.conn.SetDeadline(time.Time{})
	u.writeTimeout = time.Until(deadline)
	stop := onCancel(ctx, u.Abort)
	err := u.roundTrip("NOOP")
	if !stop() && err == nil {
		err = ctx.Err()
	}
	return err
}

// roundTrip sends one command of the proxy's own and requires its tagged
// OK as the very next line.
func (u *upstream) roundTrip(cmd string) error {
	tag := u.nextTag()
	u.w.WriteString(tag)
	u.w.WriteString(" ")
	u.w.WriteString(cmd)
	u.w.WriteString("\r\n")
	if err := u.w.Flush(); err != nil {
		return err
	}
	line, lit, err := u.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil {
		return errUnexpected
	}
	t, rest, ok := imapwire.CutTag(line)
	if !ok || string(t) != tag {
		return fmt.Errorf("%w: %q", errUnexpected, truncate(line, 64))
	}
	if st, _ := imapwire.CutAtom(rest); !strings.EqualFold(string(st), "OK") {
		return fmt.Errorf("%w: %s", errUnexpected, st)
	}
	if u.r.Buffered() > 0 {
		return errStaleData
	}
	return nil
}

// Close logs out, waiting a bounded time for the server's answer, and
// closes the connection.
func (u *upstream) Close() error {
	u.writeTimeout = u.checkLimit
	u.conn.SetDeadline(time.Now().Add(u.checkLimit))
	tag := u.nextTag()
	u.w.WriteString(tag + " LOGOUT\r\n")
	if u.w.Flush() == nil {
		// Read until the tagged reply so that the server logs a clean
		// logout rather than a disconnect.
		for i := 0; i < 16; i++ {
			line, lit, err := u.r.ReadLine()
			if err != nil || lit != nil {
				break
			}
			if t, _, ok := imapwire.CutTag(line); ok && string(t) == tag {
				break
			}
		}
	}
	return u.conn.Close()
}

// onCancel calls f when ctx is cancelled (the server's Close), but not
// when its deadline passes: the socket has that deadline too, and a hung
// backend must fail with a timeout, not with a socket closed under it.
func onCancel(ctx context.Context, f func()) (stop func() bool) {
	return context.AfterFunc(ctx, func() {
		if errors.Is(ctx.Err(), context.Canceled) {
			f()
		}
	})
}

// Abort closes the connection without a LOGOUT, at once: the socket
// itself, not TLS, whose close would first try to send an alert to a
// backend that may not read. The pool uses it for a cached connection
// that failed its check or whose LOGOUT hangs; it is safe while Close
// runs on another goroutine, whose wait it ends.
func (u *upstream) Abort() { u.raw.Close() }

func hasPrefixFold(b []byte, p string) bool {
	return len(b) >= len(p) && strings.EqualFold(string(b[:len(p)]), p)
}

func truncate(b []byte, n int) []byte {
	b = imapwire.TrimEOL(b)
	if len(b) > n {
		return b[:n]
	}
	return b
}
