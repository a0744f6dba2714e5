package proxy

// Integration tests of TLS on both sides of the proxy: client STARTTLS and
// implicit TLS listeners with RequireTLSForLogin, and backend STARTTLS and
// implicit TLS to a Dovecot with a self-signed certificate.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

// startProxyListeners is startProxy with the backends given as they are,
// one listener per client TLS mode, and no capability probe (a test may
// mean its backend to fail). It returns the address of each listener.
func startProxyListeners(t testing.TB, bs []Backend, mod func(*Options), modes ...backend.TLSMode) (*testProxy, map[backend.TLSMode]string) {
	t.Helper()
	logs := &testkit.SyncBuffer{}
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Trace, Output: logs})
	opts := Options{
		Logger: log,
		Pool:   pool.New(pool.Options{Logger: log.Named("pool")}),
		Dialer: &upstream.Dialer{ForwardID: true, Timeout: 2 * time.Second},
	}
	if mod != nil {
		mod(&opts)
	}
	srv := New(opts)
	srv.SetBackends(bs)
	addrs := make(map[backend.TLSMode]string)
	var done []chan error
	for _, mode := range modes {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs[mode] = ln.Addr().String()
		ch := make(chan error, 1)
		done = append(done, ch)
		go func() { ch <- srv.Serve(ln, mode) }()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		for _, ch := range done {
			if err := <-ch; !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve: %v", err)
			}
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", logs.String())
		}
	})
	return &testProxy{srv: srv, addr: addrs[modes[0]], logs: logs}, addrs
}

// dialTLSClient connects to an implicit TLS listener.
func dialTLSClient(t testing.TB, addr string, cfg *tls.Config) *testkit.Client {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("tls dial %s: %v", addr, err)
	}
	c := testkit.NewClient(t, conn)
	c.Greeting = c.ReadLine()
	return c
}

func TestClientTLS(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 2})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	kit := testkit.NewCertT(t, "127.0.0.1")
	cert, roots := kit.KeyPair, kit.Roots
	p, addrs := startProxyListeners(t, []Backend{{ID: dc.Name, Addr: dc.Addr, Weight: 1}}, func(o *Options) {
		o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		o.RequireTLSForLogin = true
	}, TLSStartTLS, TLSImplicit)
	clientTLS := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}

	t.Run("cleartext refuses login", func(t *testing.T) {
		c := testkit.Dial(t, addrs[TLSStartTLS])
		for _, want := range []string{" STARTTLS", " LOGINDISABLED"} {
			if !strings.Contains(c.Greeting, want) {
				t.Errorf("greeting %q lacks %q", c.Greeting, want)
			}
		}
		if strings.Contains(c.Greeting, "AUTH=") {
			t.Errorf("greeting %q offers AUTH= mechanisms in the clear", c.Greeting)
		}
		if res := c.Login(user, pass); !strings.Contains(res.Tagged, " NO [PRIVACYREQUIRED]") {
			t.Fatalf("LOGIN in the clear: got %q, want NO [PRIVACYREQUIRED]", res)
		}
		if res := authPlain(c, "", user, pass, true); !strings.Contains(res.Tagged, " NO [PRIVACYREQUIRED]") {
			t.Fatalf("AUTHENTICATE in the clear: got %q, want NO [PRIVACYREQUIRED]", res)
		}
		if res := c.LoginLiteral(user, pass, false); !strings.Contains(res.Tagged, " NO [PRIVACYREQUIRED]") {
			t.Fatalf("LOGIN with literals in the clear: got %q, want NO [PRIVACYREQUIRED]", res)
		}
	})
	t.Run("STARTTLS then login", func(t *testing.T) {
		c := testkit.Dial(t, addrs[TLSStartTLS])
		c.StartTLS(clientTLS)
		res := c.Cmd("CAPABILITY")
		if !res.OK() || !res.Has(" AUTH=PLAIN") || res.Has("STARTTLS") || res.Has("LOGINDISABLED") {
			t.Fatalf("CAPABILITY after STARTTLS: %s", res)
		}
		if res := c.Cmd("STARTTLS"); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("second STARTTLS: got %q, want BAD", res)
		}
		c.MustLogin(user, pass)
		if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 2") {
			t.Fatalf("STATUS over TLS: %s", res)
		}
		if st := c.NetConn.(*tls.Conn).ConnectionState(); !st.HandshakeComplete {
			t.Fatal("no TLS handshake")
		}
		c.Logout()
		p.waitCached(t, 1)
	})
	t.Run("STARTTLS with a pipelined command", func(t *testing.T) {
		// A command sent in the clear behind STARTTLS could have been
		// injected: the proxy must not run it.
		c := testkit.Dial(t, addrs[TLSStartTLS])
		c.Send("s1 STARTTLS\r\ns2 LOGIN " + testkit.Quote(user) + " " + testkit.Quote(pass) + "\r\n")
		lines := c.ReadToEOF()
		if len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE") {
			t.Fatalf("STARTTLS with a command behind it: got %q, want only * BYE and close", lines)
		}
	})
	t.Run("implicit TLS", func(t *testing.T) {
		c := dialTLSClient(t, addrs[TLSImplicit], clientTLS)
		if !strings.HasPrefix(c.Greeting, "* OK ") || strings.Contains(c.Greeting, "STARTTLS") || strings.Contains(c.Greeting, "LOGINDISABLED") || !strings.Contains(c.Greeting, "AUTH=PLAIN") {
			t.Fatalf("greeting over implicit TLS: %q", c.Greeting)
		}
		if res := c.Cmd("STARTTLS"); !strings.Contains(res.Tagged, " BAD ") {
			t.Fatalf("STARTTLS on an implicit TLS listener: got %q, want BAD", res)
		}
		c.MustLogin(user, pass)
		c.Logout()
	})
	t.Run("implicit TLS, wrong certificate", func(t *testing.T) {
		cfg := clientTLS.Clone()
		cfg.RootCAs = x509.NewCertPool()
		conn, err := tls.Dial("tcp", addrs[TLSImplicit], cfg)
		if err == nil {
			conn.Close()
			t.Fatal("handshake with an untrusted certificate succeeded")
		}
		var uerr x509.UnknownAuthorityError
		if !errors.As(err, &uerr) {
			t.Fatalf("handshake: %v, want an unknown authority error", err)
		}
	})
	p.waitIdle(t)
	waitLoginsFor(t, dc, user, 1)
}

