package faultnet

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

// A backend that hangs in the middle of a literal, and recovers: the way
// tests of the proxy use a Proxy in front of a real Dovecot.
func TestDovecotHangsMidLiteral(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "faulty", Users: 1, Messages: 1, BigMessages: 1})
	p := ListenT(t, dc.Addr)
	c := dial(t, p.Addr())
	r := bufio.NewReader(c)
	cmd := func(line, wantPrefix string) string {
		t.Helper()
		if line != "" {
			write(t, c, line+"\r\n")
		}
		if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
			t.Fatal(err)
		}
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("after %q: %q, %v", line, l, err)
			}
			if strings.HasPrefix(l, wantPrefix) {
				return l
			}
		}
	}
	cmd("", "* OK")
	cmd("a LOGIN user0001 pw-user0001", "a OK")
	cmd("b SELECT Big", "b OK")

	hit := p.PauseOn(Down, []byte("BODY[] {"))
	write(t, c, "c FETCH 1 BODY[]\r\n")
	waitClosed(t, hit, "the literal's start")
	// The backend stalls here: the size and the body are held back.
	if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	line, err := r.ReadString('{')
	if err != nil || !strings.HasPrefix(line, "* 1 FETCH (") || !strings.HasSuffix(line, " BODY[] {") {
		t.Fatalf("FETCH line read so far = %q, %v", line, err)
	}
	expectSilence(t, c)
	if n := p.Conns(); n != 1 {
		t.Errorf("Conns() = %d, want 1", n)
	}

	p.Resume(Down)
	if err := c.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatal(err)
	}
	var size int
	rest, err := r.ReadString('\n')
	if _, err2 := fmt.Sscanf(rest, "%d}\r\n", &size); err != nil || err2 != nil {
		t.Fatalf("literal size line %q: %v %v", rest, err, err2)
	}
	if n, err := io.CopyN(io.Discard, r, int64(size)); err != nil {
		t.Fatalf("literal after Resume: %d of %d bytes: %v", n, size, err)
	}
	cmd("", "c OK")
	if size < 1<<20 {
		t.Errorf("literal of %d bytes, want the ~1 MiB message", size)
	}
}
