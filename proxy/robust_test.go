package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/session"
)

// hugeLine is a response line far over any buffer, with the traps a
// relay that framed it wrongly would fall into: quoted braces and escaped
// quotes throughout, and a literal announced at its very end.
func hugeLine(n int) string {
	var b strings.Builder
	b.WriteString("* 1 FETCH (ENVELOPE (NIL \"subject {5}\" ((")
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "(\"R\\\"%d {3}\" NIL \"u%d\" \"example.org\")", i, i)
	}
	b.WriteString(")) NIL) BODY[] {5}\r\nhello)\r\n")
	return b.String()
}

// TestHugeResponseLine: IMAP responses have no length limit (a SEARCH of
// a large mailbox, the ENVELOPE of a message to thousands of recipients).
// A 4 MiB line reaches the client byte for byte, the literal at its end
// is framed, the session goes on and its connection is cached, and the
// proxy does not hold the line in memory while passing it on.
func TestHugeResponseLine(t *testing.T) {
	line := hugeLine(4 << 20)
	raw := []byte(line)
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "FETCH" {
			return false
		}
		c.conn.Write(raw) // no copy: the test measures allocations
		c.write(tag + " OK fetched\r\n")
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Cmd("SELECT INBOX")

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c.Send("f1 FETCH 1 (ENVELOPE BODY[])\r\n")
	// Read as a hash, not a string: the test's own memory must not hide
	// the proxy's.
	h := sha256.New()
	br := bufio.NewReaderSize(c.R, 64<<10)
	if _, err := io.CopyN(h, br, int64(len(line))); err != nil {
		t.Fatalf("reading the long line: %v", err)
	}
	runtime.ReadMemStats(&after)
	if got, want := fmt.Sprintf("%x", h.Sum(nil)), fmt.Sprintf("%x", sha256.Sum256([]byte(line))); got != want {
		t.Fatal("the long line reached the client changed")
	}
	c.R = br
	if got := c.ReadLine(); got != "f1 OK fetched" {
		t.Fatalf("after the long line: %q", got)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
		t.Errorf("passing a %d-byte line allocated %d bytes", len(line), alloc)
	}
	if res := c.Cmd("NOOP"); !res.OK() {
		t.Fatalf("NOOP after the long line: %s", res)
	}
	c.Logout()
	p.waitCached(t, 1)
}

// TestUpstreamWriteAfterQuietSpell: after a quiet spell longer than the
// write timeout, a command line over the writer's buffer (a "mark all
// read" UID STORE) and a pipelined burst over it both reach the backend:
// every write toward the backend gets a fresh deadline.
func TestUpstreamWriteAfterQuietSpell(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "UID" {
			return false
		}
		c.write(tag + " OK stored\r\n")
		return true
	}
	p := startFakeProxy(t, b, func(o *Options) { o.WriteTimeout = 100 * time.Millisecond })
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Cmd("SELECT INBOX")
	quiet := func() {
		// The quiet spell is the scenario, not synchronisation.
		time.Sleep(300 * time.Millisecond)
	}
	quiet()
	var set strings.Builder
	for i := 1; set.Len() < 10000; i += 2 {
		fmt.Fprintf(&set, "%d,", i)
	}
	if res := c.Cmd("UID STORE %s1 +FLAGS (\\Seen)", set.String()); !res.OK() {
		t.Fatalf("long UID STORE after a quiet spell: %s", res)
	}
	quiet()
	var burst strings.Builder
	for i := 0; i < 200; i++ {
		fmt.Fprintf(&burst, "p%d UID STORE %d +FLAGS (\\Seen)\r\n", i, i+1)
	}
	c.Send(burst.String())
	for i := 0; i < 200; i++ {
		if res := c.ReadResponse(fmt.Sprintf("p%d", i)); !res.OK() {
			t.Fatalf("pipelined command %d after a quiet spell: %s", i, res)
		}
	}
}

