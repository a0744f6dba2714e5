package proxy

// Integration tests of literals relayed after login, in both directions:
// APPEND with synchronising and non-synchronising literals, and large
// FETCH responses, byte for byte.

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// literalOf returns the literal that follows item (e.g. "BODY[]") in a
// response line read by testkit's ReadFull.
func literalOf(t testing.TB, line, item string) []byte {
	t.Helper()
	i := strings.Index(line, item+" {")
	if i < 0 {
		t.Fatalf("no %s literal in %.200q", item, line)
	}
	rest := line[i+len(item)+2:]
	j := strings.IndexByte(rest, '}')
	if j < 0 {
		t.Fatalf("unterminated literal size in %.200q", line)
	}
	n, err := strconv.Atoi(rest[:j])
	if err != nil || j+1+n > len(rest) {
		t.Fatalf("bad literal size %q in %.200q", rest[:j], line)
	}
	return []byte(rest[j+1 : j+1+n])
}

// testMessage is a message with CRLF line endings, so Dovecot stores and
// returns it unchanged. It is larger than one socket read.
func testMessage(subject string, lines int) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: a@example.org\r\nTo: b@example.org\r\nSubject: %s\r\nMessage-ID: <%s@example.org>\r\n\r\n", subject, strings.ReplaceAll(subject, " ", "."))
	for i := 0; i < lines; i++ {
		fmt.Fprintf(&b, "line %05d of %s, with a quote \" and braces {3}\r\n", i, subject)
	}
	return b.Bytes()
}

var appendUIDRE = regexp.MustCompile(`\[APPENDUID \d+ ([0-9:,]+)\]`)

func TestAppendLiterals(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 2})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	cases := []struct {
		name string
		// send appends msg and returns the tagged reply.
		send func(c *testkit.Client, msg []byte) testkit.Response
		n    int // messages appended
	}{
		{"synchronising", func(c *testkit.Client, msg []byte) testkit.Response {
			tag := c.NextTag()
			c.Send(fmt.Sprintf("%s APPEND INBOX (\\Seen) {%d}\r\n", tag, len(msg)))
			c.ExpectContinuation()
			c.Send(string(msg) + "\r\n")
			return c.ReadResponse(tag)
		}, 1},
		{"non-synchronising", func(c *testkit.Client, msg []byte) testkit.Response {
			tag := c.NextTag()
			c.Send(fmt.Sprintf("%s APPEND INBOX {%d+}\r\n%s\r\n", tag, len(msg), msg))
			return c.ReadResponse(tag)
		}, 1},
		{"non-synchronising, pipelined with NOOP", func(c *testkit.Client, msg []byte) testkit.Response {
			tag := c.NextTag()
			noop := c.NextTag()
			c.Send(fmt.Sprintf("%s APPEND INBOX {%d+}\r\n%s\r\n%s NOOP\r\n", tag, len(msg), msg, noop))
			res := c.ReadResponse(tag)
			if n := c.ReadResponse(noop); !n.OK() {
				c.TB().Fatalf("NOOP after APPEND: %s", n)
			}
			return res
		}, 1},
		{"MULTIAPPEND, mixed literals", func(c *testkit.Client, msg []byte) testkit.Response {
			tag := c.NextTag()
			c.Send(fmt.Sprintf("%s APPEND INBOX {%d+}\r\n%s {%d}\r\n", tag, len(msg), msg, len(msg)))
			c.ExpectContinuation()
			c.Send(string(msg) + "\r\n")
			return c.ReadResponse(tag)
		}, 2},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, pass)
			msg := testMessage(fmt.Sprintf("append %d", i), 2000)
			res := tc.send(c, msg)
			m := appendUIDRE.FindStringSubmatch(res.Tagged)
			if !res.OK() || m == nil {
				t.Fatalf("APPEND: got %q, want OK [APPENDUID ...]", res)
			}
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			f := c.Cmd("UID FETCH %s (RFC822.SIZE BODY.PEEK[])", m[1])
			if !f.OK() || len(f.Untagged) != tc.n {
				t.Fatalf("UID FETCH %s: %d messages, want %d: %.300q", m[1], len(f.Untagged), tc.n, f)
			}
			for _, l := range f.Untagged {
				got := literalOf(t, l, "BODY[]")
				if !bytes.Equal(got, msg) {
					t.Fatalf("message read back differs: got %d bytes, want %d\n got %.200q\nwant %.200q", len(got), len(msg), got, msg)
				}
				if !strings.Contains(l, fmt.Sprintf("RFC822.SIZE %d ", len(msg))) {
					t.Errorf("FETCH %.100q: RFC822.SIZE is not %d", l, len(msg))
				}
			}
			c.Logout()
			p.waitCached(t, 1)
		})
	}
}