func TestBackendTLS(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 4, Messages: 1, TLS: true, ImplicitTLSPort: -1})
	if dc.TLSAddr == "" || len(dc.CertPEM) == 0 {
		t.Fatalf("dovecot without TLS: TLSAddr %q, %d bytes of certificate", dc.TLSAddr, len(dc.CertPEM))
	}
	trusted := x509.NewCertPool()
	if !trusted.AppendCertsFromPEM(dc.CertPEM) {
		t.Fatal("cannot parse dc.CertPEM")
	}
	cases := []struct {
		name    string
		backend Backend
		dialTLS backend.TLSMode // Dialer.TLS
		roots   *x509.CertPool
		ok      bool
	}{
		{"STARTTLS", Backend{Addr: dc.Addr}, TLSStartTLS, trusted, true},
		{"implicit", Backend{Addr: dc.TLSAddr, TLS: TLSImplicit}, "", trusted, true},
		{"STARTTLS, wrong CA", Backend{Addr: dc.Addr}, TLSStartTLS, x509.NewCertPool(), false},
		{"implicit, wrong CA", Backend{Addr: dc.TLSAddr, TLS: TLSImplicit}, "", x509.NewCertPool(), false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			user := dovecottest.UserName(i + 1)
			pass := dc.PasswordOf(user)
			b := tc.backend
			b.ID, b.Weight = dc.Name, 1
			p, _ := startProxyListeners(t, []Backend{b}, func(o *Options) {
				o.Dialer.TLS = tc.dialTLS
				o.Dialer.TLSConfig = &tls.Config{RootCAs: tc.roots, MinVersion: tls.VersionTLS12}
			}, TLSNone)
			c := testkit.Dial(t, p.addr)
			res := c.Login(user, pass)
			if !tc.ok {
				if !strings.Contains(res.Tagged, " NO [UNAVAILABLE]") {
					t.Fatalf("LOGIN through an untrusted backend: got %q, want NO [UNAVAILABLE]", res)
				}
				if logs := p.logs.String(); !regexp.MustCompile(`\[(WARN|ERROR)\].* error=".*certificate`).MatchString(logs) {
					t.Fatalf("proxy log does not name the certificate error:\n%s", logs)
				}
				if n := countLoginsFor(t, dc, user); n != 0 {
					t.Fatalf("Dovecot saw %d logins through an untrusted connection", n)
				}
				if st := p.srv.Pool().Stats(); st.Open != 0 {
					t.Fatalf("open = %d after the failed dial, want 0", st.Open)
				}
				return
			}
			if !res.OK() {
				t.Fatalf("LOGIN: %s", res)
			}
			if res := c.Cmd("STATUS INBOX (MESSAGES)"); !res.OK() || !res.Has("MESSAGES 1") {
				t.Fatalf("STATUS: %s", res)
			}
			c.Logout()
			p.waitCached(t, 1)
			waitLoginsFor(t, dc, user, 1)
			// Dovecot marks a login over TLS with "TLS" (a trusted
			// cleartext one with "secured").
			line := regexp.MustCompile(`(?m)^.* Login: user=<` + user + `>.*$`).FindString(dc.Log())
			if !strings.Contains(line, ", TLS,") {
				t.Fatalf("Dovecot login line %q does not say TLS", line)
			}
			// The cached TLS connection passes the liveness check.
			c = testkit.Dial(t, p.addr)
			if res := c.MustLogin(user, pass); !res.Has("[XPROXYREUSE]") {
				t.Fatalf("second login not reused:\n%s", res)
			}
			c.Logout()
			p.waitCached(t, 1)
		})
	}
}
