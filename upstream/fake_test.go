package upstream

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/imapproxy/imapproxy/backend"
)

// peer is the backend's end of a net.Pipe, scripted by a test: it reads
// the client's lines and writes what the script says. A failed step is
// reported on the test and ends the script.
type peer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	tag  string // the tag of the last command read
}

// line reads one line, without CRLF; "" at EOF.
func (p *peer) line() string {
	l, err := p.r.ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(l, "\r\n")
}

// expect reads a command and checks that it is want after the tag, which
// must be one of the connection's secret tags. It remembers the tag.
func (p *peer) expect(want string) bool {
	p.t.Helper()
	l := p.line()
	tag, rest, _ := strings.Cut(l, " ")
	if !strings.HasPrefix(tag, "IMAPPROXY") || rest != want {
		p.t.Errorf("backend read %q, want %q under an IMAPPROXY tag", l, "<tag> "+want)
		return false
	}
	p.tag = tag
	return true
}

// expectRaw reads a line that is not a command (a literal, a SASL
// response) and checks it.
func (p *peer) expectRaw(want string) bool {
	p.t.Helper()
	if l := p.line(); l != want {
		p.t.Errorf("backend read %q, want %q", l, want)
		return false
	}
	return true
}

func (p *peer) send(s string) { p.conn.Write([]byte(s)) }

// pipe starts script on the backend's end of a net.Pipe, which first
// sends greeting, and returns the client's end. The script's goroutine
// ends when the script returns (it then closes its end) or when the
// client's end is closed; the test waits for it.
func pipe(t *testing.T, greeting string, script func(p *peer)) net.Conn {
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer server.Close()
		p := &peer{t: t, conn: server, r: bufio.NewReader(server)}
		p.send(greeting)
		if script != nil {
			script(p)
		}
		// Drain whatever else comes (a LOGOUT) until the client closes.
		io.Copy(io.Discard, server)
	}()
	t.Cleanup(func() {
		client.Close()
		<-done
	})
	return client
}

var pipeBackend = backend.Backend{ID: "b1", Addr: "127.0.0.1:143"}

// openPipe runs the beginning of the protocol over a scripted pipe.
func openPipe(t *testing.T, d *Dialer, greeting string, script func(p *peer)) (*Conn, error) {
	t.Helper()
	nc := pipe(t, greeting, script)
	c, err := d.open(context.Background(), nc, pipeBackend)
	if err != nil {
		nc.Close()
	}
	return c, err
}

func TestGreeting(t *testing.T) {
	tests := []struct {
		name     string
		greeting string
		want     error
		caps     string
	}{
		{"OK with capabilities", "* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n", nil, "IMAP4rev1 IDLE"},
		{"BYE", "* BYE too busy\r\n", ErrBye, ""},
		{"PREAUTH", "* PREAUTH [CAPABILITY IMAP4rev1] welcome\r\n", ErrPreauth, ""},
		{"garbage", "HTTP/1.1 400 Bad Request\r\n", ErrUnexpected, ""},
		{"literal", "* OK {3}\r\nabc\r\n", ErrUnexpected, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := openPipe(t, &Dialer{}, tt.greeting, nil)
			if !errors.Is(err, tt.want) {
				t.Fatalf("open after %q: %v, want %v", tt.greeting, err, tt.want)
			}
			if err == nil {
				if got := strings.Join(c.PreCaps(), " "); got != tt.caps {
					t.Errorf("PreCaps = %q, want %q", got, tt.caps)
				}
				c.Abort()
			}
		})
	}
}

