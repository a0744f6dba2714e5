package proxy

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestTrace traces one user against Dovecot: the file has the user's
// commands and responses, from a session that was running when the trace
// started and from one that logged in later (cached connection), but no
// password, no literal contents (the mail), and nothing of another user.
func TestTrace(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 2})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	u, other := dc.Users()[0], dc.Users()[1]
	path := filepath.Join(t.TempDir(), "trace.log")

	early := testkit.Dial(t, p.addr)
	early.MustLogin(u, dc.PasswordOf(u))
	if err := p.srv.StartTrace(strings.ToUpper(u), path); err != nil {
		t.Fatal(err)
	}
	if err := p.srv.StartTrace(u, path+"2"); !errors.Is(err, ErrTraceActive) {
		t.Errorf("second StartTrace: %v, want ErrTraceActive", err)
	}
	if res := early.Cmd("SELECT INBOX"); !res.OK() {
		t.Fatal(res)
	}
	early.Logout()

	c := testkit.Dial(t, p.addr)
	c.MustLogin(u, dc.PasswordOf(u))
	if res := c.Cmd("EXAMINE INBOX"); !res.OK() {
		t.Fatal(res)
	}
	if res := c.Cmd("UID FETCH 1 (BODY.PEEK[])"); !res.OK() {
		t.Fatal(res)
	}
	// Refused after login, but the line carries a password.
	if res := c.Cmd("LOGIN %s %s", u, testkit.Quote(dc.PasswordOf(u))); res.OK() {
		t.Fatal("LOGIN after login accepted")
	}
	c.Logout()

	o := testkit.Dial(t, p.addr)
	o.MustLogin(other, dc.PasswordOf(other))
	o.Cmd("SELECT INBOX")
	o.Logout()

	info, err := p.srv.StopTrace(u)
	if err != nil {
		t.Fatal(err)
	}
	if info.Bytes == 0 || info.Path != path {
		t.Errorf("StopTrace = %+v", info)
	}
	if _, err := p.srv.StopTrace(u); !errors.Is(err, ErrNoTrace) {
		t.Errorf("second StopTrace: %v, want ErrNoTrace", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	trace := string(b)
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("trace file mode: %v %v, want 0600", st.Mode(), err)
	}
	for _, want := range []string{
		"C: t2 SELECT INBOX",  // the session running when the trace began
		"C: t2 EXAMINE INBOX", // the later one
		"S: * 2 EXISTS",
		"C: t3 UID FETCH 1 (BODY.PEEK[])",
		"not traced]", // the message literal
		"C: t4 [a login command, not traced]",
		"logged in on backend-1",
		"-- trace stopped",
	} {
		if !strings.Contains(trace, want) {
			t.Errorf("trace has no %q:\n%s", want, trace)
		}
	}
	for _, bad := range []string{dc.PasswordOf(u), dc.PasswordOf(other), "Subject: msg 1", other} {
		if strings.Contains(trace, bad) {
			t.Errorf("trace contains %q:\n%s", bad, trace)
		}
	}
}
