package testkit

import (
	"crypto/tls"
	"net"
	"testing"
)

// Client is a Conn that fails its test on any error, for the test's own
// goroutine. Its methods shadow the Conn's of the same name; c.Conn.Cmd
// and the like return the error instead, for a test that expects one.
type Client struct {
	*Conn
	t testing.TB
}

// Dial connects to addr over TCP and reads the greeting into Greeting,
// whatever it says. The connection is closed when the test ends.
func Dial(t testing.TB, addr string) *Client {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, dialTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c := NewClient(t, nc)
	c.Greeting = c.ReadLine()
	return c
}

// NewClient returns a Client over nc, which is closed when the test ends.
// It reads nothing yet.
func NewClient(t testing.TB, nc net.Conn) *Client {
	t.Cleanup(func() { nc.Close() })
	return &Client{Conn: NewConn(nc), t: t}
}

// TB returns the test that c fails, for helpers built on c.
func (c *Client) TB() testing.TB { return c.t }

func (c *Client) check(err error) {
	c.t.Helper()
	if err != nil {
		c.t.Fatal(err)
	}
}

// Send writes s as it is: the caller adds tags and CRLFs.
func (c *Client) Send(s string) {
	c.t.Helper()
	c.check(c.Conn.Send(s))
}

// ReadLine reads one line and returns it without its CRLF.
func (c *Client) ReadLine() string {
	c.t.Helper()
	l, err := c.Conn.ReadLine()
	c.check(err)
	return l
}

// ReadFull reads one response line with its literals inlined.
func (c *Client) ReadFull() string {
	c.t.Helper()
	l, err := c.Conn.ReadFull()
	c.check(err)
	return l
}

// ReadResponse reads lines up to the one tagged tag.
func (c *Client) ReadResponse(tag string) Response {
	c.t.Helper()
	res, err := c.Conn.ReadResponse(tag)
	c.check(err)
	return res
}

// Cmd sends "TAG format" with a fresh tag and reads up to the tagged reply.
func (c *Client) Cmd(format string, a ...any) Response {
	c.t.Helper()
	res, err := c.Conn.Cmd(format, a...)
	c.check(err)
	return res
}

// Login sends LOGIN with user and pass as quoted strings; the answer may
// be a refusal.
func (c *Client) Login(user, pass string) Response {
	c.t.Helper()
	res, err := c.Conn.Login(user, pass)
	c.check(err)
	return res
}

// MustLogin is Login that fails the test unless the answer is OK.
func (c *Client) MustLogin(user, pass string) Response {
	c.t.Helper()
	res := c.Login(user, pass)
	if !res.OK() {
		c.t.Fatalf("LOGIN %s: %s", user, res)
	}
	return res
}

// LoginLiteral sends LOGIN with user and pass as literals, synchronising
// or not (see Conn.LoginLiteral).
func (c *Client) LoginLiteral(user, pass string, nonSync bool) Response {
	c.t.Helper()
	res, err := c.Conn.LoginLiteral(user, pass, nonSync)
	c.check(err)
	return res
}

// ExpectContinuation reads one line, fails the test unless it is a "+"
// continuation request, and returns it.
func (c *Client) ExpectContinuation() string {
	c.t.Helper()
	l, err := c.Conn.ExpectContinuation()
	c.check(err)
	return l
}

// Logout sends LOGOUT, wants a BYE, the tagged OK and then the end of the
// connection, and closes it.
func (c *Client) Logout() {
	c.t.Helper()
	c.check(c.Conn.Logout())
}

// ReadToEOF reads lines until the server closes the connection.
func (c *Client) ReadToEOF() []string {
	c.t.Helper()
	lines, err := c.Conn.ReadToEOF()
	c.check(err)
	return lines
}

// StartTLS sends STARTTLS, wants OK, and goes on over TLS with cfg.
func (c *Client) StartTLS(cfg *tls.Config) {
	c.t.Helper()
	c.check(c.Conn.StartTLS(cfg))
}
