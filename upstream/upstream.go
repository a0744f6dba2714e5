// Package upstream is the IMAP client side of the proxy: it dials a
// backend (TLS, STARTTLS), reads its greeting and capabilities, logs in by
// LOGIN or AUTHENTICATE PLAIN, proves a cached connection alive before
// reuse, and logs out within a bound.
//
// A Conn is owned by one party at a time: the session that dialled or
// took it, or, while cached, the pool (it satisfies pool.Conn). Once
// logged in, the session's relay reads and writes the backend through
// Reader and Writer directly; upstream never reads behind its back.
package upstream

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/imapwire"
)

// Errors a backend's behaviour produces; the proxy maps them to replies.
var (
	// ErrBye means the backend said BYE.
	ErrBye = errors.New("upstream: backend said BYE")
	// ErrUnexpected means the backend answered what the protocol does
	// not allow at that point.
	ErrUnexpected = errors.New("upstream: unexpected backend response")
	// ErrPreauth means the backend greeted with PREAUTH: a connection
	// logged in as nobody knows whom is of no use to the proxy.
	ErrPreauth = errors.New("upstream: backend greeted with PREAUTH")
	// ErrNoStartTLS means STARTTLS was required and not offered.
	ErrNoStartTLS = errors.New("upstream: backend does not offer STARTTLS")
	// ErrStaleData means bytes were waiting that nobody asked for: the
	// stream is not at a command boundary, or something was injected.
	ErrStaleData = errors.New("upstream: unread data on cached connection")
	// ErrLoginTimeout means the backend did not answer a login in time.
	ErrLoginTimeout = errors.New("upstream: backend login timed out")
)

// Dialer opens and logs in upstream connections. Its zero value works;
// zero durations take defaults.
type Dialer struct {
	Timeout    time.Duration // per dial attempt; default 5s
	Retries    int           // extra attempts after a failed dial
	RetryDelay time.Duration
	KeepAlive  time.Duration
	TLS        backend.TLSMode // default TLS mode
	TLSConfig  *tls.Config     // base config; ServerName is set per backend when empty
	// LoginTimeout bounds greeting, STARTTLS, ID and LOGIN together;
	// default 30s.
	LoginTimeout time.Duration
	LoginMethod  string // "auto" (or ""), "login" or "plain"
	// ForwardID says the proxy sends the client's ID to the backend.
	// Dial and Login do not look at it: the caller passes the ID.
	ForwardID bool
	// CheckTimeout bounds the NOOP/UNSELECT round trips and LOGOUT;
	// default 5s.
	CheckTimeout time.Duration
}

func (d *Dialer) timeout() time.Duration      { return orDur(d.Timeout, 5*time.Second) }
func (d *Dialer) checkTimeout() time.Duration { return orDur(d.CheckTimeout, 5*time.Second) }

// LoginLimit is how long a login may take from dial to tagged answer:
// LoginTimeout, or its default.
func (d *Dialer) LoginLimit() time.Duration { return orDur(d.LoginTimeout, 30*time.Second) }

