package testkit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// DefaultTimeout bounds each read and each write of a Conn whose Timeout
// is zero: long enough for a loaded CI machine, short enough that a hung
// test says so before the test binary's own timeout.
const DefaultTimeout = 30 * time.Second

// dialTimeout bounds the TCP connect of DialConn and Dial.
const dialTimeout = 5 * time.Second

// Conn is a small IMAP client for tests: it sends tagged commands and
// reads every response line up to the tagged one, literals inlined. Its
// methods return errors, so that it can run on goroutines other than the
// test's; Client is the same with every error failing the test.
//
// Every read and every write has a deadline: Timeout from its start, or
// the deadline given to SetDeadline or SetReadDeadline, which holds until
// it is changed, as on a net.Conn. A deadline per read rather than per
// connection makes a long answer that keeps coming progress, and silence
// a failure.
//
// A test may read R and write NetConn directly, to send what a client
// should not or to look at raw bytes. Reads through R keep the deadlines;
// a deadline must be set on the Conn, not on NetConn, since the next read
// through R replaces NetConn's.
type Conn struct {
	// NetConn is the connection to the server: after StartTLS, the
	// *tls.Conn over the first one.
	NetConn net.Conn
	// R buffers what the server sent. A test may replace it with a
	// reader over it, a bigger buffer say.
	R *bufio.Reader
	// Greeting is the server's first line, when DialConn or Dial read it.
	Greeting string
	// Timeout bounds each read and each write; zero means DefaultTimeout.
	Timeout time.Duration

	n       int       // the number in the last tag
	readBy  time.Time // fixed read deadline; zero: Timeout per read
	writeBy time.Time // fixed write deadline; zero: Timeout per write
}

// NewConn returns a Conn over nc, which it owns from now on; it reads
// nothing yet, so the greeting (if any) is the first line ReadLine gets.
func NewConn(nc net.Conn) *Conn {
	c := &Conn{NetConn: nc}
	c.R = bufio.NewReader(deadlineReader{c})
	return c
}

// DialConn connects to addr over TCP and reads the greeting into
// Greeting, whatever it says. The caller closes the Conn.
func DialConn(addr string) (*Conn, error) {
	nc, err := net.DialTimeout("tcp", addr, dialTimeout)
	if err != nil {
		return nil, err
	}
	c := NewConn(nc)
	if c.Greeting, err = c.ReadLine(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("greeting: %w", err)
	}
	return c, nil
}

// deadlineReader sets the read deadline before every read of the
// connection, so that R never waits without one.
type deadlineReader struct{ c *Conn }

func (r deadlineReader) Read(p []byte) (int, error) {
	// A connection refuses a deadline only once it is closed (net.Pipe's
	// once its far end is), and then Read says so better: io.EOF.
	r.c.NetConn.SetReadDeadline(r.c.deadline(r.c.readBy))
	return r.c.NetConn.Read(p)
}

// deadline is fixed if set, otherwise Timeout from now.
func (c *Conn) deadline(fixed time.Time) time.Time {
	if !fixed.IsZero() {
		return fixed
	}
	d := c.Timeout
	if d <= 0 {
		d = DefaultTimeout
	}
	return time.Now().Add(d)
}

// SetDeadline fixes the deadline of every read and write until it is
// changed; the zero time goes back to Timeout per read and per write.
func (c *Conn) SetDeadline(t time.Time) error {
	c.readBy, c.writeBy = t, t
	return c.NetConn.SetDeadline(c.deadline(t))
}

// SetReadDeadline fixes the deadline of every read until it is changed;
// the zero time goes back to Timeout per read.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.readBy = t
	return c.NetConn.SetReadDeadline(c.deadline(t))
}

// Close closes the connection.
func (c *Conn) Close() error { return c.NetConn.Close() }

// NextTag returns a fresh tag: t1, t2, ...
func (c *Conn) NextTag() string {
	c.n++
	return "t" + strconv.Itoa(c.n)
}

