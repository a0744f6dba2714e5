package dovecottest

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

const ioTimeout = 10 * time.Second

// newClient is testkit's client over c, each read bounded by ioTimeout.
func newClient(t testing.TB, c net.Conn) *testkit.Client {
	cl := testkit.NewClient(t, c)
	cl.Timeout = ioTimeout
	return cl
}

// dial connects and returns the client with its greeting line.
func dial(t testing.TB, addr string) (*testkit.Client, string) {
	t.Helper()
	c := testkit.Dial(t, addr)
	c.Timeout = ioTimeout
	return c, c.Greeting
}

// do sends one command and returns the untagged lines and the tagged reply
// without its tag ("OK ...", "NO ...").
func do(c *testkit.Client, format string, args ...any) (untagged []string, tagged string) {
	c.TB().Helper()
	res := c.Cmd(format, args...)
	return res.Untagged, res.Status()
}

// exists selects mailbox and returns its EXISTS count.
func exists(c *testkit.Client, mailbox string) int {
	t := c.TB()
	t.Helper()
	u, r := do(c, "SELECT %s", mailbox)
	if !strings.HasPrefix(r, "OK") {
		t.Fatalf("SELECT %s = %q, want OK", mailbox, r)
	}
	for _, l := range u {
		var n int
		if _, err := fmt.Sscanf(l, "* %d EXISTS", &n); err == nil {
			return n
		}
	}
	t.Fatalf("SELECT %s: no EXISTS in %q", mailbox, u)
	return 0
}

// readUntilClosed reads until EOF (or a reset) and returns what was read.
func readUntilClosed(c *testkit.Client) ([]string, error) {
	var lines []string
	for {
		l, err := c.Conn.ReadFull()
		if l != "" {
			lines = append(lines, l)
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return lines, err
			}
			return lines, nil
		}
	}
}