func orDur(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// Conn is a connection to a backend. Its owner is the session using it
// or, while cached, the pool.
type Conn struct {
	backend string
	d       *Dialer
	conn    net.Conn
	raw     net.Conn // the TCP conn under TLS, or conn
	r       *imapwire.Reader
	w       *imapwire.Writer

	preCaps  []string // from the greeting (or CAPABILITY before login)
	postCaps []string // after login
	born     time.Time

	tags       atomic.Uint64
	tagPrefix  string // see NextTag
	checkLimit time.Duration
	// writeTimeout, once a session relays on the connection, bounds each
	// write to the backend (see dst); before, the login's deadline does.
	writeTimeout time.Duration
}

// Reader reads the backend's responses. The session owning the
// connection reads through it directly.
func (c *Conn) Reader() *imapwire.Reader { return c.r }

// Writer buffers commands to the backend; each write to the socket gets
// the write timeout (SetWriteTimeout).
func (c *Conn) Writer() *imapwire.Writer { return c.w }

// NetConn is the connection the Reader and Writer use (TLS, when the
// backend speaks it): for read deadlines and bulk copies.
func (c *Conn) NetConn() net.Conn { return c.conn }

// Direct writes to the backend around the Writer's buffer (a literal
// copied from the client), each write under the write timeout as the
// Writer's are.
func (c *Conn) Direct() io.Writer { return dst{c} }

// BackendID is the ID of the backend the connection goes to.
func (c *Conn) BackendID() string { return c.backend }

// PreCaps are the backend's capabilities before login.
func (c *Conn) PreCaps() []string { return c.preCaps }

// PostCaps are the backend's capabilities after login.
func (c *Conn) PostCaps() []string { return c.postCaps }

// Born is when the login succeeded.
func (c *Conn) Born() time.Time { return c.born }

// SetWriteTimeout bounds each write to the backend from now on. Only the
// connection's owner calls it, between writes.
func (c *Conn) SetWriteTimeout(d time.Duration) { c.writeTimeout = d }

// dst is the backend's socket as the Writer sees it: each write gets a
// fresh deadline, whether Flush makes it or the Writer does on its own
// when a long command line or a pipelined burst fills its buffer. A
// deadline set once per flush would be stale for the second kind after a
// quiet spell, and the session would fail at once.
type dst struct{ c *Conn }

func (d dst) Write(p []byte) (int, error) {
	if t := d.c.writeTimeout; t > 0 {
		d.c.conn.SetWriteDeadline(time.Now().Add(t))
	}
	return d.c.conn.Write(p)
}

// NextTag returns a tag for the proxy's own commands. They are sent only
// when no client command is outstanding, and they begin with a secret
// drawn for the connection (TagPrefix): a client that made the backend
// run a command the relay never saw cannot have it answer with the
// proxy's tag, and so cannot forge the answer to the clean-up that
// decides whether the connection is cached.
func (c *Conn) NextTag() string {
	return c.tagPrefix + strconv.FormatUint(c.tags.Add(1), 10)
}

// TagPrefix is the secret that begins the proxy's own tags.
func (c *Conn) TagPrefix() string { return c.tagPrefix }

// newTagPrefix draws the secret part of a connection's own tags.
func newTagPrefix() string {
	var b [8]byte
	rand.Read(b[:])
	return "IMAPPROXY" + hex.EncodeToString(b[:]) + "."
}

// Dial connects to b, retrying as configured, and reads the greeting and
// the pre-login capabilities. Cancelling ctx cuts the dial, TLS and
// greeting; its deadline bounds only the dial, the login timeout the rest.
// The caller owns the Conn.
func (d *Dialer) Dial(ctx context.Context, b backend.Backend) (*Conn, error) {
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
		var c *Conn
		c, err = d.dialOnce(ctx, b)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}

func (d *Dialer) dialOnce(ctx context.Context, b backend.Backend) (*Conn, error) {
	nd := net.Dialer{Timeout: d.timeout(), KeepAlive: d.KeepAlive}
	nc, err := nd.DialContext(ctx, "tcp", b.Addr)
	if err != nil {
		return nil, err
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	c, err := d.open(ctx, nc, b)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// open runs the protocol's beginning on nc: TLS as the backend wants it,
// the greeting, and CAPABILITY if the greeting had none. The caller closes
// nc on failure.
func (d *Dialer) open(ctx context.Context, nc net.Conn, b backend.Backend) (*Conn, error) {
	c := &Conn{backend: b.ID, d: d, conn: nc, raw: nc, checkLimit: d.checkTimeout(), tagPrefix: newTagPrefix()}
	// The greeting and TLS have a deadline; cancelling ctx cuts them too.
	stop := onCancel(ctx, func() { nc.Close() })
	defer stop()
	nc.SetDeadline(time.Now().Add(d.LoginLimit()))
	mode := b.TLS.Or(d.TLS)
	if mode == backend.TLSImplicit {
		if err := c.startTLS(ctx, d.tlsConfig(b)); err != nil {
			return nil, err
		}
	}
	c.r = imapwire.NewReader(c.conn, 0)
	c.w = imapwire.NewWriter(dst{c})
	if err := c.readGreeting(); err != nil {
		return nil, fmt.Errorf("greeting: %w", err)
	}
	if mode == backend.TLSStartTLS {
		if err := c.doStartTLS(ctx, d.tlsConfig(b)); err != nil {
			return nil, err
		}
	}
	if c.preCaps == nil {
		caps, err := c.capability()
		if err != nil {
			return nil, err
		}
		c.preCaps = caps
	}
	return c, nil
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

func (c *Conn) startTLS(ctx context.Context, cfg *tls.Config) error {
	tc := tls.Client(c.raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	c.conn = tc
	return nil
}

func (c *Conn) doStartTLS(ctx context.Context, cfg *tls.Config) error {
	if !HasCap(c.preCaps, "STARTTLS") {
		caps, err := c.capability()
		if err != nil {
			return err
		}
		if !HasCap(caps, "STARTTLS") {
			return ErrNoStartTLS
		}
	}
	tag := c.NextTag()
	if err := c.command(tag, "STARTTLS"); err != nil {
		return err
	}
	status, _, err := c.readTagged(tag, nil)
	if err != nil {
		return err
	}
	if status != "OK" {
		return fmt.Errorf("STARTTLS refused: %s", status)
	}
	if c.r.Buffered() > 0 {
		// Anything sent before the handshake could be injected by a
		// man in the middle.
		return fmt.Errorf("starttls: %w", ErrStaleData)
	}
	if err := c.startTLS(ctx, cfg); err != nil {
		return err
	}
	c.r.Reset(c.conn)
	c.w.Reset(dst{c})
	// Capabilities from before TLS are not to be trusted (RFC 3501 6.2.1).
	c.preCaps = nil
	return nil
}

func (c *Conn) readGreeting() error {
	line, lit, err := c.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil {
		return ErrUnexpected
	}
	l := imapwire.TrimEOL(line)
	switch {
	case hasPrefixFold(l, "* OK"):
		c.preCaps = ParseCapCode(l)
		return nil
	case hasPrefixFold(l, "* PREAUTH"):
		return ErrPreauth
	case hasPrefixFold(l, "* BYE"):
		return fmt.Errorf("%w: %s", ErrBye, l)
	}
	return ErrUnexpected
}

// capability sends CAPABILITY and returns the list.
func (c *Conn) capability() ([]string, error) {
	tag := c.NextTag()
	if err := c.command(tag, "CAPABILITY"); err != nil {
		return nil, err
	}
	var caps []string
	status, text, err := c.readTagged(tag, func(l []byte) { caps = append(caps, ParseCapLine(l)...) })
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
func (c *Conn) readTagged(tag string, untagged func([]byte)) (status string, text []byte, err error) {
	for {
		line, lit, err := c.r.ReadLine()
		if err != nil {
			return "", nil, err
		}
		l := imapwire.TrimEOL(line)
		if t, rest, ok := imapwire.CutTag(l); ok && string(t) == tag {
			st, text := imapwire.CutAtom(rest)
			return strings.ToUpper(string(st)), bytes.Clone(bytes.TrimPrefix(text, []byte(" "))), nil
		}
		if hasPrefixFold(l, "* BYE") {
			return "", nil, fmt.Errorf("%w: %s", ErrBye, l)
		}
		if untagged != nil && lit == nil {
			untagged(l)
		}
		for lit != nil {
			if err := c.r.DiscardLiteral(lit.Size); err != nil {
				return "", nil, err
			}
			if _, lit, err = c.r.ReadLine(); err != nil {
				return "", nil, err
			}
		}
	}
}

// Check proves the connection alive and at a command boundary: nothing may
// be waiting in the buffer, and a NOOP must be answered by exactly its
// tagged OK. Any other byte means the stream holds something this session
// did not ask for, and the connection must not be used.
func (c *Conn) Check(ctx context.Context) error {
	if c.r.Buffered() > 0 {
		return ErrStaleData
	}
	deadline := time.Now().Add(c.checkLimit)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.conn.SetDeadline(deadline)
	defer c.conn.SetDeadline(time.Time{})
	c.writeTimeout = time.Until(deadline)
	stop := onCancel(ctx, c.Abort)
	err := c.roundTrip("NOOP")
	if !stop() && err == nil {
		err = ctx.Err()
	}
	return err
}

// roundTrip sends one command of the proxy's own and requires its tagged
// OK as the very next line.
func (c *Conn) roundTrip(cmd string) error {
	tag := c.NextTag()
	if err := c.command(tag, cmd); err != nil {
		return err
	}
	line, lit, err := c.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil {
		return ErrUnexpected
	}
	t, rest, ok := imapwire.CutTag(line)
	if !ok || string(t) != tag {
		return fmt.Errorf("%w: %q", ErrUnexpected, truncate(line, 64))
	}
	if st, _ := imapwire.CutAtom(rest); !strings.EqualFold(string(st), "OK") {
		return fmt.Errorf("%w: %s", ErrUnexpected, st)
	}
	if c.r.Buffered() > 0 {
		return ErrStaleData
	}
	return nil
}

// CleanupCommand returns the command that brings a logged-in connection
// back to the state of a fresh login, and the status its answer must have
// when selected says whether the session left a mailbox selected. It
// leaves the mailbox without expunging (never CLOSE), so the next session
// starts unselected as on a fresh login, whatever the relay believes: a
// command it could not see may have selected one. The answer also checks
// the belief: UNSELECT is refused (BAD) when no mailbox is selected, and
// one that disagrees is not to be cached.
func (c *Conn) CleanupCommand(selected bool) (cmd, want string) {
	cmd, want = "UNSELECT", "BAD"
	switch {
	case !HasCap(c.postCaps, "UNSELECT"):
		// A failed EXAMINE leaves no mailbox selected (RFC 3501 6.3.1).
		cmd, want = "EXAMINE \"imapproxy/\\\"nonexistent\\\"/"+c.NextTag()+"\"", "NO"
	case selected:
		want = "OK"
	}
	return cmd, want
}

// WriteCommand buffers one command of the proxy's own under tag (from
// NextTag) and gives the socket the check timeout, both ways, for it and
// its answer. The caller flushes the Writer, reads the answer, and then
// clears the deadline.
func (c *Conn) WriteCommand(tag, cmd string) {
	c.writeTimeout = c.checkLimit
	c.conn.SetDeadline(time.Now().Add(c.checkLimit))
	c.writeLine(tag, cmd)
}

// Close logs out, waiting a bounded time for the server's answer, and
// closes the connection.
func (c *Conn) Close() error {
	c.writeTimeout = c.checkLimit
	c.conn.SetDeadline(time.Now().Add(c.checkLimit))
	tag := c.NextTag()
	if c.command(tag, "LOGOUT") == nil {
		// Read until the tagged reply so that the server logs a clean
		// logout rather than a disconnect.
		for i := 0; i < 16; i++ {
			line, lit, err := c.r.ReadLine()
			if err != nil || lit != nil {
				break
			}
			if t, _, ok := imapwire.CutTag(line); ok && string(t) == tag {
				break
			}
		}
	}
	return c.conn.Close()
}

// Abort closes the connection without a LOGOUT, at once: the socket
// itself, not TLS, whose close would first try to send an alert to a
// backend that may not read. The pool uses it for a cached connection
// that failed its check or whose LOGOUT hangs; it is safe while Close
// runs on another goroutine, whose wait it ends.
func (c *Conn) Abort() { c.raw.Close() }

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