// TestTagReuse: a client that uses one tag for everything, pipelining a
// command with a synchronising literal behind another with the same tag.
// The first command's answer must not be taken for the refusal of the
// literal (the body would then be read as commands).
func TestTagReuse(t *testing.T) {
	b := newFakeBackend(t)
	appended := make(chan string, 1)
	b.hook = func(c *fakeConn, tag, cmd, line string) bool {
		if cmd != "APPEND" {
			return false
		}
		c.write("+ OK\r\n")
		buf := make([]byte, 7) // "hello" CRLF
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return true
		}
		appended <- string(buf)
		c.write(tag + " OK appended\r\n")
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("a NOOP\r\na APPEND INBOX {5}\r\n")
	if l := c.ReadLine(); l != "a OK NOOP done" {
		t.Fatalf("first answer %q", l)
	}
	if l := c.ReadLine(); !strings.HasPrefix(l, "+") {
		t.Fatalf("got %q, want the continuation for the literal", l)
	}
	c.Send("hello\r\n")
	select {
	case got := <-appended:
		if got != "hello\r\n" {
			t.Fatalf("backend got literal %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the literal never reached the backend")
	}
	if l := c.ReadLine(); l != "a OK appended" {
		t.Fatalf("APPEND answer %q", l)
	}
	if res := c.Cmd("NOOP"); !res.OK() {
		t.Fatalf("NOOP after: %s", res)
	}
}

// TestAmbiguousFramingNotCached lists what leaves the relay unsure of the
// backend's state or framing; each must make the connection uncacheable.
func TestAmbiguousFramingNotCached(t *testing.T) {
	tests := []struct {
		name   string
		client string // sent after login; answered by the fake as given
		answer func(tag string) string
		wait   string // the line to read up to
	}{
		{"literal on NOOP", "n NOOP {5+}\r\nhello\r\n", nil, "n OK"},
		{"tag reused in flight", "r SELECT INBOX\r\nr NOOP\r\n", nil, "r OK NOOP"},
		{"unsolicited continuation", "x XYZZY\r\n", func(tag string) string { return "+ go on\r\n" + tag + " OK done\r\n" }, "x OK"},
		{"literal in response text", "x XYZZY\r\n", func(tag string) string { return "* OK [ALERT] see {5}\r\n" + tag + " OK done\r\n" }, "x OK"},
		{"literal in tagged text", "x XYZZY\r\n", func(tag string) string { return tag + " NO no such thing {2}\r\n" }, "x NO"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t)
			b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
				if cmd != "XYZZY" {
					return false
				}
				c.write(tt.answer(tag))
				return true
			}
			p := startFakeProxy(t, b, nil)
			c := testkit.Dial(t, p.addr)
			c.MustLogin("alice", "secret")
			c.Send(tt.client)
			for {
				if l := c.ReadLine(); strings.HasPrefix(l, tt.wait) {
					break
				}
			}
			// The stream is still framed: the next command is answered.
			if res := c.Cmd("NOOP"); !res.OK() {
				t.Fatalf("NOOP after: %s", res)
			}
			c.Logout()
			p.waitIdle(t)
			if n := p.srv.Pool().Stats().Cached; n != 0 {
				t.Errorf("cached %d connections, want none", n)
			}
		})
	}
}