func TestServer(t *testing.T) {
	const (
		messages = 7
		big      = 1
	)
	s := StartT(t, Options{Name: "backend-t", Users: 3, Messages: messages, BigMessages: big})

	successful := 0
	t.Run("greeting", func(t *testing.T) {
		_, g := dial(t, s.Addr)
		if !strings.HasPrefix(g, "* OK") || !strings.Contains(g, "Dovecot ready (backend-t).") {
			t.Errorf("greeting = %q, want * OK ... Dovecot ready (backend-t).", g)
		}
	})

	t.Run("login and select", func(t *testing.T) {
		c, _ := dial(t, s.Addr)
		c.MustLogin("user0001", "pw-user0001")
		successful++
		if u, _ := do(c, "ID NIL"); len(u) != 1 || u[0] != `* ID ("name" "backend-t")` {
			t.Errorf("ID reply = %q, want [* ID (\"name\" \"backend-t\")]", u)
		}
		if got := exists(c, "INBOX"); got != messages {
			t.Errorf("SELECT INBOX EXISTS = %d, want %d", got, messages)
		}
		u, r := do(c, "FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
		if !strings.HasPrefix(r, "OK") || len(u) != messages {
			t.Fatalf("FETCH = %q, %q", u, r)
		}
		for i, l := range u {
			want := fmt.Sprintf("* %d FETCH (UID %d BODY[HEADER.FIELDS (SUBJECT)] {", i+1, i+1)
			subj := fmt.Sprintf("Subject: msg %d for user0001", i+1)
			if !strings.HasPrefix(l, want) || !strings.Contains(l, subj) {
				t.Errorf("FETCH line %d = %q, want %q...%q", i+1, l, want, subj)
			}
		}
		if got := exists(c, "Big"); got != big {
			t.Errorf("SELECT Big EXISTS = %d, want %d", got, big)
		}
		u, _ = do(c, "FETCH 1 RFC822.SIZE")
		var size int
		if len(u) != 1 || func() bool { _, err := fmt.Sscanf(u[0], "* 1 FETCH (RFC822.SIZE %d)", &size); return err != nil }() {
			t.Fatalf("FETCH RFC822.SIZE = %q", u)
		}
		if size < bigMessageSize {
			t.Errorf("big message size = %d, want >= %d", size, bigMessageSize)
		}
	})

	t.Run("wrong password", func(t *testing.T) {
		c, _ := dial(t, s.Addr)
		if _, r := do(c, "LOGIN user0001 nope"); !strings.HasPrefix(r, "NO") {
			t.Errorf("LOGIN with wrong password = %q, want NO", r)
		}
		if _, r := do(c, "LOGIN user0099 pw-user0099"); !strings.HasPrefix(r, "NO") {
			t.Errorf("LOGIN of unknown user = %q, want NO", r)
		}
	})

	t.Run("logins", func(t *testing.T) {
		for range 2 {
			c, _ := dial(t, s.Addr)
			c.MustLogin("user0002", "pw-user0002")
			successful++
		}
		// The failed logins above must not count: the count reached is
		// exactly the successful ones.
		got, err := s.WaitLogins(successful, ioTimeout)
		if err != nil || got != successful {
			t.Fatalf("WaitLogins(%d) = %d, %v; want %d", successful, got, err, successful)
		}
		if n, err := s.LoginsFor("user0002"); err != nil || n != 2 {
			t.Errorf("LoginsFor(user0002) = %d, %v; want 2", n, err)
		}
		if n, err := s.LoginsFor("user0003"); err != nil || n != 0 {
			t.Errorf("LoginsFor(user0003) = %d, %v; want 0", n, err)
		}
	})

	t.Run("set password", func(t *testing.T) {
		if err := s.SetPassword("user0003", "fresh"); err != nil {
			t.Fatal(err)
		}
		if got := s.PasswordOf("user0003"); got != "fresh" {
			t.Errorf("PasswordOf(user0003) = %q, want fresh", got)
		}
		c, _ := dial(t, s.Addr)
		if _, r := do(c, "LOGIN user0003 pw-user0003"); !strings.HasPrefix(r, "NO") {
			t.Errorf("LOGIN with the old password = %q, want NO", r)
		}
		c.MustLogin("user0003", "fresh")
		successful++
		// Same length, same second: still seen.
		if err := s.SetPassword("user0003", "fresX"); err != nil {
			t.Fatal(err)
		}
		c2, _ := dial(t, s.Addr)
		c2.MustLogin("user0003", "fresX")
		successful++
		if got, err := s.WaitLogins(successful, ioTimeout); err != nil || got != successful {
			t.Errorf("WaitLogins(%d) = %d, %v; want %d", successful, got, err, successful)
		}
	})

	t.Run("log has no errors or warnings", func(t *testing.T) { checkLogClean(t, s) })

	t.Run("kick", func(t *testing.T) {
		victim, _ := dial(t, s.Addr)
		victim.MustLogin("user0001", "pw-user0001")
		exists(victim, "INBOX")
		bystander, _ := dial(t, s.Addr)
		bystander.MustLogin("user0002", "pw-user0002")
		successful += 2

		if err := s.Kick("user0001"); err != nil {
			t.Fatal(err)
		}
		lines, err := readUntilClosed(victim)
		if err != nil {
			t.Fatalf("kicked connection not closed: %v (read %q)", err, lines)
		}
		if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], "* BYE") {
			t.Errorf("kicked connection read %q, want a final * BYE", lines)
		}
		if _, r := do(bystander, "NOOP"); !strings.HasPrefix(r, "OK") {
			t.Errorf("NOOP of another user after the kick = %q, want OK", r)
		}
		if err := s.Kick("user0001"); err != nil {
			t.Errorf("Kick without sessions: %v", err)
		}
	})

	t.Run("kill", func(t *testing.T) {
		c, _ := dial(t, s.Addr)
		c.MustLogin("user0001", "pw-user0001")
		if err := s.Kill(); err != nil {
			t.Fatal(err)
		}
		if _, err := readUntilClosed(c); err != nil {
			t.Errorf("connection after Kill: %v, want EOF or reset", err)
		}
		conn, err := net.DialTimeout("tcp", s.Addr, ioTimeout)
		if err == nil {
			conn.Close()
			t.Fatalf("dial %s after Kill succeeded, want refused", s.Addr)
		}
		if !strings.Contains(err.Error(), "refused") {
			t.Errorf("dial after Kill: %v, want connection refused", err)
		}
		if ps, _ := descendants(s.pid); len(ps) != 0 {
			t.Errorf("processes left after Kill: %v", ps)
		}
	})
}

