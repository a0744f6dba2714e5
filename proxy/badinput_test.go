package proxy

import (
	"bufio"
	"encoding/base64"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestBadInput sends hostile and broken input before login, each case on
// a connection of its own, and checks the answer: a clear IMAP response
// (BAD or NO for the command) or a clean close, never a hang, never a
// continuation for a literal the proxy will not take. Afterwards the
// proxy still serves a normal client and holds no session of the cases.
func TestBadInput(t *testing.T) {
	b := newFakeBackend(t)
	p := startFakeProxy(t, b, func(o *Options) {
		o.MaxLineLength = 4096
		o.MaxLiteralPreAuth = 1024
		o.PreAuthTimeout = 2 * time.Second
	})
	const logout = "zz LOGOUT\r\n"
	long := strings.Repeat("A", 5000)
	tests := []struct {
		name  string
		input string
		// want lists line prefixes that must appear, in order.
		want []string
		// never lists line prefixes that must not appear.
		never []string
	}{
		{"line over the limit", "a1 LOGIN " + long + " x\r\na2 NOOP\r\n" + logout,
			[]string{"* BAD Command line too long", "a2 OK", "zz OK"}, nil},
		{"huge literal", "a1 LOGIN {999999999999}\r\n" + logout,
			[]string{"a1 NO [TOOBIG]", "zz OK"}, []string{"+"}},
		{"literal over the pre-login limit", "a1 LOGIN {1025}\r\n" + logout,
			[]string{"a1 NO [TOOBIG]", "zz OK"}, []string{"+"}},
		{"negative literal", "a1 LOGIN {-5}\r\n" + logout, []string{"* BAD Error in IMAP command: bad literal length", "zz OK"}, []string{"+"}},
		{"malformed literal", "a1 LOGIN {12a}\r\n" + logout, []string{"* BAD Error in IMAP command: bad literal length", "zz OK"}, []string{"+"}},
		{"NUL byte", "a1 LOGIN al\x00ice secret\r\n" + logout, []string{"a1 BAD", "zz OK"}, []string{"a1 OK"}},
		{"bare CR", "a1 NOOP\rx\r\n" + logout, []string{"a1 BAD", "zz OK"}, nil},
		// 8-bit bytes are not atom characters; a quoted string may hold
		// UTF-8 (RFC 9051), so that one goes to the backend.
		{"invalid UTF-8 in an atom", "a1 LOGIN \xff\xfe secret\r\n" + logout, []string{"a1 BAD Error in IMAP command: unexpected character", "zz OK"}, []string{"a1 OK"}},
		{"invalid UTF-8 in a quoted string", "a1 LOGIN \"\xff\xfe\" wrong\r\n" + logout, []string{"a1 NO", "zz OK"}, []string{"a1 OK"}},
		{"unterminated quote", "a1 LOGIN \"alice secret\r\n" + logout, []string{"a1 BAD", "zz OK"}, nil},
		{"illegal tag", "a{1 NOOP\r\n" + logout, []string{"* BAD", "zz OK"}, nil},
		{"tag +", "+ NOOP\r\n" + logout, []string{"* BAD", "zz OK"}, nil},
		{"empty line", "\r\n" + logout, []string{"* BAD", "zz OK"}, nil},
		{"commands before the greeting is read", "a1 CAPABILITY\r\na2 NOOP\r\n" + logout,
			[]string{"* OK", "* CAPABILITY", "a1 OK", "a2 OK", "zz OK"}, nil},
		{"pipelined commands before and after login", "a1 CAPABILITY\r\na2 LOGIN alice secret\r\na3 NOOP\r\n" + logout,
			[]string{"a1 OK", "a2 OK", "a3 OK", "* BYE", "zz OK"}, nil},
		{"AUTHENTICATE with bad base64", "a1 AUTHENTICATE PLAIN !!notbase64!!\r\n" + logout,
			[]string{"a1 BAD", "zz OK"}, []string{"a1 OK"}},
		{"SASL initial response too long", "a1 AUTHENTICATE PLAIN " + base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", 5000))) + "\r\n" + logout,
			[]string{"* BAD Command line too long", "zz OK"}, []string{"a1 OK"}},
		{"SASL response too long", "a1 AUTHENTICATE PLAIN\r\n" + base64.StdEncoding.EncodeToString([]byte(strings.Repeat("x", 5000))) + "\r\n" + logout,
			[]string{"+", "a1 BAD AUTHENTICATE response too long", "zz OK"}, []string{"a1 OK"}},
		{"SASL continuation with bad base64", "a1 AUTHENTICATE PLAIN\r\n%%%%\r\n" + logout,
			[]string{"+", "a1 BAD Invalid base64 data in AUTHENTICATE", "zz OK"}, []string{"a1 OK"}},
		{"literal on a command without arguments", "a1 NOOP {5}\r\n" + logout,
			[]string{"a1 BAD Error in IMAP command: too many arguments", "zz OK"}, []string{"+"}},
		{"literal on a command not taken before login", "a1 SELECT {5}\r\n" + logout,
			[]string{"a1 BAD Command not valid before login", "zz OK"}, []string{"+"}},
		{"LOGIN stretched by literals", "a1 LOGIN a {0+}\r\n b {0+}\r\n c\r\n" + logout,
			[]string{"a1 BAD Error in IMAP command: too many arguments", "zz OK"}, []string{"a1 OK"}},
		{"too many bad commands", "x\r\ny\r\nz\r\nw\r\n", []string{"* BAD", "* BAD", "* BAD", "* BYE"}, nil},
		// Bounded by timeouts.preauth, counted from connect.
		{"literal never finished", "a1 LOGIN {10}\r\nabc", []string{"+", "* BYE Autologout"}, []string{"a1 OK"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// Bounded: every case ends in a close well before this.
			c.SetDeadline(time.Now().Add(20 * time.Second))
			if _, err := c.Write([]byte(tc.input)); err != nil {
				t.Fatal(err)
			}
			var lines []string
			r := bufio.NewReader(c)
			for {
				l, err := r.ReadString('\n')
				if l != "" {
					lines = append(lines, strings.TrimRight(l, "\r\n"))
				}
				if err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatalf("no close within the deadline; got %q", lines)
					}
					break
				}
			}
			i := 0
			for _, l := range lines {
				if i < len(tc.want) && strings.HasPrefix(l, tc.want[i]) {
					i++
				}
				for _, n := range tc.never {
					if strings.HasPrefix(l, n) {
						t.Errorf("got %q, which must not come", l)
					}
				}
			}
			if i < len(tc.want) {
				t.Errorf("got %q; want lines starting with %q in order (missing %q)", lines, tc.want, tc.want[i])
			}
		})
	}

	p.waitSessions(t, 0)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	if res := c.Cmd("NOOP"); !res.OK() {
		t.Fatalf("a normal client after the bad input: %s", res)
	}
	c.Logout()
	if st := p.srv.Stats(); st.Sessions > 1 {
		t.Errorf("sessions left over: %+v", st)
	}
}
