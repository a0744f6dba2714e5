package proxy

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// FuzzPreAuth feeds arbitrary bytes to a session before login, with no
// backend to log in to. The session must end by itself when the input
// ends, answer only with well-formed response lines, and never panic
// (a panic is recovered and logged, which the test checks for).
func FuzzPreAuth(f *testing.F) {
	for _, s := range []string{
		"a CAPABILITY\r\nb NOOP\r\nc LOGOUT\r\n",
		"a LOGIN {3}\r\nbob {6+}\r\nsecret\r\n",
		"a AUTHENTICATE PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n",
		"a AUTHENTICATE LOGIN\r\nYm9i\r\n*\r\n",
		"a ID (\"name\" \"x\" \"x-originating-ip\" \"1.2.3.4\")\r\n",
		"a STARTTLS\r\nb NOOP\r\n",
		"\x00\xff\r\n\n\r{5}\r\n",
		"a LOGIN {99999999999+}\r\n",
		"a SELECT INBOX\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		logs := &testkit.SyncBuffer{}
		srv := New(Options{
			Logger:            newTestLogger(logs),
			PreAuthTimeout:    5 * time.Second,
			MaxLineLength:     1024,
			MaxLiteralPreAuth: 256,
		})
		client, server := net.Pipe()
		sess := srv.newSession(server, &ListenerOptions{TLS: TLSNone})
		done := make(chan struct{})
		go func() { sess.Serve(); close(done) }()
		out := make(chan []byte, 1)
		go func() {
			b, _ := io.ReadAll(client)
			out <- b
		}()
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		client.Write(in)
		// Half-close is not available on a pipe: closing ends the
		// input, and the session must then end too.
		client.Close()
		<-done
		b := <-out
		if len(b) > 0 && b[len(b)-1] != '\n' {
			t.Fatalf("output ends mid-line: %q", b)
		}
		lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		for _, l := range lines {
			if l == "" && len(b) == 0 {
				break
			}
			if !strings.HasSuffix(l, "\r") {
				t.Fatalf("response line without CRLF: %q", l)
			}
			if l == "\r" || !(l[0] == '*' || l[0] == '+' || isTagLine(l)) {
				t.Fatalf("malformed response line %q", l)
			}
		}
		if strings.Contains(logs.String(), "session panic") {
			t.Fatalf("session panicked:\n%s", logs.String())
		}
	})
}

func isTagLine(l string) bool {
	tag, _, ok := strings.Cut(l, " ")
	return ok && tag != ""
}
