package proxy

// Integration tests of the proxy's pre-login side against a real Dovecot:
// LOGIN in its quoted and literal forms, AUTHENTICATE PLAIN and LOGIN,
// wrong passwords, the commands answered before login, what the proxy
// logs, and the ID it forwards.

import (
	"encoding/base64"
	"regexp"
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// authFailedRE matches imap-login's line for a connection that ended after
// a failed authentication of user.
func authFailedRE(user string) *regexp.Regexp {
	return regexp.MustCompile(`(?m) imap-login: Info: .*\(auth failed, .*user=<` + regexp.QuoteMeta(user) + `>`)
}

func TestWrongPasswordKeepsCachedConn(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 3})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	wrong := "wrong-" + pass

	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin(user, pass)
	c.Logout()
	p.waitCached(t, 1)
	waitLoginsFor(t, dc, user, 1)

	cases := []struct {
		name  string
		login func(c *testkit.Client) testkit.Response
	}{
		{"LOGIN", func(c *testkit.Client) testkit.Response { return c.Login(user, wrong) }},
		{"AUTHENTICATE PLAIN", func(c *testkit.Client) testkit.Response { return authPlain(c, "", user, wrong, true) }},
		{"AUTHENTICATE LOGIN", func(c *testkit.Client) testkit.Response { return authLogin(c, user, wrong) }},
	}
	failRE := authFailedRE(user)
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			res := tc.login(c)
			if !strings.Contains(res.Tagged, " NO [AUTHENTICATIONFAILED]") {
				t.Fatalf("wrong password: got %q, want a tagged NO [AUTHENTICATIONFAILED] from Dovecot", res)
			}
			if res.Has("XPROXYREUSE") {
				t.Fatalf("wrong password was answered from the cache:\n%s", res)
			}
			// The attempt reached Dovecot: it logs the failed auth.
			if n := waitLogCount(dc, failRE, i+1); n != i+1 {
				t.Fatalf("Dovecot logged %d failed logins of %s, want %d\n%s", n, user, i+1, dc.Log())
			}
			if st := p.srv.Pool().Stats(); st.Cached != 1 {
				t.Fatalf("after a wrong password: cached = %d, want 1 (not evicted)", st.Cached)
			}
			// The same session may try again, and the right password
			// gets the cached connection.
			res = c.MustLogin(user, pass)
			if !res.Has("[XPROXYREUSE]") {
				t.Fatalf("right password after a wrong one was not reused:\n%s", res)
			}
			c.Logout()
			p.waitCached(t, 1)
		})
	}
	waitLoginsFor(t, dc, user, 1)
}

// loginForm is one way for a client to present user name and password.
type loginForm struct {
	name  string
	login func(c *testkit.Client, user, pass string) testkit.Response
}

var loginForms = []loginForm{
	{"LOGIN quoted", func(c *testkit.Client, u, p string) testkit.Response { return c.Login(u, p) }},
	{"LOGIN synchronising literals", func(c *testkit.Client, u, p string) testkit.Response { return c.LoginLiteral(u, p, false) }},
	{"LOGIN non-synchronising literals", func(c *testkit.Client, u, p string) testkit.Response { return c.LoginLiteral(u, p, true) }},
	{"AUTHENTICATE PLAIN SASL-IR", func(c *testkit.Client, u, p string) testkit.Response { return authPlain(c, "", u, p, true) }},
	{"AUTHENTICATE PLAIN continuation", func(c *testkit.Client, u, p string) testkit.Response { return authPlain(c, "", u, p, false) }},
	{"AUTHENTICATE PLAIN authzid = user", func(c *testkit.Client, u, p string) testkit.Response { return authPlain(c, u, u, p, true) }},
	{"AUTHENTICATE LOGIN", func(c *testkit.Client, u, p string) testkit.Response { return authLogin(c, u, p) }},
}

