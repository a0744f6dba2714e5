package dovecottest

import (
	"os"
	"testing"
)

// RequireEnv, set to "1", turns StartT's skip (no dovecot binary, not
// root) into a failure, for CI.
const RequireEnv = "IMAPPROXY_REQUIRE_DOVECOT"

// StartT starts an instance for a test and stops it in t.Cleanup. Without
// a dovecot binary (or root) the test is skipped, unless
// IMAPPROXY_REQUIRE_DOVECOT=1, when it fails. If the test failed, the tail
// of Dovecot's log is logged before the stop.
func StartT(t testing.TB, opts Options) *Server {
	t.Helper()
	skipUnlessAvailable(t)
	s, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("dovecot %s log tail:\n%s", s.Name, s.tail())
		}
		if err := s.Stop(); err != nil {
			t.Errorf("stop dovecot %s: %v", s.Name, err)
		}
	})
	return s
}

// skipUnlessAvailable skips t (or fails it, with IMAPPROXY_REQUIRE_DOVECOT=1)
// when Start could not work here.
func skipUnlessAvailable(t testing.TB) {
	t.Helper()
	_, err := Binary()
	if err == nil && os.Geteuid() != 0 {
		err = ErrNotRoot
	}
	if err == nil {
		return
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%v (%s=1)", err, RequireEnv)
	}
	t.Skipf("%v (set %s=1 to fail instead)", err, RequireEnv)
}
