package proxy

import (
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestClientLeavingIsNotABackendFailure: a client that vanishes in IDLE or
// in the middle of a FETCH makes the session cut its backend connection
// off. The pump's read then fails on a socket the session closed itself:
// that is the client's doing, logged at debug, not a WARN "backend
// connection lost" (TestChaos found one such WARN per aborted client).
func TestClientLeavingIsNotABackendFailure(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 1, Messages: 5, BigMessages: 1})
	user := dovecottest.UserName(1)
	for _, tc := range []struct{ name, mailbox, cmd, first string }{
		{"in IDLE", "INBOX", "IDLE", "+"},
		{"mid-FETCH", "Big", "FETCH 1 BODY[]", "* 1 FETCH"},
		// Gone before any answer, as TestChaos's aborting client.
		{"just after IDLE", "INBOX", "IDLE", ""},
		{"just after FETCH", "Big", "FETCH 1 BODY[]", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startProxy(t, []*dovecottest.Server{dc}, nil)
			c := testkit.Dial(t, p.addr)
			c.MustLogin(user, dc.PasswordOf(user))
			if res := c.Cmd("SELECT %s", tc.mailbox); !res.OK() {
				t.Fatalf("SELECT %s: %s", tc.mailbox, res)
			}
			c.Send("x " + tc.cmd + "\r\n")
			if tc.first != "" {
				if l := c.ReadLine(); !strings.HasPrefix(l, tc.first) {
					t.Fatalf("%s: got %q, want %s...", tc.cmd, l, tc.first)
				}
			}
			c.NetConn.Close()
			// The backend connection is dropped only once the pump has
			// ended and said what it had to say, and cached only once
			// it has stopped. (A FETCH whose answer fit in the socket
			// buffers before the client left was complete: cached.)
			deadline := time.Now().Add(5 * time.Second)
			for st := p.srv.Pool().Stats(); st.Open != st.Cached || st.Closing != 0; st = p.srv.Pool().Stats() {
				if time.Now().After(deadline) {
					t.Fatalf("the backend connection is neither dropped nor cached: %+v", st)
				}
				time.Sleep(2 * time.Millisecond)
			}
			logs := p.logs.String()
			for _, l := range strings.Split(logs, "\n") {
				if strings.Contains(l, "[WARN]") {
					t.Errorf("a client leaving %s was logged as a warning: %s", tc.name, l)
				}
			}
		})
	}
}
