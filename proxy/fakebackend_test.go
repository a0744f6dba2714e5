package proxy

import (
	"bufio"
	"encoding/base64"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// fakeBackend is a scripted IMAP server on 127.0.0.1 for unit tests of the
// session state machine: it knows just enough IMAP to log in and answer,
// and lets a test take over any command with hook.
type fakeBackend struct {
	t        testing.TB
	ln       net.Listener
	greeting string
	postCaps string
	password string

	// hook, if set, may answer a command itself (returning true).
	hook func(c *fakeConn, tag, cmd, line string) bool

	logins  atomic.Int32
	logouts atomic.Int32
	mu      sync.Mutex
	conns   []*fakeConn
	wg      sync.WaitGroup
}

type fakeConn struct {
	conn net.Conn
	r    *bufio.Reader
	mu   sync.Mutex
}

func (c *fakeConn) write(s string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn.Write([]byte(s))
}

func newFakeBackend(t testing.TB) *fakeBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &fakeBackend{
		t:        t,
		ln:       ln,
		greeting: "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN] fake ready\r\n",
		postCaps: "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES UNSELECT COMPRESS=DEFLATE LITERAL+ CONDSTORE",
		password: "secret",
	}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(func() {
		ln.Close()
		b.mu.Lock()
		for _, c := range b.conns {
			c.conn.Close()
		}
		b.mu.Unlock()
		b.wg.Wait()
	})
	return b
}

func (b *fakeBackend) addr() string { return b.ln.Addr().String() }

func (b *fakeBackend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		fc := &fakeConn{conn: c, r: bufio.NewReader(c)}
		b.mu.Lock()
		b.conns = append(b.conns, fc)
		b.mu.Unlock()
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			defer c.Close()
			b.handle(fc)
		}()
	}
}

// conn returns the i-th accepted connection.
func (b *fakeBackend) conn(i int) *fakeConn {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i >= len(b.conns) {
		b.t.Fatalf("backend has %d conns, want #%d", len(b.conns), i)
	}
	return b.conns[i]
}

func (b *fakeBackend) handle(c *fakeConn) {
	selected := false
	c.write(b.greeting)
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		tag, rest, _ := strings.Cut(line, " ")
		cmd, _, _ := strings.Cut(rest, " ")
		cmd = strings.ToUpper(cmd)
		if b.hook != nil && b.hook(c, tag, cmd, line) {
			continue
		}
		switch cmd {
		case "CAPABILITY":
			c.write("* CAPABILITY " + b.postCaps + "\r\n" + tag + " OK done\r\n")
		case "ID":
			c.write("* ID (\"name\" \"fake\")\r\n" + tag + " OK ID done\r\n")
		case "AUTHENTICATE":
			f := strings.Fields(rest)
			raw, _ := base64.StdEncoding.DecodeString(f[len(f)-1])
			parts := strings.Split(string(raw), "\x00")
			if len(parts) == 3 && parts[2] == b.password {
				b.logins.Add(1)
				c.write(tag + " OK [CAPABILITY " + b.postCaps + "] Logged in\r\n")
			} else {
				c.write(tag + " NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
			}
		case "NOOP":
			c.write(tag + " OK " + cmd + " done\r\n")
		case "UNSELECT", "CLOSE":
			// As Dovecot answers.
			if !selected {
				c.write(tag + " BAD No mailbox selected.\r\n")
				continue
			}
			selected = false
			c.write(tag + " OK " + cmd + " done\r\n")
		case "SELECT", "EXAMINE":
			selected = true
			c.write("* 2 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n" + tag + " OK [READ-WRITE] selected\r\n")
		case "FETCH":
			c.write("* 1 FETCH (BODY[] {5}\r\nhello)\r\n" + tag + " OK fetched\r\n")
		case "LOGOUT":
			b.logouts.Add(1)
			c.write("* BYE bye\r\n" + tag + " OK logged out\r\n")
			return
		default:
			c.write(tag + " BAD unknown command\r\n")
		}
	}
}