// TestLiteralRunIntact: one FETCH answered with a run of literals whose
// sizes straddle the 4 KiB of the proxy's buffers, so that a literal's
// first bytes arrive with its line, fill the client buffer to the byte or
// not, and the rest follows in bulk, arrives intact, every literal.
func TestLiteralRunIntact(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, dc.PasswordOf(user))
	if res := c.Cmd("CREATE Run"); !res.OK() {
		t.Fatalf("CREATE: %s", res)
	}
	var msgs [][]byte
	for i, lines := range []int{0, 1, 60, 64, 65, 66, 67, 68, 130, 131, 132, 200, 2} {
		msg := testMessage(fmt.Sprintf("run %d", i), lines)
		tag := c.NextTag()
		c.Send(fmt.Sprintf("%s APPEND Run {%d}\r\n", tag, len(msg)))
		c.ExpectContinuation()
		c.Send(string(msg) + "\r\n")
		if res := c.ReadResponse(tag); !res.OK() {
			t.Fatalf("APPEND of %d bytes: %s", len(msg), res)
		}
		msgs = append(msgs, msg)
	}
	if res := c.Cmd("SELECT Run"); !res.OK() {
		t.Fatalf("SELECT: %s", res)
	}
	f := c.Cmd("FETCH 1:* (BODY.PEEK[])")
	if !f.OK() || len(f.Untagged) != len(msgs) {
		t.Fatalf("FETCH: %d responses, want %d: %.300q", len(f.Untagged), len(msgs), f)
	}
	for i, l := range f.Untagged {
		if got := literalOf(t, l, "BODY[]"); !bytes.Equal(got, msgs[i]) {
			t.Errorf("message %d: got %d bytes, want %d\n got %.120q\nwant %.120q", i+1, len(got), len(msgs[i]), got, msgs[i])
		}
	}
}

// TestBigMessageIntact fetches a 1 MiB message through a fresh and through a
// reused connection and compares it with the file Dovecot stores.
func TestBigMessageIntact(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1, BigMessages: 2})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	files, err := filepath.Glob(filepath.Join(dc.Dir, "mail", user, "Maildir", ".Big", "cur", "*.M000002P1.*"))
	if err != nil || len(files) != 1 {
		t.Fatalf("stored message 2 of Big: %v %v", files, err)
	}
	stored, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.ReplaceAll(stored, []byte("\n"), []byte("\r\n"))
	if len(want) < 1<<20 {
		t.Fatalf("stored message is %d bytes, want at least 1 MiB", len(want))
	}

	for _, round := range []string{"fresh", "reused"} {
		t.Run(round, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			res := c.MustLogin(user, pass)
			if reused := res.Has("[XPROXYREUSE]"); reused != (round == "reused") {
				t.Fatalf("XPROXYREUSE = %v", reused)
			}
			if res := c.Cmd("EXAMINE Big"); !res.OK() || !res.Has("* 2 EXISTS") {
				t.Fatalf("EXAMINE Big: %s", res)
			}
			f := c.Cmd("FETCH 2 (RFC822.SIZE BODY.PEEK[])")
			if !f.OK() || len(f.Untagged) != 1 {
				t.Fatalf("FETCH: %d untagged, %q", len(f.Untagged), f.Tagged)
			}
			line := f.Untagged[0]
			m := regexp.MustCompile(`RFC822\.SIZE (\d+)`).FindStringSubmatch(line)
			if m == nil {
				t.Fatalf("no RFC822.SIZE in %.200q", line)
			}
			size, _ := strconv.Atoi(m[1])
			got := literalOf(t, line, "BODY[]")
			if len(got) != size {
				t.Fatalf("BODY[] is %d bytes, RFC822.SIZE says %d", len(got), size)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("BODY[] (%d bytes) differs from the stored message (%d bytes, CRLF)", len(got), len(want))
			}
			if !strings.HasSuffix(line, ")") {
				t.Fatalf("FETCH response does not end after the literal: %q", line[len(line)-min(len(line), 40):])
			}
			c.Logout()
			p.waitCached(t, 1)
		})
	}
}

