package proxy

import (
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestOutageLogsBounded: logins refused during an outage (no backend in
// the set) write one line, not one each.
func TestOutageLogsBounded(t *testing.T) {
	p := startServer(t, nil, false, nil)
	const n = 200
	for range n {
		c := testkit.Dial(t, p.addr)
		if res := c.Login("alice", "secret"); !strings.Contains(res.Tagged, "NO [UNAVAILABLE]") {
			t.Fatalf("login during the outage: %q", res.Tagged)
		}
		c.NetConn.Close()
	}
	if k := strings.Count(p.logs.String(), "login failed: no backend available"); k != 1 {
		t.Errorf("%d lines for %d refused logins, want 1 until the interval ends", k, n)
	}
}
