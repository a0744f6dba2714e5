package proxy

import (
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// TestLogoutAfterForwardedAnswer: a LOGOUT pipelined behind a command is
// answered only once that command's tagged answer has reached the client.
// The pump takes an answer off the in-flight list before it passes the
// line on; a relay that counted itself quiet in between said BYE and the
// LOGOUT's OK first and then, the client said goodbye to, dropped the
// answer (TestFramingProperty saw it under load, a few times in a
// thousand sessions). Holding the client writer holds the pump in that
// gap for as long as the test needs.
func TestLogoutAfterForwardedAnswer(t *testing.T) {
	b := newFakeBackend(t)
	held := make(chan *fakeConn, 1)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "XHOLD" {
			return false
		}
		held <- c // answered by the test
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	sess := onlySession(t, p)
	rl := sess.rl.Load()
	if rl == nil {
		t.Fatal("the session is not relaying")
	}

	c.Send("a XHOLD\r\nb LOGOUT\r\n")
	var fc *fakeConn
	select {
	case fc = <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("XHOLD did not reach the backend")
	}
	sess.wmu.Lock()
	fc.write("a OK held\r\n")
	// The pump has the answer once it is off the list; it then waits for
	// the writer.
	deadline := time.Now().Add(5 * time.Second)
	for {
		rl.mu.Lock()
		n := len(rl.inflight)
		rl.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			sess.wmu.Unlock()
			t.Fatal("the pump did not take the answer to XHOLD")
		}
		time.Sleep(time.Millisecond)
	}
	quiet := rl.waitQuiet(0)
	sess.wmu.Unlock()
	if quiet {
		t.Error("the relay is quiet while the answer to a has not reached the client")
	}

	lines := c.ReadToEOF()
	want := []string{"a OK held", "* BYE", "b OK"}
	if len(lines) != len(want) {
		t.Fatalf("after XHOLD and LOGOUT the client read %q, want lines starting %q", lines, want)
	}
	for i, w := range want {
		if len(lines[i]) < len(w) || lines[i][:len(w)] != w {
			t.Fatalf("after XHOLD and LOGOUT the client read %q, want lines starting %q", lines, want)
		}
	}
}

// onlySession returns the server's one session.
func onlySession(t *testing.T, p *testProxy) *session {
	t.Helper()
	p.srv.mu.Lock()
	defer p.srv.mu.Unlock()
	if len(p.srv.sessions) != 1 {
		t.Fatalf("%d sessions, want 1", len(p.srv.sessions))
	}
	for sess := range p.srv.sessions {
		return sess
	}
	return nil
}
