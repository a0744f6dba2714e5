package proxy

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"net"
	"regexp"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// wireClient speaks IMAP without keeping what it reads: every response
// byte goes into a hash, read through one buffer made at dial, so that a
// test can measure what the proxy in the same process allocates while
// hundreds of KB pass, without the client's own memory in the way.
type wireClient struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
	h    hash.Hash
	n    int
}

// wireResult is what one command got: the hash and size of everything up
// to the tagged line (untagged lines and literals, byte for byte), the
// longest line, and the tagged line.
type wireResult struct {
	sum     [sha256.Size]byte
	bytes   int64
	longest int
	lines   int
	tagged  string
}

func dialWire(t testing.TB, addr string) *wireClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	w := &wireClient{t: t, conn: c, br: bufio.NewReaderSize(c, 64<<10), h: sha256.New()}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if r := w.read(""); !bytes.HasPrefix([]byte(r.tagged), []byte("* OK")) {
		t.Fatalf("greeting %q", r.tagged)
	}
	return w
}

// timing is the part of Dovecot's tagged replies that differs from one
// run of a command to the next.
var timing = regexp.MustCompile(` \([0-9.]+( \+ [0-9.]+)* secs\)\.$`)

// cmd sends "tN command" (both sides of a comparison number their
// commands alike, so the tags match) and reads up to its tagged reply.
func (w *wireClient) cmd(command string) wireResult {
	w.t.Helper()
	w.n++
	tag := "t" + strconv.Itoa(w.n)
	if _, err := io.WriteString(w.conn, tag+" "+command+"\r\n"); err != nil {
		w.t.Fatalf("write %s: %v", command, err)
	}
	return w.read(tag)
}

// read hashes response lines up to the line starting with tag+" " (the
// first line if tag is ""), which it returns without its CRLF and timing.
// Lines are taken from the reader's buffer in place (ReadSlice), so
// reading allocates nothing whatever their length.
func (w *wireClient) read(tag string) wireResult {
	w.t.Helper()
	var res wireResult
	w.h.Reset()
	prefix := []byte(tag + " ")
	var tail [32]byte // the end of the current line: literal markers
	var tailN, lineLen int
	start := true
	for {
		part, err := w.br.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			w.t.Fatalf("read after %d bytes: %v", res.bytes, err)
		}
		if start && (tag == "" || bytes.HasPrefix(part, prefix)) && err == nil {
			// Normalised by the caller: a regexp here would count
			// as the proxy's allocations.
			res.tagged = string(bytes.TrimRight(part, "\r\n"))
			res.sum = [sha256.Size]byte(w.h.Sum(nil))
			return res
		}
		w.h.Write(part)
		res.bytes += int64(len(part))
		lineLen += len(part)
		if len(part) >= len(tail) {
			tailN = copy(tail[:], part[len(part)-len(tail):])
		} else {
			keep := min(tailN, len(tail)-len(part))
			copy(tail[:], tail[tailN-keep:tailN])
			tailN = keep + copy(tail[keep:], part)
		}
		start = err == nil
		if !start {
			continue
		}
		res.longest = max(res.longest, lineLen)
		res.lines++
		lineLen = 0
		if !bytes.HasSuffix(tail[:tailN], []byte("}\r\n")) {
			tailN = 0
			continue
		}
		if n, ok := testkit.LiteralSize(string(bytes.TrimRight(tail[:tailN], "\r\n"))); ok {
			for left := n; left > 0; {
				// Peek and Discard: io.CopyN would allocate a buffer.
				b, err := w.br.Peek(min(left, w.br.Size()))
				if len(b) == 0 {
					w.t.Fatalf("read literal of %d bytes: %v", n, err)
				}
				w.h.Write(b)
				w.br.Discard(len(b))
				left -= len(b)
			}
			res.bytes += int64(n)
			start = false // the line goes on after the literal
		}
		tailN = 0
	}
}

// quietLogs keeps the proxy's log out of the allocations measured: at
// trace level every command is a log line, and the buffer holding them
// grows by doubling.
func quietLogs(o *Options) {
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: io.Discard})
	o.Logger = log
}