// TestAppendRefused appends to a mailbox that does not exist: whether
// Dovecot refuses before or after the literal, the client gets its NO and
// the session, and then the cached connection, stay usable.
func TestAppendRefused(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	msg := testMessage("refused", 10)
	c.Send(fmt.Sprintf("a1 APPEND NoSuchBox {%d}\r\n", len(msg)))
	l := c.ReadFull()
	if strings.HasPrefix(l, "+") {
		c.Send(string(msg) + "\r\n")
		l = c.ReadResponse("a1").Tagged
	}
	if !strings.HasPrefix(l, "a1 NO [TRYCREATE]") {
		t.Fatalf("APPEND to a missing mailbox: got %q, want a1 NO [TRYCREATE]", l)
	}
	if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 1") {
		t.Fatalf("STATUS after the refused APPEND: %s", res)
	}
	c.Logout()
	p.waitCached(t, 1)
	c = testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, pass); !res.Has("[XPROXYREUSE]") {
		t.Fatalf("login after the refused APPEND was not reused:\n%s", res)
	}
	if res := c.Cmd("NOOP"); !res.OK() || len(res.Untagged) != 0 {
		t.Fatalf("NOOP on the reused connection: %s", res)
	}
	c.Logout()
}

// TestLiteralLimits: a client literal over MaxLiteral never reaches
// Dovecot; a synchronising one is refused with NO and the session goes on.
func TestLiteralLimits(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.MaxLiteral = 1000 })

	t.Run("synchronising", func(t *testing.T) {
		user := dovecottest.UserName(1)
		c := testkit.Dial(t, p.addr)
		c.MustLogin(user, dc.PasswordOf(user))
		c.Send("a1 APPEND INBOX {1001}\r\n")
		if l := c.ReadLine(); !strings.HasPrefix(l, "a1 NO [TOOBIG]") {
			t.Fatalf("APPEND of 1001 bytes: got %q, want a1 NO [TOOBIG] and no continuation", l)
		}
		msg := testMessage("small", 5)
		res := c.Cmd("APPEND INBOX {%d+}\r\n%s", len(msg), msg)
		if !res.OK() {
			t.Fatalf("APPEND of %d bytes: %s", len(msg), res)
		}
		if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 2") {
			t.Fatalf("STATUS: got %q, want 2 messages (1 seeded, 1 appended)", res)
		}
		c.Logout()
		p.waitCached(t, 1)
	})
	t.Run("non-synchronising", func(t *testing.T) {
		user := dovecottest.UserName(2)
		c := testkit.Dial(t, p.addr)
		c.MustLogin(user, dc.PasswordOf(user))
		c.Send("a1 APPEND INBOX {1001+}\r\n")
		lines := c.ReadToEOF()
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE [TOOBIG]") {
			t.Fatalf("APPEND of a 1001-byte {n+} literal: got %q, want * BYE [TOOBIG] and close", lines)
		}
		p.waitIdle(t)
		c = testkit.Dial(t, p.addr)
		c.MustLogin(user, dc.PasswordOf(user))
		if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 1") {
			t.Fatalf("STATUS: got %q, want the 1 seeded message only", res)
		}
		c.Logout()
	})
}