func TestTwoInstances(t *testing.T) {
	skipUnlessAvailable(t)
	names := []string{"alpha", "beta"}
	servers := make([]*Server, len(names))
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	for i, n := range names {
		wg.Go(func() {
			s, err := Start(Options{Name: n, Users: 2, Messages: 3 + i})
			servers[i], errs[i] = s, err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("start %s: %v", names[i], err)
		}
	}
	for _, s := range servers {
		t.Cleanup(func() { s.Stop() })
	}
	if servers[0].Addr == servers[1].Addr || servers[0].Dir == servers[1].Dir {
		t.Fatalf("instances share %s / %s", servers[0].Addr, servers[0].Dir)
	}
	for i, s := range servers {
		c, g := dial(t, s.Addr)
		if want := "Dovecot ready (" + names[i] + ")."; !strings.Contains(g, want) {
			t.Errorf("greeting of %s = %q, want %q", s.Addr, g, want)
		}
		c.MustLogin("user0001", "pw-user0001")
		if got := exists(c, "INBOX"); got != 3+i {
			t.Errorf("%s: EXISTS = %d, want %d", names[i], got, 3+i)
		}
	}
	for _, s := range servers {
		if got, err := s.WaitLogins(1, ioTimeout); err != nil || got != 1 {
			t.Errorf("%s: WaitLogins(1) = %d, %v; want 1", s.Name, got, err)
		}
	}

	// Stopping one leaves the other alone, and removes its directory.
	if err := servers[0].Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(servers[0].Dir); !os.IsNotExist(err) {
		t.Errorf("Dir %s after Stop: %v, want it removed", servers[0].Dir, err)
	}
	if c, err := net.DialTimeout("tcp", servers[0].Addr, ioTimeout); err == nil {
		c.Close()
		t.Errorf("dial %s after Stop succeeded", servers[0].Addr)
	}
	c, _ := dial(t, servers[1].Addr)
	c.MustLogin("user0002", "pw-user0002")
	if err := servers[0].Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestTLS(t *testing.T) {
	s := StartT(t, Options{Name: "secure", Users: 1, Messages: 2, TLS: true, ImplicitTLSPort: -1})
	if s.TLSAddr == "" {
		t.Fatal("TLSAddr empty with ImplicitTLSPort -1")
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(s.CertPEM) {
		t.Fatalf("CertPEM holds no certificate: %q", s.CertPEM)
	}

	starttls := func(t *testing.T, cfg *tls.Config) (*testkit.Client, error) {
		c, g := dial(t, s.Addr)
		if !strings.Contains(g, "STARTTLS") {
			t.Fatalf("greeting %q does not offer STARTTLS", g)
		}
		if _, r := do(c, "STARTTLS"); !strings.HasPrefix(r, "OK") {
			t.Fatalf("STARTTLS = %q, want OK", r)
		}
		tc := tls.Client(c.NetConn, cfg)
		if err := tc.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
			t.Fatal(err)
		}
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		return newClient(t, tc), nil
	}

	for _, name := range []string{"localhost", "127.0.0.1"} {
		t.Run("starttls "+name, func(t *testing.T) {
			c, err := starttls(t, &tls.Config{RootCAs: pool, ServerName: name})
			if err != nil {
				t.Fatalf("handshake verifying %s: %v", name, err)
			}
			c.MustLogin("user0001", "pw-user0001")
			if got := exists(c, "INBOX"); got != 2 {
				t.Errorf("EXISTS over TLS = %d, want 2", got)
			}
		})
	}

	t.Run("unknown CA fails", func(t *testing.T) {
		if _, err := starttls(t, &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "localhost"}); err == nil {
			t.Error("handshake with an empty RootCAs pool succeeded, want a verification error")
		}
	})

	t.Run("implicit tls", func(t *testing.T) {
		d := &net.Dialer{Timeout: ioTimeout}
		tc, err := tls.DialWithDialer(d, "tcp", s.TLSAddr, &tls.Config{RootCAs: pool, ServerName: "localhost"})
		if err != nil {
			t.Fatalf("dial %s: %v", s.TLSAddr, err)
		}
		defer tc.Close()
		c := newClient(t, tc)
		g, err := c.Conn.ReadFull()
		if err != nil || !strings.Contains(g, "Dovecot ready (secure).") {
			t.Fatalf("greeting over implicit TLS = %q, %v", g, err)
		}
		c.MustLogin("user0001", "pw-user0001")
	})

	t.Run("log has no errors or warnings", func(t *testing.T) { checkLogClean(t, s) })
}

// checkLogClean fails t for every warning or error Dovecot logged: the
// generated config should produce none.
func checkLogClean(t *testing.T, s *Server) {
	t.Helper()
	for _, l := range strings.Split(s.Log(), "\n") {
		for _, level := range []string{" Warning: ", " Error: ", " Fatal: ", " Panic: "} {
			if strings.Contains(l, level) {
				t.Errorf("log line %q", l)
			}
		}
	}
}

func TestStartFailureShowsLog(t *testing.T) {
	skipUnlessAvailable(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	s, err := Start(Options{Port: port, Users: 1, Messages: 1})
	if err == nil {
		s.Stop()
		t.Fatalf("Start on busy port %d succeeded", port)
	}
	if !strings.Contains(err.Error(), "Address already in use") {
		t.Errorf("Start on a busy port: %v, want the log line about the address", err)
	}
}

func TestDirMustBeSearchable(t *testing.T) {
	skipUnlessAvailable(t)
	dir := t.TempDir() // its parent is mode 0700
	_, err := Start(Options{Users: 1, Dir: dir + "/dc"})
	if err == nil || !strings.Contains(err.Error(), "not searchable") {
		t.Errorf("Start in %s = %v, want a not searchable error", dir, err)
	}
}

func TestLoginRE(t *testing.T) {
	tests := []struct {
		line string
		user string // "" = no match
	}{
		{"2026-11-28 13:15:18 imap-login: Info: Login: user=<user0003>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, mpid=9141, TLS, session=</HzY9>", "user0003"},
		{"2026-11-28 13:15:19 imap-login: Info: Disconnected: Connection closed (auth failed, 1 attempts in 1 secs): user=<user0001>, method=PLAIN", ""},
		{"2026-11-28 13:15:10 imap-login: Info: Disconnected: Aborted login by logging out (no auth attempts in 0 secs): user=<>, rip=127.0.0.1", ""},
		{"2026-11-28 13:16:19 imap(user0001)<9139><sI3X>: Info: Disconnected: Connection closed (ID finished 60.554 secs ago) in=200 out=1979", ""},
	}
	for _, tt := range tests {
		m := loginRE.FindStringSubmatch(tt.line)
		got := ""
		if m != nil {
			got = m[1]
		}
		if got != tt.user {
			t.Errorf("loginRE on %q = %q, want %q", tt.line, got, tt.user)
		}
	}
}

func TestLarge(t *testing.T) {
	skipUnlessAvailable(t)
	const (
		messages   = 20000
		recipients = 4000
		depth      = 4
		width      = 5
	)
	start := time.Now()
	s := StartT(t, Options{Name: "large", Users: 2, Messages: 3,
		Large: Large{Messages: messages, Recipients: recipients, MIMEDepth: depth, MIMEWidth: width}})
	t.Logf("start with %d messages, %d recipients, a %dx%d MIME tree: %v", messages, recipients, depth, width, time.Since(start))

	if got, want := s.Users(), []string{"user0001", "user0002", LargeUser}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("Users() = %q, want %q", got, want)
	}
	c, _ := dial(t, s.Addr)
	c.MustLogin(LargeUser, "pw-"+LargeUser)

	t.Run("inbox", func(t *testing.T) {
		if got := exists(c, "INBOX"); got != messages {
			t.Fatalf("SELECT INBOX EXISTS = %d, want %d", got, messages)
		}
		u, r := do(c, "UID SEARCH ALL")
		if !strings.HasPrefix(r, "OK") || len(u) != 1 {
			t.Fatalf("UID SEARCH ALL = %d lines, %q", len(u), r)
		}
		uids := strings.Fields(strings.TrimPrefix(u[0], "* SEARCH"))
		if len(uids) != messages || uids[0] != "1" || uids[messages-1] != strconv.Itoa(messages) {
			t.Errorf("UID SEARCH ALL: %d UIDs from %s to %s, want 1..%d", len(uids), uids[0], uids[len(uids)-1], messages)
		}
		if len(u[0]) < 100_000 {
			t.Errorf("UID SEARCH ALL line is %d bytes, want over 100 KB", len(u[0]))
		}
		u, r = do(c, "SORT (SUBJECT) US-ASCII ALL")
		if !strings.HasPrefix(r, "OK") || len(u) != 1 || len(strings.Fields(u[0])) != messages+2 {
			t.Errorf("SORT = %d lines, %q", len(u), r)
		}
		// Message N is base 1 + (N-1) mod 100, with UIDs in order.
		u, _ = do(c, "UID FETCH 1,2,101,%d (BODY.PEEK[HEADER.FIELDS (SUBJECT)])", messages)
		for i, want := range []string{"large 1", "large 2", "large 1", "large 100"} {
			if i >= len(u) || !strings.Contains(u[i], "Subject: "+want+"\r\n") {
				t.Errorf("FETCH subjects = %q, want %q at %d", u, want, i)
			}
		}
	})

	t.Run("recipients", func(t *testing.T) {
		if got := exists(c, "Recipients"); got != 1 {
			t.Fatalf("SELECT Recipients EXISTS = %d, want 1", got)
		}
		u, r := do(c, "FETCH 1 (ENVELOPE)")
		if !strings.HasPrefix(r, "OK") || len(u) != 1 {
			t.Fatalf("FETCH ENVELOPE = %d lines, %q", len(u), r)
		}
		if n := strings.Count(u[0], ` NIL "rcpt`); n != recipients {
			t.Errorf("ENVELOPE has %d recipients, want %d", n, recipients)
		}
		if !strings.Contains(u[0], `("Rcpt 4000" NIL "rcpt4000" "example.org")`) {
			t.Errorf("ENVELOPE lacks the last recipient: ...%q", u[0][len(u[0])-200:])
		}
		if len(u[0]) < 100_000 {
			t.Errorf("ENVELOPE line is %d bytes, want over 100 KB", len(u[0]))
		}
		t.Logf("FETCH 1 (ENVELOPE): %d bytes", len(u[0]))
	})

	t.Run("mime", func(t *testing.T) {
		if got := exists(c, "MIME"); got != 1 {
			t.Fatalf("SELECT MIME EXISTS = %d, want 1", got)
		}
		u, r := do(c, "FETCH 1 (BODYSTRUCTURE)")
		if !strings.HasPrefix(r, "OK") || len(u) != 1 {
			t.Fatalf("FETCH BODYSTRUCTURE = %d lines, %q", len(u), r)
		}
		leaves := 1
		for range depth {
			leaves *= width
		}
		if n := strings.Count(u[0], `("text" "plain"`); n != leaves {
			t.Errorf("BODYSTRUCTURE has %d text/plain leaves, want %d", n, leaves)
		}
		if n := strings.Count(u[0], `"mixed"`); n != (leaves-1)/(width-1) {
			t.Errorf("BODYSTRUCTURE has %d multiparts, want %d", n, (leaves-1)/(width-1))
		}
		if len(u[0]) < 20_000 {
			t.Errorf("BODYSTRUCTURE line is %d bytes, want over 20 KB", len(u[0]))
		}
		t.Logf("FETCH 1 (BODYSTRUCTURE): %d bytes", len(u[0]))
		// The deepest, last leaf is where the tree says it is.
		path := strings.Repeat(strconv.Itoa(width)+".", depth)
		u, _ = do(c, "FETCH 1 (BODY.PEEK[%s])", strings.TrimSuffix(path, "."))
		if len(u) != 1 || !strings.Contains(u[0], "part 1."+strings.TrimSuffix(path, ".")) {
			t.Errorf("FETCH of the last leaf = %q", u)
		}
	})

	t.Run("ordinary users unchanged", func(t *testing.T) {
		c, _ := dial(t, s.Addr)
		c.MustLogin("user0001", "pw-user0001")
		if got := exists(c, "INBOX"); got != 3 {
			t.Errorf("user0001 INBOX EXISTS = %d, want 3", got)
		}
	})

	t.Run("log has no errors or warnings", func(t *testing.T) { checkLogClean(t, s) })
}

func TestPause(t *testing.T) {
	s := StartT(t, Options{Name: "sleepy", Users: 1, Messages: 1})
	c, _ := dial(t, s.Addr)
	c.MustLogin("user0001", "pw-user0001")
	exists(c, "INBOX")

	if err := s.Pause(); err != nil {
		t.Fatal(err)
	}
	kids, err := descendants(s.pid)
	if err != nil || len(kids) == 0 {
		t.Fatalf("descendants = %v, %v", kids, err)
	}
	for _, p := range append(kids, proc{pid: s.pid}) {
		if st, err := readProcStat(p.pid); err == nil && st.state != 'T' {
			t.Errorf("process %d in state %c after Pause, want T", p.pid, st.state)
		}
	}

	// A session gets no answer; a new connection is accepted by the
	// kernel but gets no greeting.
	if _, err := fmt.Fprintf(c.NetConn, "p1 NOOP\r\n"); err != nil {
		t.Fatal(err)
	}
	hang := func(conn net.Conn, what string) {
		t.Helper()
		if err := conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		var ne net.Error
		if n, err := conn.Read(make([]byte, 100)); n != 0 || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("%s of a paused Dovecot: read %d bytes, %v; want a timeout", what, n, err)
		}
	}
	hang(c.NetConn, "NOOP")
	fresh, err := net.DialTimeout("tcp", s.Addr, ioTimeout)
	if err != nil {
		t.Fatalf("dial a paused Dovecot: %v, want the kernel to accept", err)
	}
	defer fresh.Close()
	hang(fresh, "greeting")

	if err := s.Resume(); err != nil {
		t.Fatal(err)
	}
	l, err := c.Conn.ReadFull()
	if err != nil || !strings.HasPrefix(l, "p1 OK") {
		t.Fatalf("NOOP after Resume = %q, %v; want p1 OK", l, err)
	}
	if _, r := do(c, "NOOP"); !strings.HasPrefix(r, "OK") {
		t.Errorf("second NOOP after Resume = %q", r)
	}
	g, err := newClient(t, fresh).Conn.ReadFull()
	if err != nil || !strings.HasPrefix(g, "* OK") {
		t.Errorf("greeting after Resume = %q, %v", g, err)
	}

	// Stop (as in StartT's cleanup) copes with a paused instance.
	if err := s.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := s.Stop(); err != nil {
		t.Errorf("Stop of a paused instance: %v", err)
	}
	if ps, _ := descendants(s.pid); len(ps) != 0 {
		t.Errorf("processes left after Stop: %v", ps)
	}
}
