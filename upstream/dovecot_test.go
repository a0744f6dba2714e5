package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

// dovecotPasswords: user0001 has a password that LOGIN must quote,
// user0002 one that it must send as a literal (8-bit), the rest the
// default.
func dovecotPasswords(user string) string {
	switch user {
	case dovecottest.UserName(1):
		return `s p"a\ce {5}`
	case dovecottest.UserName(2):
		return "p\xc3\xa4ss w\xc3\xb6rd"
	}
	return "pw-" + user
}

// TestDovecotLogin logs in to a real Dovecot by each method, with and
// without ID, then checks, cleans up and logs out as the proxy does
// before caching and closing a connection.
func TestDovecotLogin(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 8, Messages: 1, Password: dovecotPasswords})
	b := backend.Backend{ID: dc.Name, Addr: dc.Addr}
	tests := []struct {
		user   int
		method string
		id     []byte
	}{
		{1, "login", nil},
		{1, "plain", nil},
		{2, "login", nil},
		{2, "auto", []byte(`("name" "imapproxy" "x-originating-ip" "192.0.2.1")`)},
		{3, "login", []byte(`("name" "imapproxy")`)},
		{4, "plain", []byte(`("name" "imapproxy")`)},
	}
	for _, tt := range tests {
		user := dovecottest.UserName(tt.user)
		t.Run(user+" "+tt.method, func(t *testing.T) {
			before, err := dc.LoginsFor(user)
			if err != nil {
				t.Fatal(err)
			}
			d := &Dialer{LoginMethod: tt.method, Timeout: 5 * time.Second}
			ctx := context.Background()
			c, err := d.Dial(ctx, b)
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Abort()
			if !HasCap(c.PreCaps(), "AUTH=PLAIN") || c.BackendID() != dc.Name {
				t.Fatalf("PreCaps %q, BackendID %q: want Dovecot's list with AUTH=PLAIN, %q", c.PreCaps(), c.BackendID(), dc.Name)
			}
			res, err := c.Login(ctx, &Credentials{User: []byte(user), Pass: []byte(dc.PasswordOf(user))}, tt.id)
			if err != nil || !res.OK {
				t.Fatalf("Login = %+v (%s), %v", res, res.Text, err)
			}
			if !HasCap(c.PostCaps(), "UNSELECT") || HasCap(c.PostCaps(), "AUTH=PLAIN") {
				t.Errorf("PostCaps = %q, want the logged-in list", c.PostCaps())
			}
			if err := c.Check(ctx); err != nil {
				t.Fatalf("Check of a fresh login: %v", err)
			}
			// The relay's clean-up before caching, with nothing selected.
			cmd, want := c.CleanupCommand(false)
			tag := c.NextTag()
			c.WriteCommand(tag, cmd)
			if err := c.Writer().Flush(); err != nil {
				t.Fatal(err)
			}
			status, _, err := c.readTagged(tag, nil)
			c.NetConn().SetDeadline(time.Time{})
			if err != nil || status != want {
				t.Fatalf("%s answered %q, %v; want %s", cmd, status, err, want)
			}
			if err := c.Check(ctx); err != nil {
				t.Fatalf("Check after the clean-up: %v", err)
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if n := waitLoginsFor(t, dc, user, before+1); n != before+1 {
				t.Errorf("Dovecot logged %d logins of %s, want 1", n-before, user)
			}
		})
	}
	t.Run("wrong password", func(t *testing.T) {
		for _, method := range []string{"login", "plain"} {
			c, err := (&Dialer{LoginMethod: method}).Dial(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			// Differs from user0001's only in an escaped byte.
			res, err := c.Login(context.Background(), &Credentials{User: []byte(dovecottest.UserName(1)), Pass: []byte(`s p"ace {5}`)}, nil)
			c.Close()
			if err != nil || res.OK || res.Status != "NO" || !strings.Contains(string(res.Text), "AUTHENTICATIONFAILED") {
				t.Errorf("%s with a wrong password: %+v (%s), %v; want NO [AUTHENTICATIONFAILED]", method, res, res.Text, err)
			}
		}
	})
}

// TestDovecotTLS dials Dovecot by STARTTLS and by implicit TLS, trusting
// its certificate, and fails to with the wrong roots.
func TestDovecotTLS(t *testing.T) {
	t.Parallel()
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 1, TLS: true, ImplicitTLSPort: -1})
	trusted := x509.NewCertPool()
	if !trusted.AppendCertsFromPEM(dc.CertPEM) {
		t.Fatal("cannot parse dc.CertPEM")
	}
	tests := []struct {
		name  string
		b     backend.Backend
		mode  backend.TLSMode // Dialer.TLS
		roots *x509.CertPool
		ok    bool
	}{
		{"STARTTLS", backend.Backend{Addr: dc.Addr}, backend.TLSStartTLS, trusted, true},
		{"implicit", backend.Backend{Addr: dc.TLSAddr, TLS: backend.TLSImplicit}, "", trusted, true},
		{"STARTTLS, wrong CA", backend.Backend{Addr: dc.Addr}, backend.TLSStartTLS, x509.NewCertPool(), false},
		{"implicit, wrong CA", backend.Backend{Addr: dc.TLSAddr, TLS: backend.TLSImplicit}, "", x509.NewCertPool(), false},
	}
	user := dovecottest.UserName(1)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &Dialer{TLS: tt.mode, TLSConfig: &tls.Config{RootCAs: tt.roots, MinVersion: tls.VersionTLS12}}
			tt.b.ID = dc.Name
			c, err := d.Dial(context.Background(), tt.b)
			if !tt.ok {
				var uerr x509.UnknownAuthorityError
				if err == nil {
					c.Abort()
					t.Fatal("Dial through an untrusted certificate succeeded")
				}
				if !strings.Contains(err.Error(), "certificate") || !errors.As(err, &uerr) {
					t.Fatalf("Dial: %v, want an unknown authority error", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Abort()
			if _, ok := c.NetConn().(*tls.Conn); !ok {
				t.Fatalf("NetConn is %T, want *tls.Conn", c.NetConn())
			}
			if HasCap(c.PreCaps(), "STARTTLS") || HasCap(c.PreCaps(), "LOGINDISABLED") {
				t.Errorf("PreCaps over TLS = %q: still the cleartext list", c.PreCaps())
			}
			res, err := c.Login(context.Background(), &Credentials{User: []byte(user), Pass: []byte(dc.PasswordOf(user))}, nil)
			if err != nil || !res.OK {
				t.Fatalf("Login = %+v, %v", res, err)
			}
			if err := c.Check(context.Background()); err != nil {
				t.Fatalf("Check: %v", err)
			}
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
		})
	}
}

// waitLoginsFor polls Dovecot's log until it shows want logins of user, or
// five seconds pass, and returns the last count: the log is written
// after the login is answered.
func waitLoginsFor(t *testing.T, dc *dovecottest.Server, user string, want int) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := dc.LoginsFor(user)
		if err != nil {
			t.Fatal(err)
		}
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}
