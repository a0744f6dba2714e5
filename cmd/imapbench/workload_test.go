package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
)

// fakeServer is a scripted IMAP server on 127.0.0.1 that answers what
// imapbench sends, with untagged extras and literals in every reply that
// can have them, so that the workloads run end to end without Dovecot.
type fakeServer struct {
	ln      net.Listener
	name    string // in the greeting "(NAME)."
	idName  string // in the ID reply, sent as a literal
	bigSize int    // BODY[] literal size
	byeOn   string // command answered with "* BYE" and a close

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startFake(t *testing.T, f *fakeServer) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.ln = ln
	f.conns = map[net.Conn]bool{}
	f.wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conns[conn] = true
			f.mu.Unlock()
			f.wg.Go(func() {
				defer func() {
					f.mu.Lock()
					delete(f.conns, conn)
					f.mu.Unlock()
					conn.Close()
				}()
				f.serve(conn)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for c := range f.conns {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeServer) serve(conn net.Conn) {
	r := bufio.NewReader(conn)
	w := bufio.NewWriter(conn)
	fmt.Fprintf(w, "* OK [CAPABILITY IMAP4rev1 ID IDLE] Fake ready (%s).\r\n", f.name)
	w.Flush()
	body := strings.Repeat("z", f.bigSize)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		tag, rest, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
		cmd, args, _ := strings.Cut(rest, " ")
		if strings.EqualFold(cmd, "UID") {
			cmd, args, _ = strings.Cut(args, " ")
			cmd = "UID " + cmd
		}
		if cmd == f.byeOn {
			fmt.Fprintf(w, "* BYE going away\r\n")
			w.Flush()
			return
		}
		switch cmd {
		case "LOGIN":
			user, pw := unquote2(args)
			if pw != "pw-"+user {
				fmt.Fprintf(w, "%s NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", tag)
				break
			}
			fmt.Fprintf(w, "* CAPABILITY IMAP4rev1 IDLE\r\n%s OK Logged in\r\n", tag)
		case "ID":
			fmt.Fprintf(w, "* ID (\"name\" {%d}\r\n%s \"version\" \"0\")\r\n%s OK ID completed\r\n", len(f.idName), f.idName, tag)
		case "SELECT":
			switch args {
			case `"INBOX"`:
				fmt.Fprintf(w, "* FLAGS (\\Seen)\r\n* 20 EXISTS\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n%s OK [READ-WRITE] Select completed\r\n", tag)
			case `"Big"`:
				fmt.Fprintf(w, "* 2 EXISTS\r\n%s OK [READ-WRITE] Select completed\r\n", tag)
			default:
				fmt.Fprintf(w, "%s NO Mailbox doesn't exist\r\n", tag)
			}
		case "UID FETCH":
			if strings.Contains(args, "BODY.PEEK[]") {
				for i := 1; i <= 2; i++ {
					fmt.Fprintf(w, "* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n", i, i, len(body), body)
				}
			} else {
				for i := 1; i <= 20; i++ {
					fmt.Fprintf(w, "* %d FETCH (UID %d FLAGS () ENVELOPE (\"date\" {10}\r\nsubject %02d NIL))\r\n", i, i, i)
				}
			}
			fmt.Fprintf(w, "%s OK Fetch completed\r\n", tag)
		case "IDLE":
			fmt.Fprintf(w, "+ idling\r\n")
			w.Flush()
			done, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if done != "DONE\r\n" {
				fmt.Fprintf(w, "%s BAD Expected DONE\r\n", tag)
				break
			}
			fmt.Fprintf(w, "%s OK Idle completed\r\n", tag)
		case "LOGOUT":
			fmt.Fprintf(w, "* BYE Logging out\r\n%s OK Logout completed\r\n", tag)
			w.Flush()
			return
		default:
			fmt.Fprintf(w, "%s BAD Unknown command\r\n", tag)
		}
		w.Flush()
	}
}

// unquote2 splits `"a" "b"` (no escapes needed here).
func unquote2(s string) (string, string) {
	parts := strings.Split(s, `"`)
	if len(parts) != 5 {
		return "", ""
	}
	return parts[1], parts[3]
}

// bench runs imapbench's flags against addr and returns the summary.
func benchRun(t *testing.T, addr string, args ...string) *summary {
	t.Helper()
	cfg, err := parseFlags(append([]string{"-addr", addr}, args...), io.Discard)
	if err != nil {
		t.Fatalf("flags %q: %v", args, err)
	}
	var stderr strings.Builder
	sum, err := run(context.Background(), cfg, &stderr)
	if err != nil {
		t.Fatalf("run %q: %v", args, err)
	}
	t.Logf("%q: %+v", args, *sum)
	return sum
}

func TestWorkloadsFake(t *testing.T) {
	f := startFake(t, &fakeServer{name: "fake-1", idName: "fake-9", bigSize: 300 << 10})
	addr := f.ln.Addr().String()
	common := []string{"-users", "user0001-user0004", "-password-pattern", "pw-%s", "-c", "3"}

	t.Run("webmail", func(t *testing.T) {
		s := benchRun(t, addr, append(common, "-workload", "webmail", "-count", "25")...)
		expectClean(t, s, 25)
		if s.Messages != 25*20 || s.Logins != 25 || s.Bytes != 25*20*10 {
			t.Errorf("messages, logins, bytes = %d, %d, %d; want %d, 25, %d", s.Messages, s.Logins, s.Bytes, 25*20, 25*20*10)
		}
		expectBackends(t, s, map[string]int64{"fake-1": 25})
	})
	t.Run("login with ID", func(t *testing.T) {
		s := benchRun(t, addr, append(common, "-workload", "login", "-count", "10", "-id")...)
		expectClean(t, s, 10)
		expectBackends(t, s, map[string]int64{"fake-9": 10})
	})
	for _, splice := range []string{"-no-splice=false", "-no-splice"} {
		t.Run("bulk "+splice, func(t *testing.T) {
			s := benchRun(t, addr, append(common, "-workload", "bulk", "-count", "7", splice)...)
			expectClean(t, s, 7)
			if want := int64(7 * 2 * (300 << 10)); s.Bytes != want {
				t.Errorf("bytes = %d, want %d", s.Bytes, want)
			}
			if s.Logins != 3 || s.Messages != 14 {
				t.Errorf("logins, messages = %d, %d; want 3 (one long session per worker), 14", s.Logins, s.Messages)
			}
		})
	}
	t.Run("idle", func(t *testing.T) {
		s := benchRun(t, addr, append(common, "-workload", "idle", "-sessions", "9", "-idle-hold", "10ms")...)
		expectClean(t, s, 9)
		if s.Held != 9 {
			t.Errorf("held = %d, want 9", s.Held)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		s := benchRun(t, addr, "-users", "user0001", "-password", "nope", "-c", "2", "-count", "6")
		if s.Cycles != 0 || s.Errors["login_no"] != 6 || len(s.Errors) != 1 {
			t.Errorf("cycles %d, errors %v; want 0 and login_no:6", s.Cycles, s.Errors)
		}
	})
	t.Run("missing mailbox", func(t *testing.T) {
		s := benchRun(t, addr, append(common, "-count", "4", "-mailbox", "Nowhere")...)
		if s.Cycles != 0 || s.Errors["select"] != 4 || len(s.Errors) != 1 {
			t.Errorf("cycles %d, errors %v; want 0 and select:4", s.Cycles, s.Errors)
		}
	})
}

func TestByeAndDialErrors(t *testing.T) {
	f := startFake(t, &fakeServer{name: "fake-1", byeOn: "SELECT"})
	s := benchRun(t, f.ln.Addr().String(), "-users", "user0001", "-password", "pw-user0001", "-c", "2", "-count", "5")
	if s.Errors["bye"] != 5 || s.Cycles != 0 {
		t.Errorf("cycles %d, errors %v; want 0 and bye:5", s.Cycles, s.Errors)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	s = benchRun(t, closed, "-c", "1", "-count", "2")
	if s.Errors["dial"] != 2 {
		t.Errorf("errors %v, want dial:2", s.Errors)
	}
}

func TestJSONOnly(t *testing.T) {
	f := startFake(t, &fakeServer{name: "fake-1"})
	var out, errOut strings.Builder
	code := runMain([]string{"-addr", f.ln.Addr().String(), "-json", "-users", "user0001-user0002", "-password-pattern", "pw-%s", "-count", "3", "-c", "1"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], `{"workload":"webmail","target":`) || !strings.Contains(lines[0], `"cycles":3,`) {
		t.Errorf("stdout = %q, want one JSON line with 3 cycles", out.String())
	}
	if code := runMain([]string{"-count", "-1"}, &out, &errOut); code != 2 {
		t.Errorf("bad flags: exit %d, want 2", code)
	}
}

func expectClean(t *testing.T, s *summary, cycles int64) {
	t.Helper()
	if len(s.Errors) != 0 {
		t.Errorf("errors = %v (first: %v), want none", s.Errors, s.firstErr)
	}
	if s.Cycles != cycles {
		t.Errorf("cycles = %d, want %d", s.Cycles, cycles)
	}
}

func expectBackends(t *testing.T, s *summary, want map[string]int64) {
	t.Helper()
	if fmt.Sprint(s.Backends) != fmt.Sprint(want) {
		t.Errorf("backends = %v, want %v", s.Backends, want)
	}
}
