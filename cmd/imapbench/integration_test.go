package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

// TestDovecot runs every workload against a real Dovecot: users
// user0001..user0005 (password "pw-USER"), 20 messages in INBOX and one
// ~1 MiB message in "Big".
func TestDovecot(t *testing.T) {
	srv := dovecottest.StartT(t, dovecottest.Options{Name: "backend-3", Users: 5, Messages: 20, BigMessages: 1})
	common := []string{"-users", "user0001-user0005", "-password-pattern", "pw-%s", "-c", "3"}
	if got := srv.PasswordOf(dovecottest.UserName(2)); got != "pw-user0002" {
		t.Fatalf("password of user0002 = %q; the flags below assume pw-USER", got)
	}

	t.Run("webmail", func(t *testing.T) {
		before, err := srv.Logins()
		if err != nil {
			t.Fatal(err)
		}
		s := benchRun(t, srv.Addr, append(common, "-workload", "webmail", "-count", "30")...)
		expectClean(t, s, 30)
		expectBackends(t, s, map[string]int64{"backend-3": 30})
		if s.Messages != 30*20 || s.Logins != 30 {
			t.Errorf("messages, logins = %d, %d; want 600, 30", s.Messages, s.Logins)
		}
		if s.CycleMS.P50 <= 0 || s.CycleMS.P50 > s.CycleMS.P99 || s.CycleMS.P99 > s.CycleMS.Max || s.LoginMS.Max > s.CycleMS.Max {
			t.Errorf("inconsistent latencies: cycle %+v, login %+v", s.CycleMS, s.LoginMS)
		}
		if got, err := srv.WaitLogins(before+30, 5e9); err != nil || got != before+30 {
			t.Errorf("Dovecot logged %d logins (%v), want %d", got-before, err, 30)
		}
	})
	t.Run("login with ID", func(t *testing.T) {
		s := benchRun(t, srv.Addr, append(common, "-workload", "login", "-count", "20", "-id")...)
		expectClean(t, s, 20)
		expectBackends(t, s, map[string]int64{"backend-3": 20})
	})
	t.Run("bulk", func(t *testing.T) {
		s := benchRun(t, srv.Addr, append(common, "-workload", "bulk", "-count", "6")...)
		expectClean(t, s, 6)
		if s.Bytes <= 6<<20 || s.Messages != 6 || s.MBPerS <= 0 {
			t.Errorf("bytes %d, messages %d, MB/s %v; want > 6 MiB, 6, > 0", s.Bytes, s.Messages, s.MBPerS)
		}
	})
	t.Run("idle", func(t *testing.T) {
		signal := filepath.Join(t.TempDir(), "held")
		s := benchRun(t, srv.Addr, append(common, "-workload", "idle", "-sessions", "8", "-idle-hold", "300ms", "-idle-signal", signal)...)
		expectClean(t, s, 8)
		if s.Held != 8 {
			t.Errorf("held = %d, want 8", s.Held)
		}
		expectBackends(t, s, map[string]int64{"backend-3": 8})
		if _, err := os.Stat(signal); !os.IsNotExist(err) {
			t.Errorf("signal file after the hold: %v, want it removed", err)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		s := benchRun(t, srv.Addr, "-users", "user0001-user0005", "-password", "wrong", "-c", "2", "-count", "4")
		if s.Cycles != 0 || s.Errors["login_no"] != 4 || len(s.Errors) != 1 {
			t.Errorf("cycles %d, errors %v; want 0 and login_no:4", s.Cycles, s.Errors)
		}
	})
	t.Run("report", func(t *testing.T) {
		var out, errOut strings.Builder
		code := runMain([]string{"-addr", srv.Addr, "-users", "user0001-user0005", "-password-pattern", "pw-%s",
			"-workload", "idle", "-sessions", "2", "-c", "2", "-idle-hold", "0s"}, &out, &errOut)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errOut.String())
		}
		for _, want := range []string{`latency ms +p50 +p90 +p99 +max`, `\nbackends +backend-3=2\n`, `\nheld 2\n\{"workload":"idle",.*"held":2,`} {
			if !regexp.MustCompile(want).MatchString(out.String()) {
				t.Errorf("stdout does not match %q:\n%s", want, out.String())
			}
		}
		if !strings.Contains(errOut.String(), "holding 2 sessions") {
			t.Errorf("stderr = %q, want a holding line", errOut.String())
		}
	})
}
