package proxy

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

// TestSoak runs mixed traffic through the proxy against real Dovecot:
// webmail cycles, IDLE sessions, and clients that vanish mid-command. It
// checks that only the injected faults fail, that no session sees another
// user's mail, and that goroutines and heap return to their baseline.
// IMAPPROXY_SOAK sets the duration (default 5s; scripts/soak.sh runs it
// for minutes).
func TestSoak(t *testing.T) {
	d := 5 * time.Second
	if s := os.Getenv("IMAPPROXY_SOAK"); s != "" {
		var err error
		if d, err = time.ParseDuration(s); err != nil || d <= 0 || d > time.Hour {
			t.Fatalf("IMAPPROXY_SOAK=%q: want a duration up to 1h", s)
		}
	}
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "soak", Users: 8, Messages: 20, BigMessages: 1})
	// Warnings only: a trace-level log of minutes of traffic, kept in
	// memory by the test harness, would be most of the heap measured.
	logs := &testkit.SyncBuffer{}
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) {
		o.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: logs})
		o.Pool = pool.New(pool.Options{Logger: o.Logger.Named("pool")})
	})
	defer func() {
		if t.Failed() {
			t.Logf("proxy warnings:\n%s", logs.String())
		}
	}()

	runtime.GC()
	baseGoroutines := runtime.NumGoroutine()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	baseHeap := ms.HeapInuse

	var (
		cycles, idles, aborts atomic.Int64
		mu                    sync.Mutex
		failures              []string
	)
	fail := func(format string, a ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, a...))
		}
	}
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Go(func() {
			rnd := rand.New(rand.NewPCG(uint64(w), 7))
			for i := 0; time.Now().Before(deadline) && i < 100000; i++ {
				user := dovecottest.UserName(1 + rnd.IntN(8))
				var err error
				switch k := rnd.IntN(10); {
				case k < 7:
					err = soakWebmail(p.addr, user, dc.PasswordOf(user))
					cycles.Add(1)
				case k < 9:
					err = soakIdle(p.addr, user, dc.PasswordOf(user))
					idles.Add(1)
				default:
					err = soakAbort(p.addr, user, dc.PasswordOf(user))
					aborts.Add(1)
				}
				if err != nil {
					fail("%s: %v", user, err)
				}
			}
		})
	}
	wg.Wait()
	p.waitSessions(t, 0)
	for _, f := range failures {
		t.Error(f)
	}

	// Goroutines and heap settle back: the sweeper keeps only cached
	// connections, which hold no goroutine.
	settle := time.Now().Add(10 * time.Second)
	var g int
	for {
		runtime.GC()
		g = runtime.NumGoroutine()
		if g <= baseGoroutines+2 || time.Now().After(settle) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	runtime.ReadMemStats(&ms)
	t.Logf("soak %v: %d webmail cycles, %d IDLE sessions, %d aborted sessions; goroutines %d -> %d; heap in use %d KiB -> %d KiB; cached conns %d",
		d, cycles.Load(), idles.Load(), aborts.Load(), baseGoroutines, g, baseHeap>>10, ms.HeapInuse>>10, p.srv.Pool().Stats().Cached)
	if g > baseGoroutines+2 {
		t.Errorf("goroutines %d after the soak, baseline %d: a leak", g, baseGoroutines)
	}
	if ms.HeapInuse > baseHeap+8<<20 {
		t.Errorf("heap in use grew from %d KiB to %d KiB", baseHeap>>10, ms.HeapInuse>>10)
	}
}

// soakClient is a throwaway IMAP client that returns errors instead of
// failing the test, for use from many goroutines.
type soakClient struct {
	c   net.Conn
	buf []byte
	n   int
}

