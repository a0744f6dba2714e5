package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// testClient is a minimal IMAP client for tests: it sends commands and
// collects every response line up to the tagged one, reading literals.
type testClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	n    int
	// Greeting is the first line the server sent.
	Greeting string
}

func dialClient(t testing.TB, addr string) *testClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	tc := newTestClient(t, c)
	tc.Greeting = tc.readLine()
	return tc
}

func newTestClient(t testing.TB, c net.Conn) *testClient {
	c.SetDeadline(time.Now().Add(30 * time.Second))
	tc := &testClient{t: t, conn: c, r: bufio.NewReader(c)}
	t.Cleanup(func() { c.Close() })
	return tc
}

func (c *testClient) startTLS(cfg *tls.Config) {
	c.t.Helper()
	res := c.cmd("STARTTLS")
	if !res.ok() {
		c.t.Fatalf("STARTTLS: %s", res.Tagged)
	}
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatalf("tls handshake: %v", err)
	}
	c.conn = tc
	c.r = bufio.NewReader(tc)
}

func (c *testClient) readLine() string {
	c.t.Helper()
	l, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read: %v (partial %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// response is everything the server answered to one command.
type response struct {
	Untagged []string // lines, literals inlined as {n}<data>
	Tagged   string
}

func (r response) ok() bool { return strings.Contains(r.Tagged, " OK") }

func (r response) has(sub string) bool {
	for _, l := range r.Untagged {
		if strings.Contains(l, sub) {
			return true
		}
	}
	return strings.Contains(r.Tagged, sub)
}

func (r response) String() string {
	return strings.Join(append(append([]string(nil), r.Untagged...), r.Tagged), "\n")
}

func (c *testClient) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) nextTag() string {
	c.n++
	return "t" + strconv.Itoa(c.n)
}

// cmd sends "TAG format" and reads up to the tagged response.
func (c *testClient) cmd(format string, a ...any) response {
	c.t.Helper()
	tag := c.nextTag()
	c.send(tag + " " + fmt.Sprintf(format, a...) + "\r\n")
	return c.readResponse(tag)
}

func (c *testClient) readResponse(tag string) response {
	c.t.Helper()
	var res response
	for {
		l := c.readFull()
		if strings.HasPrefix(l, tag+" ") {
			res.Tagged = l
			return res
		}
		res.Untagged = append(res.Untagged, l)
	}
}

// readFull reads one response line with its literals inlined.
func (c *testClient) readFull() string {
	c.t.Helper()
	var b strings.Builder
	for {
		l := c.readLine()
		b.WriteString(l)
		n, ok := literalSize(l)
		if !ok {
			return b.String()
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			c.t.Fatalf("read literal: %v", err)
		}
		b.Write(buf)
	}
}

func literalSize(l string) (int, bool) {
	if !strings.HasSuffix(l, "}") {
		return 0, false
	}
	i := strings.LastIndexByte(l, '{')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.Atoi(strings.TrimSuffix(l[i+1:len(l)-1], "+"))
	return n, err == nil
}

func (c *testClient) login(user, pass string) response {
	c.t.Helper()
	return c.cmd("LOGIN %s %s", quote(user), quote(pass))
}

func (c *testClient) mustLogin(user, pass string) response {
	c.t.Helper()
	res := c.login(user, pass)
	if !res.ok() {
		c.t.Fatalf("LOGIN %s: %s", user, res)
	}
	return res
}

func (c *testClient) logout() {
	c.t.Helper()
	res := c.cmd("LOGOUT")
	if !res.ok() || !res.has("* BYE") {
		c.t.Fatalf("LOGOUT: %s", res)
	}
	// The server closes after the tagged OK.
	if _, err := c.r.ReadByte(); err != io.EOF {
		c.t.Fatalf("after LOGOUT: got %v, want EOF", err)
	}
	c.conn.Close()
}

func quote(s string) string {
	var b bytes.Buffer
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

// readToEOF reads the lines the server sends until it closes the
// connection.
func (c *testClient) readToEOF() []string {
	c.t.Helper()
	var lines []string
	for {
		l, err := c.r.ReadString('\n')
		if l != "" {
			lines = append(lines, strings.TrimRight(l, "\r\n"))
		}
		if err == io.EOF {
			return lines
		}
		if err != nil {
			c.t.Fatalf("read until EOF: %v (so far %q)", err, lines)
		}
	}
}

// expectContinuation reads one line and fails unless it is a "+"
// continuation request; it returns the line.
func (c *testClient) expectContinuation() string {
	c.t.Helper()
	l := c.readLine()
	if !strings.HasPrefix(l, "+") {
		c.t.Fatalf("got %q, want a continuation request", l)
	}
	return l
}

// loginLiteral sends LOGIN with user name and password as literals:
// synchronising ({n}, waiting for each "+") or non-synchronising ({n+},
// all in one write).
func (c *testClient) loginLiteral(user, pass string, nonSync bool) response {
	c.t.Helper()
	tag := c.nextTag()
	if nonSync {
		c.send(fmt.Sprintf("%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n", tag, len(user), user, len(pass), pass))
		return c.readResponse(tag)
	}
	c.send(fmt.Sprintf("%s LOGIN {%d}\r\n", tag, len(user)))
	c.expectContinuation()
	c.send(fmt.Sprintf("%s {%d}\r\n", user, len(pass)))
	c.expectContinuation()
	c.send(pass + "\r\n")
	return c.readResponse(tag)
}
