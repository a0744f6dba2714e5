package logx

import (
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestEventLog: of N events of a kind in an interval, the first is
// logged at once and the rest as one line with their count and an
// example at the interval's end; kinds are counted apart; a quiet
// interval ends the run, so the next event is logged at once again.
func TestEventLog(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf testkit.SyncBuffer
		log := hclog.New(&hclog.LoggerOptions{Output: &buf, Level: hclog.Info, DisableTime: true})
		e := NewEvents(10 * time.Second)
		lines := func() []string {
			s := strings.TrimSpace(buf.String())
			if s == "" {
				return nil
			}
			return strings.Split(s, "\n")
		}
		const n = 10000
		for i := range n {
			l := With(log, "user", "u"+string(rune('a'+i%26)))
			e.Log(l, hclog.Warn, "no backend", "login failed: no backend reachable")
			if i%100 == 0 {
				e.Log(l, hclog.Info, "limit", "login refused: too many sessions for this user")
			}
		}
		if got := lines(); len(got) != 2 {
			t.Fatalf("after %d events: %d lines, want the first of each kind:\n%s", n, len(got), buf.String())
		}
		time.Sleep(10 * time.Second)
		synctest.Wait()
		got := lines()
		want := []string{
			"[WARN]  login failed: no backend reachable: user=ua",
			"[INFO]  login refused: too many sessions for this user: user=ua",
			"[WARN]  login failed: no backend reachable: user=up count=9999 interval=10s",
			"[INFO]  login refused: too many sessions for this user: user=uu count=99 interval=10s",
		}
		if len(got) != 4 || got[0] != want[0] || got[1] != want[1] || !(got[2] == want[2] && got[3] == want[3] || got[2] == want[3] && got[3] == want[2]) {
			t.Fatalf("lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		// A quiet interval: nothing to say, and the run ends.
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if got := lines(); len(got) != 4 {
			t.Fatalf("a quiet interval wrote:\n%s", strings.Join(got[4:], "\n"))
		}
		time.Sleep(time.Minute)
		e.Log(log, hclog.Warn, "no backend", "login failed: no backend reachable")
		if got := lines(); len(got) != 5 || got[4] != "[WARN]  login failed: no backend reachable" {
			t.Fatalf("an event after a quiet spell is not logged at once:\n%s", strings.Join(got, "\n"))
		}
		// close writes what is counted.
		e.Log(log, hclog.Warn, "no backend", "login failed: no backend reachable")
		e.Close()
		if got := lines(); len(got) != 6 || !strings.HasSuffix(got[5], "count=1 interval=10s") {
			t.Fatalf("close did not write the count:\n%s", strings.Join(got, "\n"))
		}
	})
}