// Send writes s as it is: the caller adds tags and CRLFs.
func (c *Conn) Send(s string) error {
	c.NetConn.SetWriteDeadline(c.deadline(c.writeBy)) // as in deadlineReader
	if _, err := io.WriteString(c.NetConn, s); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// ReadLine reads one line and returns it without its CRLF. On an error
// it returns what it read of the line, as bufio.Reader.ReadString does.
func (c *Conn) ReadLine() (string, error) {
	l, err := c.R.ReadString('\n')
	if err != nil {
		return l, fmt.Errorf("read: %w (partial %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n"), nil
}

// ReadFull reads one response line with the literals it announces
// inlined: `* 1 FETCH (BODY[] {5}` + "hello" + `)`. On an error it
// returns what it read so far.
func (c *Conn) ReadFull() (string, error) {
	var b strings.Builder
	for {
		l, err := c.ReadLine()
		b.WriteString(l)
		if err != nil {
			return b.String(), err
		}
		n, ok := LiteralSize(l)
		if !ok {
			return b.String(), nil
		}
		buf := make([]byte, n)
		m, err := io.ReadFull(c.R, buf)
		b.Write(buf[:m])
		if err != nil {
			return b.String(), fmt.Errorf("read literal: %w", err)
		}
	}
}

// LiteralSize returns n when line ends in a literal's announcement, {n}
// or {n+}.
func LiteralSize(line string) (int, bool) {
	if !strings.HasSuffix(line, "}") {
		return 0, false
	}
	i := strings.LastIndexByte(line, '{')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSuffix(line[i+1:len(line)-1], "+"))
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// Response is everything a server answered to one command.
type Response struct {
	Untagged []string // the lines before the tagged one, literals inlined
	Tagged   string   // the tagged line, tag included
}

// Status returns the tagged line without its tag: "OK ...", "NO ...".
func (r Response) Status() string {
	_, st, _ := strings.Cut(r.Tagged, " ")
	return st
}

// OK reports whether the tagged status is OK.
func (r Response) OK() bool {
	st := r.Status()
	return st == "OK" || strings.HasPrefix(st, "OK ")
}

// Has reports whether any line, the tagged one included, contains sub.
func (r Response) Has(sub string) bool {
	for _, l := range r.Untagged {
		if strings.Contains(l, sub) {
			return true
		}
	}
	return strings.Contains(r.Tagged, sub)
}

// HasPrefix reports whether an untagged line begins with prefix.
func (r Response) HasPrefix(prefix string) bool {
	for _, l := range r.Untagged {
		if strings.HasPrefix(l, prefix) {
			return true
		}
	}
	return false
}

// String returns the lines, one a line, for failure messages.
func (r Response) String() string {
	return strings.Join(append(append([]string(nil), r.Untagged...), r.Tagged), "\n")
}

// ReadResponse reads lines up to the one tagged tag. On an error it
// returns the lines read so far.
func (c *Conn) ReadResponse(tag string) (Response, error) {
	var res Response
	for {
		l, err := c.ReadFull()
		if err != nil {
			return res, err
		}
		if strings.HasPrefix(l, tag+" ") {
			res.Tagged = l
			return res, nil
		}
		res.Untagged = append(res.Untagged, l)
	}
}

// Cmd sends "TAG format" with a fresh tag and reads up to the tagged reply.
func (c *Conn) Cmd(format string, a ...any) (Response, error) {
	tag := c.NextTag()
	if err := c.Send(tag + " " + fmt.Sprintf(format, a...) + "\r\n"); err != nil {
		return Response{}, err
	}
	return c.ReadResponse(tag)
}

// Login sends LOGIN with user and pass as quoted strings.
func (c *Conn) Login(user, pass string) (Response, error) {
	return c.Cmd("LOGIN %s %s", Quote(user), Quote(pass))
}

// LoginLiteral sends LOGIN with user and pass as literals: synchronising
// ({n}, waiting for the server's "+" before each) or non-synchronising
// ({n+}, all in one write).
func (c *Conn) LoginLiteral(user, pass string, nonSync bool) (Response, error) {
	tag := c.NextTag()
	if nonSync {
		if err := c.Send(fmt.Sprintf("%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n", tag, len(user), user, len(pass), pass)); err != nil {
			return Response{}, err
		}
		return c.ReadResponse(tag)
	}
	steps := []string{
		fmt.Sprintf("%s LOGIN {%d}\r\n", tag, len(user)),
		fmt.Sprintf("%s {%d}\r\n", user, len(pass)),
	}
	for _, s := range steps {
		if err := c.Send(s); err != nil {
			return Response{}, err
		}
		if _, err := c.ExpectContinuation(); err != nil {
			return Response{}, err
		}
	}
	if err := c.Send(pass + "\r\n"); err != nil {
		return Response{}, err
	}
	return c.ReadResponse(tag)
}

// ExpectContinuation reads one line and returns it; it is an error unless
// the line is a "+" continuation request.
func (c *Conn) ExpectContinuation() (string, error) {
	l, err := c.ReadLine()
	if err != nil {
		return l, err
	}
	if !strings.HasPrefix(l, "+") {
		return l, fmt.Errorf("got %q, want a continuation request", l)
	}
	return l, nil
}

// Logout sends LOGOUT, wants a BYE, the tagged OK and then the end of the
// connection, and closes it.
func (c *Conn) Logout() error {
	res, err := c.Cmd("LOGOUT")
	if err != nil {
		return fmt.Errorf("LOGOUT: %w", err)
	}
	if !res.OK() || !res.HasPrefix("* BYE") {
		return fmt.Errorf("LOGOUT: %s", res)
	}
	if _, err := c.R.ReadByte(); err != io.EOF {
		return fmt.Errorf("after LOGOUT: got %v, want EOF", err)
	}
	return c.NetConn.Close()
}

// ReadToEOF reads lines until the server closes the connection and
// returns them, a last one without CRLF included.
func (c *Conn) ReadToEOF() ([]string, error) {
	var lines []string
	for {
		l, err := c.R.ReadString('\n')
		if l != "" {
			lines = append(lines, strings.TrimRight(l, "\r\n"))
		}
		if errors.Is(err, io.EOF) {
			return lines, nil
		}
		if err != nil {
			return lines, fmt.Errorf("read until EOF: %w (so far %q)", err, lines)
		}
	}
}

// StartTLS sends STARTTLS, wants OK, and goes on over TLS with cfg.
func (c *Conn) StartTLS(cfg *tls.Config) error {
	res, err := c.Cmd("STARTTLS")
	if err != nil {
		return fmt.Errorf("STARTTLS: %w", err)
	}
	if !res.OK() {
		return fmt.Errorf("STARTTLS: %s", res.Tagged)
	}
	tc := tls.Client(c.NetConn, cfg)
	if err := tc.SetDeadline(c.deadline(c.readBy)); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("tls handshake: %w", err)
	}
	c.NetConn = tc
	c.R = bufio.NewReader(deadlineReader{c})
	return nil
}

// Quote returns s as an IMAP quoted string.
func Quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}