func soakDial(addr string) (*soakClient, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	s := &soakClient{c: c}
	if _, err := s.line(); err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

// line reads one line, literals inlined.
func (s *soakClient) line() (string, error) {
	var out strings.Builder
	for {
		i := strings.IndexByte(string(s.buf), '\n')
		for i < 0 {
			b := make([]byte, 64<<10)
			n, err := s.c.Read(b)
			if err != nil {
				return "", err
			}
			s.buf = append(s.buf, b[:n]...)
			i = strings.IndexByte(string(s.buf), '\n')
		}
		l := string(s.buf[:i+1])
		s.buf = s.buf[i+1:]
		out.WriteString(l)
		n, ok := testkit.LiteralSize(strings.TrimRight(l, "\r\n"))
		if !ok {
			return out.String(), nil
		}
		for len(s.buf) < n {
			b := make([]byte, 64<<10)
			m, err := s.c.Read(b)
			if err != nil {
				return "", err
			}
			s.buf = append(s.buf, b[:m]...)
		}
		out.Write(s.buf[:n])
		s.buf = s.buf[n:]
	}
}

// cmd sends a command and returns all it got up to the tagged reply.
func (s *soakClient) cmd(format string, a ...any) (string, error) {
	s.n++
	tag := fmt.Sprintf("s%d", s.n)
	if _, err := fmt.Fprintf(s.c, tag+" "+format+"\r\n", a...); err != nil {
		return "", err
	}
	var all strings.Builder
	for {
		l, err := s.line()
		if err != nil {
			return all.String(), err
		}
		all.WriteString(l)
		if strings.HasPrefix(l, tag+" ") {
			if !strings.HasPrefix(l, tag+" OK") {
				return all.String(), fmt.Errorf("%s: %s", format, strings.TrimSpace(l))
			}
			return all.String(), nil
		}
	}
}

func soakLogin(addr, user, pass string) (*soakClient, error) {
	s, err := soakDial(addr)
	if err != nil {
		return nil, err
	}
	if _, err := s.cmd("LOGIN %s %s", user, testkit.Quote(pass)); err != nil {
		s.c.Close()
		return nil, err
	}
	return s, nil
}

// soakSelect logs in and selects mailbox; the caller closes the client.
func soakSelect(addr, user, pass, mailbox string) (*soakClient, error) {
	s, err := soakLogin(addr, user, pass)
	if err != nil {
		return nil, err
	}
	if _, err := s.cmd("SELECT %s", mailbox); err != nil {
		s.c.Close()
		return nil, err
	}
	return s, nil
}

func soakWebmail(addr, user, pass string) error {
	s, err := soakSelect(addr, user, pass, "INBOX")
	if err != nil {
		return err
	}
	defer s.c.Close()
	out, err := s.cmd("UID FETCH 1:20 (FLAGS RFC822.SIZE ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
	if err != nil {
		return err
	}
	subjects := subjectRe.FindAllStringSubmatch(out, -1)
	if len(subjects) != 20 {
		return fmt.Errorf("FETCH returned %d subjects, want 20", len(subjects))
	}
	for _, m := range subjects {
		if m[1] != user {
			return fmt.Errorf("session of %s sees mail of %s", user, m[1])
		}
	}
	_, err = s.cmd("LOGOUT")
	return err
}

var subjectRe = regexp.MustCompile(`Subject: msg \d+ for (user\d+)`)

func soakIdle(addr, user, pass string) error {
	s, err := soakSelect(addr, user, pass, "INBOX")
	if err != nil {
		return err
	}
	defer s.c.Close()
	fmt.Fprintf(s.c, "i IDLE\r\n")
	l, err := s.line()
	if err != nil || !strings.HasPrefix(l, "+") {
		return fmt.Errorf("IDLE: %q %v", l, err)
	}
	fmt.Fprintf(s.c, "DONE\r\n")
	for {
		l, err := s.line()
		if err != nil {
			return err
		}
		if strings.HasPrefix(l, "i ") {
			break
		}
	}
	_, err = s.cmd("LOGOUT")
	return err
}

// soakAbort vanishes mid-FETCH of a big message or in IDLE: the fault the
// proxy must absorb without caching the connection.
func soakAbort(addr, user, pass string) error {
	s, err := soakSelect(addr, user, pass, "Big")
	if err != nil {
		return err
	}
	defer s.c.Close()
	fmt.Fprintf(s.c, "f FETCH 1 BODY[]\r\n")
	b := make([]byte, 100)
	s.c.Read(b)
	return nil
}