// TestLoginForms logs in with each form first (a real backend login), then
// with a quoted LOGIN and the form again: all three must share the one
// cached connection, since they carry the same credential.
func TestLoginForms(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: len(loginForms), Messages: 2})
	for i, f := range loginForms {
		t.Run(f.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			pass := dc.PasswordOf(user)
			p := startProxy(t, []*dovecottest.Server{dc}, nil)

			c := testkit.Dial(t, p.addr)
			res := f.login(c, user, pass)
			if !res.OK() || res.Has("XPROXYREUSE") {
				t.Fatalf("first login: got %q, want a fresh tagged OK", res)
			}
			if !strings.Contains(res.Tagged, "[CAPABILITY IMAP4rev1") {
				t.Errorf("first login: tagged OK %q lacks the capability code", res.Tagged)
			}
			if st := c.Cmd("STATUS INBOX (MESSAGES)"); !st.OK() || !st.Has("MESSAGES 2") {
				t.Fatalf("STATUS after login: %s", st)
			}
			c.Logout()
			p.waitCached(t, 1)

			c = testkit.Dial(t, p.addr)
			if res := c.MustLogin(user, pass); !res.Has("[XPROXYREUSE]") {
				t.Fatalf("quoted LOGIN after %s: not reused:\n%s", f.name, res)
			}
			c.Logout()
			p.waitCached(t, 1)

			c = testkit.Dial(t, p.addr)
			res = f.login(c, user, pass)
			if !res.OK() || !res.Has("[XPROXYREUSE]") {
				t.Fatalf("%s after a quoted LOGIN: got %q, want the cached connection", f.name, res)
			}
			c.Logout()
			p.waitCached(t, 1)

			waitLoginsFor(t, dc, user, 1)
			if st := p.srv.Pool().Stats(); st.Hits != 2 {
				t.Errorf("pool hits = %d, want 2", st.Hits)
			}
		})
	}
}

