package logx

import (
	"bytes"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestFieldLogger(t *testing.T) {
	var out bytes.Buffer
	base := hclog.New(&hclog.LoggerOptions{Output: &out, Level: hclog.Info, DisableTime: true})
	sess := With(base, "session", "s1", "client", "127.0.0.1:1")
	// Two users derived from one session must not share their fields
	// (append into a shared array would give both the last user).
	a := With(sess, "user", "alice")
	b := sess.With("user", "bob")

	a.Info("login", "reused", true)
	b.Warn("login failed")
	sess.Debug("hidden")
	want := []string{
		"[INFO]  login: session=s1 client=127.0.0.1:1 user=alice reused=true",
		"[WARN]  login failed: session=s1 client=127.0.0.1:1 user=bob",
	}
	got := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(got) != len(want) {
		t.Fatalf("logged %q, want %q", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("line %d = %q, want %q", i, got[i], want[i])
		}
	}

	// A level set on the server's logger (a reload) reaches derived ones.
	out.Reset()
	base.SetLevel(hclog.Debug)
	a.Debug("now shown")
	if !strings.Contains(out.String(), "now shown: session=s1 client=127.0.0.1:1 user=alice") {
		t.Errorf("after SetLevel(Debug): %q", out.String())
	}
	if got := a.ImpliedArgs(); len(got) != 6 || got[5] != "alice" {
		t.Errorf("ImpliedArgs = %v", got)
	}
}

// A line below the level costs nothing: sessions log at debug level on
// every command path.
func TestFieldLoggerDisabledAllocs(t *testing.T) {
	base := hclog.New(&hclog.LoggerOptions{Output: &bytes.Buffer{}, Level: hclog.Info})
	l := With(base, "session", "s1", "user", "alice")
	allocs := testing.AllocsPerRun(100, func() { l.Debug("not caching", "reason", "selected") })
	if allocs != 0 {
		t.Errorf("Debug below the level: %v allocations, want 0", allocs)
	}
}