// TestGreetingWithoutCapabilities: a greeting without a capability code
// makes the client ask.
func TestGreetingWithoutCapabilities(t *testing.T) {
	c, err := openPipe(t, &Dialer{}, "* OK ready\r\n", func(p *peer) {
		if p.expect("CAPABILITY") {
			p.send("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + p.tag + " OK done\r\n")
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Abort()
	if got := strings.Join(c.PreCaps(), " "); got != "IMAP4rev1 AUTH=PLAIN" {
		t.Errorf("PreCaps = %q, want the CAPABILITY answer", got)
	}
}

func TestStartTLSRefusals(t *testing.T) {
	d := &Dialer{TLS: backend.TLSStartTLS}
	t.Run("not offered", func(t *testing.T) {
		_, err := openPipe(t, d, "* OK ready\r\n", func(p *peer) {
			if p.expect("CAPABILITY") {
				p.send("* CAPABILITY IMAP4rev1\r\n" + p.tag + " OK done\r\n")
			}
		})
		if !errors.Is(err, ErrNoStartTLS) {
			t.Fatalf("open: %v, want ErrNoStartTLS", err)
		}
	})
	t.Run("data before the handshake", func(t *testing.T) {
		_, err := openPipe(t, d, "* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n", func(p *peer) {
			if p.expect("STARTTLS") {
				// Bytes after the OK could be a man in the middle's.
				p.send(p.tag + " OK begin\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
			}
		})
		if !errors.Is(err, ErrStaleData) {
			t.Fatalf("open: %v, want ErrStaleData", err)
		}
	})
}

// TestLogin logs in by each method against a backend scripted to check
// the bytes on the wire and answer.
func TestLogin(t *testing.T) {
	const user = "bob"
	tests := []struct {
		name     string
		method   string
		greeting string
		cr       Credentials
		script   func(p *peer)
		ok       bool
	}{
		{
			name:     "LOGIN with atoms",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("secret")},
			script: func(p *peer) {
				if p.expect("LOGIN bob secret") {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "LOGIN with a quoted password",
			method:   "auto",
			greeting: "* OK [CAPABILITY IMAP4rev1] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte(`a "b" \c`)},
			script: func(p *peer) {
				if p.expect(`LOGIN bob "a \"b\" \\c"`) {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "LOGIN with a synchronising literal",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("p\xc3\xa4ss")},
			script: func(p *peer) {
				if !p.expect("LOGIN bob {5}") {
					return
				}
				p.send("+ go ahead\r\n")
				if p.expectRaw("p\xc3\xa4ss") {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "LOGIN with a LITERAL+ literal",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("p\xc3\xa4ss")},
			script: func(p *peer) {
				// No "+" is sent: the literal must follow at once.
				if p.expect("LOGIN bob {5+}") && p.expectRaw("p\xc3\xa4ss") {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "AUTHENTICATE PLAIN with SASL-IR",
			method:   "auto",
			greeting: "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("secret")},
			script: func(p *peer) {
				ir := base64.StdEncoding.EncodeToString([]byte("\x00bob\x00secret"))
				if p.expect("AUTHENTICATE PLAIN " + ir) {
					p.send("* CAPABILITY IMAP4rev1 IDLE\r\n" + p.tag + " OK Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "AUTHENTICATE PLAIN without SASL-IR",
			method:   "plain",
			greeting: "* OK [CAPABILITY IMAP4rev1] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("secret")},
			script: func(p *peer) {
				if !p.expect("AUTHENTICATE PLAIN") {
					return
				}
				p.send("+ \r\n")
				if p.expectRaw(base64.StdEncoding.EncodeToString([]byte("\x00bob\x00secret"))) {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "an authorization identity forces PLAIN",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n",
			cr:       Credentials{User: []byte("admin"), Authzid: []byte(user), Pass: []byte("pw")},
			script: func(p *peer) {
				if p.expect("AUTHENTICATE PLAIN " + base64.StdEncoding.EncodeToString([]byte("bob\x00admin\x00pw"))) {
					p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "capabilities asked for after login",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("secret")},
			script: func(p *peer) {
				if !p.expect("LOGIN bob secret") {
					return
				}
				p.send(p.tag + " OK Logged in\r\n")
				if p.expect("CAPABILITY") {
					p.send("* CAPABILITY IMAP4rev1 IDLE\r\n" + p.tag + " OK done\r\n")
				}
			},
			ok: true,
		},
		{
			name:     "refused",
			method:   "login",
			greeting: "* OK [CAPABILITY IMAP4rev1] ready\r\n",
			cr:       Credentials{User: []byte(user), Pass: []byte("wrong")},
			script: func(p *peer) {
				if p.expect("LOGIN bob wrong") {
					p.send(p.tag + " NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := openPipe(t, &Dialer{LoginMethod: tt.method}, tt.greeting, tt.script)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Abort()
			res, err := c.Login(context.Background(), &tt.cr, nil)
			if err != nil {
				t.Fatalf("Login: %v", err)
			}
			if res.OK != tt.ok {
				t.Fatalf("Login = %+v, want OK %v", res, tt.ok)
			}
			if !tt.ok {
				if res.Status != "NO" || string(res.Text) != "[AUTHENTICATIONFAILED] Authentication failed." {
					t.Errorf("refusal = %s %q, want the backend's NO and text", res.Status, res.Text)
				}
				return
			}
			if got := strings.Join(c.PostCaps(), " "); got != "IMAP4rev1 IDLE" {
				t.Errorf("PostCaps = %q, want IMAP4rev1 IDLE", got)
			}
			if c.Born().IsZero() {
				t.Error("Born not set by a successful login")
			}
		})
	}
}

// TestLoginUserNeedsLiteral: a user name LOGIN could send only as a
// literal is refused without a byte to the backend.
func TestLoginUserNeedsLiteral(t *testing.T) {
	c, err := openPipe(t, &Dialer{LoginMethod: "login"}, "* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n", func(p *peer) {
		if l := p.line(); l != "" {
			t.Errorf("backend read %q, want nothing", l)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Login(context.Background(), &Credentials{User: []byte("b\xc3\xb6b"), Pass: []byte("pw")}, []byte(`("name" "x")`))
	c.Abort()
	if err != nil || res.OK || res.Status != "NO" || !strings.HasPrefix(string(res.Text), "[CANNOT]") {
		t.Fatalf("Login = %+v, %v; want NO [CANNOT]", res, err)
	}
}

// TestLoginID: ID goes in the same write as LOGIN, and its answer is read
// before the login's.
func TestLoginID(t *testing.T) {
	c, err := openPipe(t, &Dialer{LoginMethod: "login"}, "* OK [CAPABILITY IMAP4rev1 ID] ready\r\n", func(p *peer) {
		if !p.expect(`ID ("name" "imapproxy")`) {
			return
		}
		idTag := p.tag
		if !p.expect("LOGIN bob secret") {
			return
		}
		p.send(`* ID ("name" "Dovecot")` + "\r\n" + idTag + " OK ID completed\r\n")
		p.send(p.tag + " OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Abort()
	res, err := c.Login(context.Background(), &Credentials{User: []byte("bob"), Pass: []byte("secret")}, []byte(`("name" "imapproxy")`))
	if err != nil || !res.OK {
		t.Fatalf("Login = %+v, %v", res, err)
	}
	if c.Reader().Buffered() != 0 {
		t.Errorf("%d bytes left unread after the login", c.Reader().Buffered())
	}
}

// TestLoginTimeout: a backend that greets and then hangs in the login is
// cut off after the login timeout, with ErrLoginTimeout.
func TestLoginTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const limit = 7 * time.Second
		c, err := openPipe(t, &Dialer{LoginMethod: "login", LoginTimeout: limit}, "* OK [CAPABILITY IMAP4rev1] ready\r\n", func(p *peer) {
			p.expect("LOGIN bob secret") // and no answer
		})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Abort()
		start := time.Now()
		_, err = c.Login(context.Background(), &Credentials{User: []byte("bob"), Pass: []byte("secret")}, nil)
		if !errors.Is(err, ErrLoginTimeout) {
			t.Fatalf("Login to a hung backend: %v, want ErrLoginTimeout", err)
		}
		if took := time.Since(start); took != limit {
			t.Errorf("Login gave up after %v, want the login timeout %v", took, limit)
		}
	})
}

// TestLoginCancelled: the end of Login's context (the server's Close)
// cuts a login waiting on a hung backend before its timeout.
func TestLoginCancelled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, err := openPipe(t, &Dialer{LoginMethod: "login", LoginTimeout: time.Minute}, "* OK [CAPABILITY IMAP4rev1] ready\r\n", func(p *peer) {
			p.expect("LOGIN bob secret")
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		start := time.Now()
		time.AfterFunc(time.Second, cancel)
		_, err = c.Login(ctx, &Credentials{User: []byte("bob"), Pass: []byte("secret")}, nil)
		if err == nil || errors.Is(err, ErrLoginTimeout) {
			t.Fatalf("Login cancelled: %v, want the error of a closed connection", err)
		}
		if took := time.Since(start); took != time.Second {
			t.Errorf("Login ended after %v, want at the cancel (1s)", took)
		}
	})
}

// loggedIn returns a connection logged in over a scripted pipe, whose
// script then goes on with after.
func loggedIn(t *testing.T, d *Dialer, postCaps string, after func(p *peer)) *Conn {
	t.Helper()
	c, err := openPipe(t, d, "* OK [CAPABILITY IMAP4rev1] ready\r\n", func(p *peer) {
		if !p.expect("LOGIN bob secret") {
			return
		}
		p.send(p.tag + " OK [CAPABILITY " + postCaps + "] Logged in\r\n")
		if after != nil {
			after(p)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Abort)
	if res, err := c.Login(context.Background(), &Credentials{User: []byte("bob"), Pass: []byte("secret")}, nil); err != nil || !res.OK {
		t.Fatalf("Login = %+v, %v", res, err)
	}
	return c
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name   string
		answer func(p *peer) // to the NOOP
		want   error
	}{
		{"tagged OK", func(p *peer) { p.send(p.tag + " OK NOOP completed\r\n") }, nil},
		{"untagged first", func(p *peer) { p.send("* 3 EXISTS\r\n" + p.tag + " OK NOOP completed\r\n") }, ErrUnexpected},
		{"another tag", func(p *peer) { p.send("x1 OK done\r\n") }, ErrUnexpected},
		{"NO", func(p *peer) { p.send(p.tag + " NO not now\r\n") }, ErrUnexpected},
		{"data after the OK", func(p *peer) { p.send(p.tag + " OK NOOP completed\r\n* 4 EXISTS\r\n") }, ErrStaleData},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := loggedIn(t, &Dialer{LoginMethod: "login"}, "IMAP4rev1", func(p *peer) {
				if p.expect("NOOP") {
					tt.answer(p)
				}
			})
			if err := c.Check(context.Background()); !errors.Is(err, tt.want) {
				t.Fatalf("Check: %v, want %v", err, tt.want)
			}
		})
	}
}

// TestCheckStaleData: bytes waiting before the check fail it without a
// round trip.
func TestCheckStaleData(t *testing.T) {
	c, err := openPipe(t, &Dialer{LoginMethod: "login"}, "* OK [CAPABILITY IMAP4rev1] ready\r\n", func(p *peer) {
		if p.expect("LOGIN bob secret") {
			// One write: the EXISTS arrives with the OK.
			p.send(p.tag + " OK [CAPABILITY IMAP4rev1] Logged in\r\n* 1 EXISTS\r\n")
		}
		if l := p.line(); l != "" {
			t.Errorf("backend read %q after the login, want nothing", l)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Abort()
	if res, err := c.Login(context.Background(), &Credentials{User: []byte("bob"), Pass: []byte("secret")}, nil); err != nil || !res.OK {
		t.Fatalf("Login = %+v, %v", res, err)
	}
	if err := c.Check(context.Background()); !errors.Is(err, ErrStaleData) {
		t.Fatalf("Check with unread data: %v, want ErrStaleData", err)
	}
}

// TestCheckHung: a backend that does not answer the NOOP fails the check
// after the check timeout.
func TestCheckHung(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const limit = 3 * time.Second
		c := loggedIn(t, &Dialer{LoginMethod: "login", CheckTimeout: limit}, "IMAP4rev1", func(p *peer) {
			p.expect("NOOP")
		})
		start := time.Now()
		err := c.Check(context.Background())
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("Check of a hung backend: %v, want a timeout", err)
		}
		if took := time.Since(start); took != limit {
			t.Errorf("Check gave up after %v, want the check timeout %v", took, limit)
		}
	})
}

// TestCloseBounded: LOGOUT waits for its answer at most the check
// timeout, and Abort from another goroutine ends the wait at once.
func TestCloseBounded(t *testing.T) {
	const limit = 4 * time.Second
	t.Run("answered", func(t *testing.T) {
		logout := make(chan bool, 1)
		c := loggedIn(t, &Dialer{LoginMethod: "login", CheckTimeout: limit}, "IMAP4rev1", func(p *peer) {
			ok := p.expect("LOGOUT")
			logout <- ok
			if ok {
				p.send("* BYE Logging out\r\n" + p.tag + " OK Logout completed.\r\n")
			}
		})
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if !<-logout {
			t.Fatal("no LOGOUT")
		}
	})
	t.Run("hung", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := loggedIn(t, &Dialer{LoginMethod: "login", CheckTimeout: limit}, "IMAP4rev1", func(p *peer) {
				p.expect("LOGOUT")
			})
			start := time.Now()
			c.Close()
			if took := time.Since(start); took != limit {
				t.Errorf("Close of a hung backend took %v, want the check timeout %v", took, limit)
			}
		})
	})
	t.Run("aborted", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := loggedIn(t, &Dialer{LoginMethod: "login", CheckTimeout: limit}, "IMAP4rev1", func(p *peer) {
				p.expect("LOGOUT")
			})
			start := time.Now()
			time.AfterFunc(time.Second, c.Abort)
			c.Close()
			if took := time.Since(start); took != time.Second {
				t.Errorf("Close took %v, want it cut by Abort after 1s", took)
			}
		})
	})
}

func TestCleanupCommand(t *testing.T) {
	withUnselect := &Conn{tagPrefix: newTagPrefix(), postCaps: []string{"IMAP4rev1", "UNSELECT"}}
	for _, tt := range []struct {
		selected  bool
		cmd, want string
	}{{false, "UNSELECT", "BAD"}, {true, "UNSELECT", "OK"}} {
		if cmd, want := withUnselect.CleanupCommand(tt.selected); cmd != tt.cmd || want != tt.want {
			t.Errorf("CleanupCommand(%v) = %q, %q; want %q, %q", tt.selected, cmd, want, tt.cmd, tt.want)
		}
	}
	without := &Conn{tagPrefix: newTagPrefix(), postCaps: []string{"IMAP4rev1"}}
	for _, selected := range []bool{false, true} {
		cmd, want := without.CleanupCommand(selected)
		if !strings.HasPrefix(cmd, `EXAMINE "imapproxy/\"nonexistent\"/`+without.TagPrefix()) || want != "NO" {
			t.Errorf("CleanupCommand(%v) without UNSELECT = %q, %q; want an EXAMINE of a secret name, NO", selected, cmd, want)
		}
	}
}

// TestWriteCommand: a command of the proxy's own goes out under the tag
// it is given, and its answer is read under the check timeout.
func TestWriteCommand(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const limit = 2 * time.Second
		c := loggedIn(t, &Dialer{LoginMethod: "login", CheckTimeout: limit}, "IMAP4rev1 UNSELECT", func(p *peer) {
			p.expect("UNSELECT") // and no answer
		})
		tag := c.NextTag()
		cmd, _ := c.CleanupCommand(false)
		c.WriteCommand(tag, cmd)
		if err := c.Writer().Flush(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, _, err := c.Reader().ReadLine()
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("reading the answer of a hung backend: %v, want a timeout", err)
		}
		if took := time.Since(start); took != limit {
			t.Errorf("gave up after %v, want the check timeout %v", took, limit)
		}
	})
}

// TestInternalTagsUnguessable: the tags of the proxy's own commands carry
// a secret drawn per connection, so that a command a client smuggled past
// the relay cannot answer in their name.
func TestInternalTagsUnguessable(t *testing.T) {
	a := &Conn{tagPrefix: newTagPrefix()}
	b := &Conn{tagPrefix: newTagPrefix()}
	ta, tb := a.NextTag(), b.NextTag()
	if ta == tb || len(ta) < len("IMAPPROXY")+16 {
		t.Fatalf("tags %q and %q: want a secret of 16 hex digits each, different", ta, tb)
	}
	if a.NextTag() == ta {
		t.Fatal("a connection repeats its tag")
	}
}

// TestWriteTimeout: once set, the write timeout bounds each write to a
// backend that does not read, buffered (Writer) or not (Direct).
func TestWriteTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const limit = 2 * time.Second
		hold := make(chan struct{})
		c := loggedIn(t, &Dialer{LoginMethod: "login"}, "IMAP4rev1", func(p *peer) { <-hold })
		t.Cleanup(func() { close(hold) }) // first: the peer drains, then the pipe closes
		c.SetWriteTimeout(limit)
		for _, w := range []struct {
			name  string
			write func() error
		}{
			{"Direct", func() error { _, err := c.Direct().Write([]byte("literal bytes")); return err }},
			{"Writer", func() error { c.Writer().WriteString("a NOOP\r\n"); return c.Writer().Flush() }},
		} {
			start := time.Now()
			err := w.write()
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("%s to a backend that does not read: %v, want a timeout", w.name, err)
			}
			if took := time.Since(start); took != limit {
				t.Errorf("%s gave up after %v, want the write timeout %v", w.name, took, limit)
			}
		}
	})
}
