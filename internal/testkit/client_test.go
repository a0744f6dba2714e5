package testkit

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// script runs a scripted IMAP server on the far end of a pipe: each step
// reads a line from the client when want is not empty (and checks it),
// then writes send. It reports the first difference on the returned
// channel, which is closed when the script is over.
type step struct{ want, send string }

func script(t *testing.T, srv net.Conn, steps ...step) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		defer close(done)
		defer srv.Close()
		r := bufio.NewReader(srv)
		for _, s := range steps {
			if s.want != "" {
				l, err := r.ReadString('\n')
				if err != nil {
					done <- err
					return
				}
				if l != s.want {
					done <- errors.New("server got " + strings.TrimSpace(l) + ", want " + strings.TrimSpace(s.want))
					return
				}
			}
			if s.send == "" {
				continue
			}
			if _, err := io.WriteString(srv, s.send); err != nil {
				done <- err
				return
			}
		}
	}()
	return done
}

func wait(t *testing.T, done <-chan error) {
	t.Helper()
	if err := <-done; err != nil {
		t.Error(err)
	}
}

func TestClientCmd(t *testing.T) {
	cli, srv := net.Pipe()
	done := script(t, srv,
		step{"", "* OK ready\r\n"},
		step{"t1 FETCH 1 BODY[]\r\n", "* 1 FETCH (BODY[] {7}\r\nab\r\ncd\r FLAGS ())\r\n* 1 EXISTS\r\nt1 OK done\r\n"},
		step{"t2 NOOP\r\n", "t2 NO [UNAVAILABLE] not OK\r\n"},
	)
	c := NewClient(t, cli)
	if g := c.ReadLine(); g != "* OK ready" {
		t.Errorf("greeting = %q, want %q", g, "* OK ready")
	}
	res := c.Cmd("FETCH %d BODY[]", 1)
	want := Response{
		Untagged: []string{"* 1 FETCH (BODY[] {7}ab\r\ncd\r FLAGS ())", "* 1 EXISTS"},
		Tagged:   "t1 OK done",
	}
	if res.String() != want.String() {
		t.Errorf("Cmd(FETCH) = %q, want %q", res, want)
	}
	if !res.OK() || res.Status() != "OK done" {
		t.Errorf("OK() = %v, Status() = %q; want true, %q", res.OK(), res.Status(), "OK done")
	}
	if !res.HasPrefix("* 1 EXISTS") || res.HasPrefix("EXISTS") || !res.Has("EXISTS") || !res.Has("done") {
		t.Errorf("Has/HasPrefix wrong for %q", res)
	}
	res = c.Cmd("NOOP")
	if res.OK() {
		t.Errorf("OK() = true for %q, want false: the status is NO", res.Tagged)
	}
	if res.HasPrefix("t2") {
		t.Errorf("HasPrefix looked at the tagged line %q", res.Tagged)
	}
	wait(t, done)
	if _, err := c.Conn.ReadLine(); !errors.Is(err, io.EOF) {
		t.Errorf("ReadLine after the server closed: %v, want EOF", err)
	}
}

func TestClientLoginLiteral(t *testing.T) {
	for _, nonSync := range []bool{false, true} {
		cli, srv := net.Pipe()
		steps := []step{
			{"t1 LOGIN {5}\r\n", "+ go on\r\n"},
			{"alice {6}\r\n", "+ go on\r\n"},
			{"s3cr\"t\r\n", "t1 OK logged in\r\n"},
		}
		if nonSync {
			steps = []step{
				{"t1 LOGIN {5+}\r\n", ""},
				{"alice {6+}\r\n", ""},
				{"s3cr\"t\r\n", "t1 OK logged in\r\n"},
			}
		}
		done := script(t, srv, steps...)
		c := NewClient(t, cli)
		if res := c.LoginLiteral("alice", `s3cr"t`, nonSync); !res.OK() {
			t.Errorf("LoginLiteral(nonSync %v) = %q, want OK", nonSync, res)
		}
		wait(t, done)
	}
}

func TestConnLogout(t *testing.T) {
	cli, srv := net.Pipe()
	done := script(t, srv,
		step{"t1 LOGIN \"a\\\"b\" \"p\\\\w\"\r\n", "t1 OK\r\n"},
		step{"t2 LOGOUT\r\n", "* BYE bye\r\nt2 OK\r\n"},
	)
	c := NewConn(cli)
	if res, err := c.Login(`a"b`, `p\w`); err != nil || !res.OK() {
		t.Fatalf("Login = %q, %v; want OK", res, err)
	}
	if err := c.Logout(); err != nil {
		t.Errorf("Logout: %v", err)
	}
	wait(t, done)

	// A LOGOUT answered without BYE is an error.
	cli, srv = net.Pipe()
	done = script(t, srv, step{"t1 LOGOUT\r\n", "t1 OK\r\n"})
	if err := NewConn(cli).Logout(); err == nil {
		t.Error("Logout without BYE: nil error, want one")
	}
	wait(t, done)
}

func TestConnReadToEOF(t *testing.T) {
	cli, srv := net.Pipe()
	done := script(t, srv, step{"", "* BYE a\r\n* BYE b\r\npartial"})
	lines, err := NewConn(cli).ReadToEOF()
	if err != nil || strings.Join(lines, "|") != "* BYE a|* BYE b|partial" {
		t.Errorf("ReadToEOF = %q, %v; want the three lines", lines, err)
	}
	wait(t, done)
}