// TestBigMailboxByteForByte: on mailboxes at the scale of real ones (a
// 20,000-message INBOX, a message to 4,000 recipients, a deep MIME tree),
// SEARCH, SORT, THREAD, ESEARCH and FETCH through the proxy return what
// Dovecot returns directly, byte for byte, though single response lines
// run to 170 KB; the proxy passes them on without holding them (what it
// allocates per command is a fraction of the longest line, which a relay
// that gathered lines could not manage); the connection is then cached
// and the next session finds it clean.
func TestBigMailboxByteForByte(t *testing.T) {
	large := dovecottest.Large{Messages: 20000, Recipients: 4000, MIMEDepth: 4, MIMEWidth: 5}
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "large", Users: 1, Messages: 1, Large: large})
	p := startProxy(t, []*dovecottest.Server{dc}, quietLogs)
	user, pass := dovecottest.LargeUser, dc.PasswordOf(dovecottest.LargeUser)

	// The first session to select a mailbox takes its \Recent flags; a
	// session of its own takes them here, so that the two compared
	// below see the same flags.
	prime := dialWire(t, dc.Addr)
	for _, c := range []string{"LOGIN " + user + " " + pass, "SELECT INBOX", "SELECT Recipients", "SELECT MIME", "LOGOUT"} {
		if r := prime.cmd(c); !bytes.Contains([]byte(r.tagged), []byte(" OK")) {
			t.Fatalf("direct %s: %s", c, r.tagged)
		}
	}

	direct := dialWire(t, dc.Addr)
	proxied := dialWire(t, p.addr)
	steps := []struct {
		cmd string
		// long: the reply has a line of over 40 KB, and the proxy must
		// pass it on without holding it.
		long bool
	}{
		{cmd: "LOGIN " + user + " " + pass},
		{cmd: "SELECT INBOX"},
		{cmd: "UID SEARCH ALL", long: true},
		{cmd: "SEARCH ALL", long: true},
		{cmd: "SORT (DATE) UTF-8 ALL", long: true},
		{cmd: "THREAD REFERENCES UTF-8 ALL", long: true},
		{cmd: "UID SEARCH RETURN (ALL) ALL"},
		{cmd: "SEARCH RETURN (MIN MAX COUNT) SUBJECT large"},
		{cmd: "FETCH 1:* (FLAGS)"},
		{cmd: "UID FETCH 19990:* (UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])"},
		{cmd: "SELECT Recipients"},
		{cmd: "FETCH 1 (ENVELOPE BODYSTRUCTURE)", long: true},
		{cmd: "FETCH 1 (BODY.PEEK[HEADER])"},
		{cmd: "SELECT MIME"},
		{cmd: "FETCH 1 (ENVELOPE BODYSTRUCTURE)", long: true},
		{cmd: "FETCH 1 (BODY)"},
	}
	for _, st := range steps {
		want := direct.cmd(st.cmd)
		want.tagged = timing.ReplaceAllString(want.tagged, "")
		if !bytes.Contains([]byte(want.tagged), []byte(" OK")) {
			t.Fatalf("direct %s: %s", st.cmd, want.tagged)
		}
		// A relay that gathered a line before passing it on would
		// allocate at least the line, in fact several times it as
		// the buffer grows: the bound is half the line. Short lines
		// cost the proxy a little garbage each (imapwire's
		// Writer.Write, inlined, allocates a method value per call),
		// but nothing that grows with the reply beyond that.
		limit := func(r wireResult) uint64 {
			if st.long {
				return uint64(want.longest) / 2
			}
			return uint64(32<<10 + 32*r.lines)
		}
		// Goroutines left over from other tests allocate too: the
		// least of three tries is the proxy's.
		var got wireResult
		var alloc uint64
		for try := 0; try < 3; try++ {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			got = proxied.cmd(st.cmd)
			runtime.ReadMemStats(&after)
			alloc = after.TotalAlloc - before.TotalAlloc
			got.tagged = timing.ReplaceAllString(got.tagged, "")
			if st.cmd[:5] == "LOGIN" || alloc <= limit(got) {
				break
			}
			// The tags of the two sides stay in step.
			direct.cmd(st.cmd)
		}
		t.Logf("%-70s %7d bytes, longest line %6d, proxy allocated %6d bytes", st.cmd, got.bytes, got.longest, alloc)

		if st.cmd[:5] == "LOGIN" {
			// The proxy answers the login itself.
			if !bytes.Contains([]byte(got.tagged), []byte(" OK")) {
				t.Fatalf("LOGIN through the proxy: %s", got.tagged)
			}
			continue
		}
		if got.sum != want.sum || got.bytes != want.bytes || got.tagged != want.tagged {
			t.Errorf("%s: through the proxy %d bytes (sha256 %x), tagged %q; directly %d bytes (sha256 %x), tagged %q",
				st.cmd, got.bytes, got.sum[:6], got.tagged, want.bytes, want.sum[:6], want.tagged)
		}
		if st.long != (want.longest > 40<<10) {
			t.Errorf("%s: longest line %d bytes; the fixture should make it %s 40 KB", st.cmd, want.longest, map[bool]string{true: "over", false: "under"}[st.long])
		}
		if alloc > limit(got) {
			t.Errorf("%s: the proxy allocated %d bytes relaying %d bytes in %d lines (the longest %d bytes), want at most %d",
				st.cmd, alloc, got.bytes, got.lines, got.longest, limit(got))
		}
	}
	if t.Failed() {
		return
	}

	if r := proxied.cmd("LOGOUT"); !bytes.HasPrefix([]byte(r.tagged), []byte("t"+strconv.Itoa(proxied.n)+" OK")) {
		t.Fatalf("LOGOUT: %s", r.tagged)
	}
	p.waitCached(t, 1)

	// The next session gets the same backend connection, and nothing of
	// the last: no mailbox selected, no response left in the stream.
	c := testkit.Dial(t, p.addr)
	if res := c.MustLogin(user, pass); !res.Has("[XPROXYREUSE]") {
		t.Fatalf("second login not served from the cache:\n%s", res)
	}
	if res := c.Cmd("NOOP"); !res.OK() || len(res.Untagged) != 0 {
		t.Errorf("NOOP on the reused connection:\n%s", res)
	}
	if res := c.Cmd("FETCH 1 (FLAGS)"); res.OK() || !res.Has("No mailbox selected") {
		t.Errorf("FETCH without SELECT on the reused connection:\n%s", res)
	}
	if res := c.Cmd("UID SEARCH ALL"); res.OK() {
		t.Errorf("UID SEARCH without SELECT on the reused connection:\n%s", res)
	}
	c.Logout()
	p.waitCached(t, 1)
	if n, err := dc.LoginsFor(user); err != nil || n != 3 {
		// The priming session, the direct one and the proxy's one.
		t.Errorf("Dovecot logins of %s = %d (%v), want 3", user, n, err)
	}
}