// TestStalledBackend: a backend that stops in the middle of an answer (a
// stopped process, an NFS stall) ends the session after the response
// timeout with a clear BYE, and gives back everything; one that owes
// nothing (a session in IDLE) may stay silent for as long as it likes.
func TestStalledBackend(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		switch cmd {
		case "FETCH":
			c.write("* 1 FETCH (BODY[] {100000}\r\n" + strings.Repeat("x", 1000))
			return true // and nothing more
		case "IDLE":
			c.write("+ idling\r\n")
			if l, err := c.r.ReadString('\n'); err == nil && strings.TrimSpace(l) == "DONE" {
				c.write(tag + " OK idle done\r\n")
			}
			return true
		}
		return false
	}
	p := startFakeProxy(t, b, func(o *Options) { o.ResponseTimeout = 200 * time.Millisecond })

	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("i IDLE\r\n")
	if l := c.ReadLine(); l != "+ idling" {
		t.Fatalf("IDLE: %q", l)
	}
	// Longer than the response timeout: the scenario, not
	// synchronisation.
	time.Sleep(600 * time.Millisecond)
	c.Send("DONE\r\n")
	if l := c.ReadLine(); l != "i OK idle done" {
		t.Fatalf("IDLE answer after a quiet spell: %q", l)
	}

	start := time.Now()
	c.Send("f FETCH 1 BODY[]\r\n")
	var last string
	for {
		l, err := c.R.ReadString('\n')
		if err != nil {
			break
		}
		last = l
	}
	if !strings.HasSuffix(last, "* BYE [UNAVAILABLE] IMAP server not responding\r\n") {
		t.Fatalf("last line %q, want the BYE", last)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("session ended %v after the stall", d)
	}
	p.waitIdle(t)
	if st := p.srv.Pool().Stats(); st.Open != 0 {
		t.Errorf("pool stats %+v: slot not given back", st)
	}
}

// TestClientLeavesDuringStall: a client that leaves while its backend
// stalls mid-answer frees its session, both sockets and its slot at once,
// not after the response timeout.
func TestClientLeavesDuringStall(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "FETCH" {
			return false
		}
		c.write("* 1 FETCH (BODY[] {100000}\r\n" + strings.Repeat("x", 1000))
		return true
	}
	p := startFakeProxy(t, b, func(o *Options) { o.ResponseTimeout = time.Hour })
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("f FETCH 1 BODY[]\r\n")
	if l := c.ReadLine(); !strings.HasPrefix(l, "* 1 FETCH") {
		t.Fatalf("got %q", l)
	}
	c.NetConn.Close()
	p.waitIdle(t) // fails after 5 s
	if st := p.srv.Pool().Stats(); st.Open != 0 {
		t.Errorf("pool stats %+v: slot not given back", st)
	}
}

// TestCapabilityFiltered: after login the client sees one capability
// list however it asks (the login OK, CAPABILITY, a [CAPABILITY] code),
// without what the proxy cannot relay.
func TestCapabilityFiltered(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "XCAPS" {
			return false
		}
		c.write("* OK [CAPABILITY " + b.postCaps + "] now\r\n" + tag + " OK [CAPABILITY " + b.postCaps + "] done\r\n")
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	login := c.MustLogin("alice", "secret")
	_, after, _ := strings.Cut(login.Tagged, "[CAPABILITY ")
	want, _, _ := strings.Cut(after, "]")
	res := c.Cmd("CAPABILITY")
	if len(res.Untagged) != 1 || res.Untagged[0] != "* CAPABILITY "+want {
		t.Errorf("CAPABILITY = %q, want %q as on the login OK", res.Untagged, want)
	}
	res = c.Cmd("XCAPS")
	for _, l := range append(res.Untagged, res.Tagged) {
		if !strings.Contains(l, "[CAPABILITY "+want+"]") {
			t.Errorf("%q: code not the login's list %q", l, want)
		}
	}
	if strings.Contains(res.String(), "COMPRESS") || strings.Contains(want, "COMPRESS") {
		t.Errorf("COMPRESS offered after login: %s", res)
	}
}

