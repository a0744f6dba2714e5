package proxy

import (
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestLoginInFlightWhenSetEmpties: a login under way when its backend
// leaves, and no backend is left, is answered as the next login is: "No
// IMAP server available", not "IMAP server unreachable".
func TestLoginInFlightWhenSetEmpties(t *testing.T) {
	a := newFakeBackend(t)
	inLogin, release := make(chan struct{}), make(chan struct{})
	a.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "AUTHENTICATE" {
			return false
		}
		close(inLogin)
		<-release
		c.write(tag + " OK [CAPABILITY " + a.postCaps + "] Logged in\r\n")
		return true
	}
	p := startClusterProxy(t, []string{a.addr()}, nil)
	done := make(chan testkit.Response, 1)
	c := testkit.Dial(t, p.addr)
	go func() { done <- c.Login("alice", "secret") }()
	<-inLogin
	p.srv.SetBackends(nil)
	close(release)
	res := <-done
	next := testkit.Dial(t, p.addr).Login("alice", "secret")
	text := func(r testkit.Response) string { _, s, _ := strings.Cut(r.Tagged, " "); return s }
	if text(res) != text(next) || !strings.Contains(text(next), "No IMAP server available") {
		t.Errorf("login in flight got %q, the next login %q; want the same, No IMAP server available", res.Tagged, next.Tagged)
	}
	p.settle(t)
	if st := p.srv.Pool().Stats(); st.Open != 0 {
		t.Errorf("open upstream conns = %d, want 0", st.Open)
	}
}