func TestConnExpectContinuation(t *testing.T) {
	cli, srv := net.Pipe()
	done := script(t, srv, step{"", "+ ok\r\nt1 NO\r\n"})
	c := NewConn(cli)
	if l, err := c.ExpectContinuation(); err != nil || l != "+ ok" {
		t.Errorf("ExpectContinuation = %q, %v; want %q", l, err, "+ ok")
	}
	if _, err := c.ExpectContinuation(); err == nil {
		t.Error("ExpectContinuation on a tagged NO: nil error, want one")
	}
	wait(t, done)
}

// Every read has a deadline: Timeout per read, a fixed deadline when one
// is set, and Timeout again once it is cleared.
func TestConnDeadlines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cli, srv := net.Pipe()
		defer srv.Close()
		c := NewConn(cli)
		c.Timeout = time.Minute

		start := time.Now()
		if _, err := c.ReadLine(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadLine from a silent server: %v, want a timeout", err)
		}
		if got := time.Since(start); got != time.Minute {
			t.Errorf("ReadLine gave up after %v, want Timeout (1m)", got)
		}

		start = time.Now()
		c.SetReadDeadline(start.Add(time.Hour))
		if _, err := c.ReadLine(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadLine with a fixed deadline: %v, want a timeout", err)
		}
		if got := time.Since(start); got != time.Hour {
			t.Errorf("ReadLine gave up after %v, want the fixed deadline (1h)", got)
		}

		c.SetReadDeadline(time.Time{})
		start = time.Now()
		if _, err := c.R.ReadByte(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a raw read of R: %v, want a timeout", err)
		}
		if got := time.Since(start); got != time.Minute {
			t.Errorf("a raw read of R gave up after %v, want Timeout (1m)", got)
		}

		start = time.Now()
		if err := c.Send("t1 NOOP\r\n"); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Send to a server that does not read: %v, want a timeout", err)
		}
		if got := time.Since(start); got != time.Minute {
			t.Errorf("Send gave up after %v, want Timeout (1m)", got)
		}
	})
}

// A line that keeps coming is progress: the deadline is per read, not
// per line.
func TestConnSlowLine(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cli, srv := net.Pipe()
		go func() {
			defer srv.Close()
			for _, s := range []string{"* 1 ", "EXISTS", "\r\n"} {
				time.Sleep(40 * time.Second) // fake time: the bubble's clock
				io.WriteString(srv, s)
			}
		}()
		c := NewConn(cli)
		c.Timeout = time.Minute
		if l, err := c.ReadLine(); err != nil || l != "* 1 EXISTS" {
			t.Errorf("ReadLine of a slow line = %q, %v; want %q", l, err, "* 1 EXISTS")
		}
	})
}

func TestClientStartTLS(t *testing.T) {
	cert, err := NewCert("imap.test")
	if err != nil {
		t.Fatal(err)
	}
	cli, srv := net.Pipe()
	done := make(chan error, 1)
	go func() {
		defer close(done)
		defer srv.Close()
		r := bufio.NewReader(srv)
		if l, err := r.ReadString('\n'); err != nil || l != "t1 STARTTLS\r\n" {
			done <- errors.New("server got " + l)
			return
		}
		io.WriteString(srv, "t1 OK begin\r\n")
		ts := tls.Server(srv, &tls.Config{Certificates: []tls.Certificate{cert.KeyPair}})
		r = bufio.NewReader(ts)
		if l, err := r.ReadString('\n'); err != nil || l != "t2 NOOP\r\n" {
			done <- errors.New("server got " + l + " over TLS")
			return
		}
		io.WriteString(ts, "t2 OK over tls\r\n")
	}()
	c := NewClient(t, cli)
	c.StartTLS(&tls.Config{RootCAs: cert.Roots, ServerName: "imap.test"})
	if _, ok := c.NetConn.(*tls.Conn); !ok {
		t.Fatalf("NetConn after StartTLS is %T, want *tls.Conn", c.NetConn)
	}
	if res := c.Cmd("NOOP"); res.Tagged != "t2 OK over tls" {
		t.Errorf("NOOP over TLS = %q", res)
	}
	wait(t, done)
}

func TestLiteralSize(t *testing.T) {
	tests := []struct {
		line string
		n    int
		ok   bool
	}{
		{"* 1 FETCH (BODY[] {12}", 12, true},
		{"a LOGIN {5+}", 5, true},
		{"{0}", 0, true},
		{"* OK {x}", 0, false},
		{"* OK }", 0, false},
		{"* OK {-1}", 0, false},
		{"* OK {3} ", 0, false},
	}
	for _, tc := range tests {
		if n, ok := LiteralSize(tc.line); n != tc.n || ok != tc.ok {
			t.Errorf("LiteralSize(%q) = %d, %v; want %d, %v", tc.line, n, ok, tc.n, tc.ok)
		}
	}
}

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		"":       `""`,
		"alice":  `"alice"`,
		`a"b\c`:  `"a\"b\\c"`,
		"a b\tc": "\"a b\tc\"",
	} {
		if got := Quote(in); got != want {
			t.Errorf("Quote(%q) = %s, want %s", in, got, want)
		}
	}
}