// TestDrainLetsAppendFinish: a shutdown while a client uploads a message
// lets the upload and its command finish, then says goodbye.
func TestDrainLetsAppendFinish(t *testing.T) {
	b := newFakeBackend(t)
	half := make(chan struct{})
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "APPEND" {
			return false
		}
		c.write("+ OK\r\n")
		buf := make([]byte, 1002)
		if _, err := io.ReadFull(c.r, buf[:500]); err != nil {
			return true
		}
		close(half)
		if _, err := io.ReadFull(c.r, buf[500:]); err == nil {
			c.write(tag + " OK appended\r\n")
		}
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("a APPEND INBOX {1000}\r\n")
	if l := c.ReadLine(); !strings.HasPrefix(l, "+") {
		t.Fatalf("got %q", l)
	}
	c.Send(strings.Repeat("y", 500))
	// The session is in the middle of the literal before the drain.
	select {
	case <-half:
	case <-time.After(5 * time.Second):
		t.Fatal("the first half never reached the backend")
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- p.srv.Shutdown(ctx)
	}()
	// Until the server has begun to drain this session.
	for {
		p.srv.mu.Lock()
		down := p.srv.shutdown
		p.srv.mu.Unlock()
		if down {
			break
		}
		time.Sleep(time.Millisecond)
	}
	c.Send(strings.Repeat("y", 500) + "\r\n")
	if l := c.ReadLine(); l != "a OK appended" {
		t.Fatalf("APPEND during a drain: %q", l)
	}
	if l := c.ReadLine(); l != "* BYE Server shutting down" {
		t.Fatalf("then %q", l)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestEvictLogsOut: a session in IDLE on a backend taken out of service
// gets its BYE, and its backend connection is logged out rather than
// dropped.
func TestEvictLogsOut(t *testing.T) {
	b := newFakeBackend(t)
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if cmd != "IDLE" {
			return false
		}
		c.write("+ idling\r\n")
		if l, err := c.r.ReadString('\n'); err == nil && strings.TrimSpace(l) == "DONE" {
			c.write(tag + " OK idle done\r\n")
		}
		return true
	}
	p := startFakeProxy(t, b, nil)
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	c.Send("i IDLE\r\n")
	if l := c.ReadLine(); l != "+ idling" {
		t.Fatalf("IDLE: %q", l)
	}
	before := b.logouts.Load()
	if n, _ := p.srv.KickUser("alice"); n != 1 {
		t.Fatalf("KickUser = %d, want 1", n)
	}
	if l := c.ReadLine(); !strings.HasPrefix(l, "* BYE") {
		t.Fatalf("got %q, want BYE", l)
	}
	p.waitIdle(t)
	if got := b.logouts.Load(); got != before+1 {
		t.Errorf("backend logouts %d -> %d: the evicted connection was dropped, not logged out", before, got)
	}
}

// TestPipelineFlood: a client that pipelines far more commands than may
// be in flight, to a backend that has not answered yet, gets every
// answer in order; the relay holds back at session.MaxInFlight instead of
// growing its list without end.
func TestPipelineFlood(t *testing.T) {
	b := newFakeBackend(t)
	release := make(chan struct{})
	var once sync.Once
	b.hook = func(c *fakeConn, tag, cmd, _ string) bool {
		if tag == "f0" {
			<-release
		}
		return false
	}
	p := startFakeProxy(t, b, nil)
	// Runs before the proxy's and the backend's cleanup, which would wait
	// for the held command.
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	c := testkit.Dial(t, p.addr)
	c.MustLogin("alice", "secret")
	const n = 3 * session.MaxInFlight
	var burst strings.Builder
	for i := 0; i < n; i++ {
		fmt.Fprintf(&burst, "f%d NOOP\r\n", i)
	}
	go c.NetConn.Write([]byte(burst.String()))
	inflight := func() int {
		p.srv.mu.Lock()
		defer p.srv.mu.Unlock()
		for sess := range p.srv.sessions {
			if n := sess.InFlight(); n > 0 {
				return n
			}
		}
		return 0
	}
	deadline := time.Now().Add(5 * time.Second)
	for inflight() < session.MaxInFlight && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	// Had the relay not held back, it would go on past the bound.
	for range 50 {
		if got := inflight(); got != session.MaxInFlight {
			t.Fatalf("%d commands in flight, want the bound %d", got, session.MaxInFlight)
		}
		time.Sleep(time.Millisecond)
	}
	once.Do(func() { close(release) })
	for i := 0; i < n; i++ {
		if l := c.ReadLine(); l != fmt.Sprintf("f%d OK NOOP done", i) {
			t.Fatalf("answer %d: %q", i, l)
		}
	}
}