// TestPasswordNeedingQuotes uses a password with a space, a quote and a
// backslash: as a literal, quoted with escapes and in SASL it is the same
// credential, and the proxy passes it on intact with either backend login
// method (LOGIN needs the quoting right, AUTHENTICATE PLAIN the base64).
func TestPasswordNeedingQuotes(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 1})
	const pass = `s p"a\ce {5}`
	for i, method := range []string{"plain", "login"} {
		t.Run("backend "+method, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			if err := dc.SetPassword(user, pass); err != nil {
				t.Fatal(err)
			}
			p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.Dialer.LoginMethod = method })
			for j, f := range []loginForm{loginForms[1], loginForms[0], loginForms[2], loginForms[3]} {
				c := testkit.Dial(t, p.addr)
				res := f.login(c, user, pass)
				if !res.OK() {
					t.Fatalf("%s: %s", f.name, res)
				}
				if reused := res.Has("[XPROXYREUSE]"); reused != (j > 0) {
					t.Fatalf("%s: XPROXYREUSE = %v, want %v", f.name, reused, j > 0)
				}
				c.Logout()
				p.waitCached(t, 1)
			}
			// A wrong password that differs only in the escaped bytes.
			c := testkit.Dial(t, p.addr)
			if res := c.Login(user, strings.ReplaceAll(pass, `\`, "")); !strings.Contains(res.Tagged, " NO ") {
				t.Fatalf("password without the backslash: got %q, want NO", res)
			}
			waitLoginsFor(t, dc, user, 1)
		})
	}
}

func TestAuthenticateErrors(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

	cases := []struct {
		name string
		// run drives the exchange and returns the tagged reply.
		run  func(c *testkit.Client) string
		want string // prefix of the tagged reply after the tag
	}{
		{"PLAIN cancelled", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE PLAIN\r\n")
			c.ExpectContinuation()
			c.Send("*\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"LOGIN cancelled at user name", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE LOGIN\r\n")
			c.ExpectContinuation()
			c.Send("*\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"LOGIN cancelled at password", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE LOGIN\r\n")
			c.ExpectContinuation()
			c.Send(b64(user) + "\r\n")
			c.ExpectContinuation()
			c.Send("*\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"PLAIN bad base64 after continuation", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE PLAIN\r\n")
			c.ExpectContinuation()
			c.Send("!!not*base64\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"PLAIN bad base64 as SASL-IR", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE PLAIN AAA-\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"LOGIN bad base64 password", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE LOGIN\r\n")
			c.ExpectContinuation()
			c.Send(b64(user) + "\r\n")
			c.ExpectContinuation()
			c.Send("%%%\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"PLAIN without user name", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE PLAIN " + saslPlain("", "", pass) + "\r\n")
			return c.ReadResponse("a1").Tagged
		}, "BAD"},
		{"unsupported mechanism", func(c *testkit.Client) string {
			c.Send("a1 AUTHENTICATE CRAM-MD5\r\n")
			return c.ReadResponse("a1").Tagged
		}, "NO"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := testkit.Dial(t, p.addr)
			if got := tc.run(c); !strings.HasPrefix(got, "a1 "+tc.want+" ") {
				t.Fatalf("got %q, want a1 %s", got, tc.want)
			}
			// The session is back at a command boundary, not logged in.
			if res := c.Cmd("SELECT INBOX"); !strings.Contains(res.Tagged, " BAD ") {
				t.Fatalf("SELECT after the failed AUTHENTICATE: got %q, want BAD (not logged in)", res)
			}
			c.MustLogin(user, pass)
			c.Logout()
		})
	}
	// None of them reached Dovecot's authentication.
	if n := len(authFailedRE(user).FindAllString(dc.Log(), -1)); n != 0 {
		t.Errorf("Dovecot logged %d failed logins, want 0:\n%s", n, dc.Log())
	}
}

func TestPreLoginCommands(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	t.Run("greeting", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		for _, want := range []string{"* OK [CAPABILITY IMAP4rev1 ", " AUTH=PLAIN", " AUTH=LOGIN", " SASL-IR", " LITERAL+", " ID", "] imapproxy ready."} {
			if !strings.Contains(c.Greeting, want) {
				t.Errorf("greeting %q lacks %q", c.Greeting, want)
			}
		}
		if strings.Contains(c.Greeting, "STARTTLS") || strings.Contains(c.Greeting, "LOGINDISABLED") {
			t.Errorf("greeting %q offers STARTTLS or LOGINDISABLED on a listener without TLS", c.Greeting)
		}
	})
	t.Run("CAPABILITY", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		res := c.Cmd("CAPABILITY")
		if !res.OK() || len(res.Untagged) != 1 || !strings.HasPrefix(res.Untagged[0], "* CAPABILITY IMAP4rev1 ") || !res.Has(" AUTH=PLAIN") {
			t.Fatalf("CAPABILITY: %s", res)
		}
		if res := c.Cmd("CAPABILITY extra"); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("CAPABILITY with an argument: got %q, want BAD", res)
		}
	})
	t.Run("NOOP", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		if res := c.Cmd("NOOP"); !res.OK() || len(res.Untagged) != 0 {
			t.Fatalf("NOOP: %s", res)
		}
	})
	t.Run("ID", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		for _, args := range []string{`("name" "test" "version" "1")`, "NIL"} {
			res := c.Cmd("ID %s", args)
			if !res.OK() || len(res.Untagged) != 1 || !strings.HasPrefix(res.Untagged[0], "* ID (") {
				t.Fatalf("ID %s: got %q, want * ID (...) and OK", args, res)
			}
		}
		if res := c.Cmd(`ID ("name")`); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("ID with an odd list: got %q, want BAD", res)
		}
	})
	t.Run("unknown command", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		if res := c.Cmd("XYZZY"); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("XYZZY: got %q, want tagged BAD", res)
		}
		if res := c.Cmd("SELECT INBOX"); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("SELECT before login: got %q, want tagged BAD", res)
		}
		// Two bad commands so far; a good one still works.
		if res := c.Cmd("NOOP"); !res.OK() {
			t.Fatalf("NOOP: %s", res)
		}
	})
	t.Run("three garbage lines", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		for i, g := range []string{"!!!", "(((", ")x"} {
			c.Send(g + "\r\n")
			l := c.ReadLine()
			if !strings.Contains(l, "BAD") {
				t.Fatalf("garbage %d %q: got %q, want BAD", i+1, g, l)
			}
		}
		rest := c.ReadToEOF()
		if len(rest) != 1 || !strings.HasPrefix(rest[0], "* BYE") {
			t.Fatalf("after the third bad command: got %q, want one * BYE and the connection closed", rest)
		}
	})
	t.Run("literal over the pre-login limit", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		c.Send("l1 LOGIN {9000}\r\n")
		if l := c.ReadLine(); !strings.HasPrefix(l, "l1 NO [TOOBIG]") {
			t.Fatalf("LOGIN with a 9000-byte literal: got %q, want l1 NO [TOOBIG] and no continuation", l)
		}
		if res := c.Cmd("NOOP"); !res.OK() {
			t.Fatalf("NOOP after the refused literal: %s", res)
		}
	})
	t.Run("non-synchronising literal over the pre-login limit", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		c.Send("l1 LOGIN {9000+}\r\n")
		lines := c.ReadToEOF()
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE [TOOBIG]") {
			t.Fatalf("LOGIN with a 9000-byte {n+} literal: got %q, want * BYE [TOOBIG] and close", lines)
		}
	})
	t.Run("LOGOUT", func(t *testing.T) {
		c := testkit.Dial(t, p.addr)
		c.Send("z9 LOGOUT\r\n")
		lines := c.ReadToEOF()
		if len(lines) != 2 || !strings.HasPrefix(lines[0], "* BYE") || !strings.HasPrefix(lines[1], "z9 OK") {
			t.Fatalf("LOGOUT before login: got %q, want * BYE, z9 OK, then close", lines)
		}
	})
	if n, _ := dc.Logins(); n != 0 {
		t.Errorf("Dovecot saw %d logins, want 0", n)
	}
}

// TestNoPasswordInLogs logs in every way, right and wrong, with the proxy
// logging at trace level, and looks for the secrets in its log.
func TestNoPasswordInLogs(t *testing.T) {
	t.Parallel()
	pw := func(u string) string { return "Sekr3t-" + u + "-Zq7" }
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 1, Password: pw})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	wrong := "Wr0ng-" + pass
	p := startProxy(t, []*dovecottest.Server{dc}, nil)

	for _, f := range loginForms {
		for _, pw := range []string{wrong, pass} {
			c := testkit.Dial(t, p.addr)
			res := f.login(c, user, pw)
			if res.OK() != (pw == pass) {
				t.Fatalf("%s: %s", f.name, res)
			}
			c.Logout()
		}
	}
	logs := p.logs.String()
	if !strings.Contains(logs, "user="+user) {
		t.Fatalf("proxy log does not mention %s; the test would see nothing:\n%s", user, logs)
	}
	b64 := base64.StdEncoding.EncodeToString
	for _, pw := range []string{pass, wrong} {
		for _, secret := range []string{
			pw,
			b64([]byte(pw)),
			saslPlain("", user, pw),
			saslPlain(user, user, pw),
		} {
			if strings.Contains(logs, secret) {
				t.Errorf("proxy log contains %q", secret)
			}
		}
	}
}

// TestForwardID checks that the ID the proxy sends before LOGIN reaches
// Dovecot, which trusts 127.0.0.1 (login_trusted_networks) and so takes
// the proxy's x-session-id as its own session id, and that fields a client
// puts in its own ID cannot claim to be the proxy.
func TestForwardID(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 1})
	cases := []struct {
		name    string
		forward bool
	}{
		{"forwarded", true},
		{"not forwarded", false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.Dialer.ForwardID = tc.forward })
			c := testkit.Dial(t, p.addr)
			// A client cannot set the fields only the proxy may set.
			if res := c.Cmd(`ID ("name" "evil" "x-session-id" "evil-42" "x-originating-ip" "10.9.8.7")`); !res.OK() {
				t.Fatalf("ID: %s", res)
			}
			c.MustLogin(user, dc.PasswordOf(user))
			c.Logout()
			waitLoginsFor(t, dc, user, 1)

			m := regexp.MustCompile(`(?m)^.* login: session=(\S+) .*user=` + user + ` backend=\S+ reused=false`).FindStringSubmatch(p.logs.String())
			if m == nil {
				t.Fatalf("no login line for %s in the proxy log:\n%s", user, p.logs.String())
			}
			sid := m[1]
			line := regexp.MustCompile(`(?m)^.* Login: user=<` + user + `>.*$`).FindString(dc.Log())
			if strings.Contains(line, "evil-42") || strings.Contains(line, "10.9.8.7") {
				t.Errorf("Dovecot took the client's own x- fields: %q", line)
			}
			hasID := strings.Contains(line, "session=<imapproxy-"+sid+">")
			if hasID != tc.forward {
				t.Errorf("Dovecot login line %q: session=<imapproxy-%s> present = %v, want %v", line, sid, hasID, tc.forward)
			}
		})
	}
}

// saslPlain is the base64 SASL PLAIN response for authzid, user, pass.
func saslPlain(authzid, user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(authzid + "\x00" + user + "\x00" + pass))
}

// authPlain runs AUTHENTICATE PLAIN, with the response as SASL-IR when ir
// is set, else after the empty continuation request.
func authPlain(c *testkit.Client, authzid, user, pass string, ir bool) testkit.Response {
	c.TB().Helper()
	tag := c.NextTag()
	if ir {
		c.Send(tag + " AUTHENTICATE PLAIN " + saslPlain(authzid, user, pass) + "\r\n")
		return c.ReadResponse(tag)
	}
	c.Send(tag + " AUTHENTICATE PLAIN\r\n")
	if l := c.ExpectContinuation(); l != "+ " && l != "+" {
		c.TB().Fatalf("AUTHENTICATE PLAIN: continuation %q, want \"+ \"", l)
	}
	c.Send(saslPlain(authzid, user, pass) + "\r\n")
	return c.ReadResponse(tag)
}

// authLogin runs AUTHENTICATE LOGIN, checking both challenges.
func authLogin(c *testkit.Client, user, pass string) testkit.Response {
	c.TB().Helper()
	tag := c.NextTag()
	c.Send(tag + " AUTHENTICATE LOGIN\r\n")
	if l := c.ExpectContinuation(); l != "+ VXNlcm5hbWU6" {
		c.TB().Fatalf("AUTHENTICATE LOGIN: first challenge %q, want %q", l, "+ VXNlcm5hbWU6")
	}
	c.Send(base64.StdEncoding.EncodeToString([]byte(user)) + "\r\n")
	if l := c.ExpectContinuation(); l != "+ UGFzc3dvcmQ6" {
		c.TB().Fatalf("AUTHENTICATE LOGIN: second challenge %q, want %q", l, "+ UGFzc3dvcmQ6")
	}
	c.Send(base64.StdEncoding.EncodeToString([]byte(pass)) + "\r\n")
	return c.ReadResponse(tag)
}
