package main

import (
	"bufio"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// testSIGTERMUnderLoad stops the daemon while eight clients run login
// cycles as fast as they can and four sit in IDLE: every client ends
// (BYE or a refused connection, never a hang), the process exits 0, and
// every backend connection the daemon opened was logged out, none just
// dropped: Dovecot logs a "Logged out" for each of the daemon's logins.
func (c *cluster) testSIGTERMUnderLoad(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	us := users(701, 740)
	before := c.userLogins(t, us)

	var cycles atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			// Bounded: it ends at the first error, which the
			// shutdown makes certain.
			for i := 0; i < 100000; i++ {
				u := us[(w*7+i)%len(us)]
				if _, err := c.session(d.addr, u); err != nil {
					return
				}
				cycles.Add(1)
				select {
				case <-stop:
					return
				default:
				}
			}
		})
	}
	idlers := make([]*testkit.Conn, 4)
	idleTags := make([]string, len(idlers))
	for i := range idlers {
		idlers[i], idleTags[i] = c.startIdle(t, d.addr, us[len(us)-1-i])
	}
	waitFor(t, "load running with connections cached", func() (bool, string) {
		m, err := d.scrape()
		if err != nil {
			return false, err.Error()
		}
		return cycles.Load() >= 50 && m.get("imapproxy_cached_connections") > 0,
			fmt.Sprintf("%d cycles, %s", cycles.Load(), m.summary())
	})

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for i, ic := range idlers {
		lines, err := ic.ReadToEOF()
		if err != nil {
			t.Errorf("IDLE client %d: %v", i, err)
		}
		iOK := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, idleTags[i]+" OK") })
		iBye := slices.Index(lines, "* BYE Server shutting down")
		if iOK < 0 || iBye < iOK {
			t.Errorf("IDLE client %d got %q, want its IDLE completed and then BYE", i, lines)
		}
	}
	workersDone := make(chan struct{})
	go func() { wg.Wait(); close(workersDone) }()
	select {
	case <-workersDone:
	case <-time.After(bound):
		close(stop)
		t.Fatalf("cycling clients still running %v after SIGTERM", bound)
	}
	code, err := d.wait(bound)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Errorf("exit code after SIGTERM under load = %d, want 0", code)
	}
	if _, err := net.DialTimeout("tcp", d.addr, time.Second); err == nil {
		t.Errorf("listener %s still accepts after exit", d.addr)
	}

	// Each backend login of these users through the daemon has its
	// logout in Dovecot's log (written a moment late by its log process,
	// a session's logout always after its login).
	// "Disconnected: Logged out" is a LOGOUT; any other "Disconnected:"
	// (Connection closed, inactivity) is a connection dropped.
	logoutRE := regexp.MustCompile(`(?m)imap\((user07[0-4]\d)\)<\d+><[^>]*>: Info: ((?:Disconnected: )?Logged out|Disconnected:)`)
	var logins, logouts, dropped int
	waitFor(t, "a logout in Dovecot's log for every login", func() (bool, string) {
		after := c.userLogins(t, us)
		logins, logouts, dropped = 0, 0, 0
		for _, u := range us {
			for _, b := range c.backends {
				logins += after[u][b.id] - before[u][b.id]
			}
		}
		for _, b := range c.backends {
			for _, m := range logoutRE.FindAllStringSubmatch(b.srv.Log(), -1) {
				if !slices.Contains(us, m[1]) {
					continue
				}
				if strings.HasSuffix(m[2], "Logged out") { // not "Disconnected:" alone
					logouts++
				} else {
					dropped++
				}
			}
		}
		return logins > 0 && logouts+dropped >= logins,
			fmt.Sprintf("%d logins, %d logged out, %d disconnected", logins, logouts, dropped)
	})
	if dropped != 0 {
		t.Errorf("%d backend connections were dropped instead of logged out (%d logins, %d logouts)", dropped, logins, logouts)
	}
	t.Logf("%d cycles before SIGTERM; %d backend logins, all logged out", cycles.Load(), logins)
}

// testOutOfFileDescriptors runs the daemon with 64 file descriptors and
// opens connections until it runs out: the client that finds no
// descriptor is told so with a BYE (not left in the accept queue), the
// proxy logs it, and once clients go away logins work again.
func (c *cluster) testOutOfFileDescriptors(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true, nofile: 64})

	var held []net.Conn
	defer func() {
		for _, conn := range held {
			conn.Close()
		}
	}()
	var bye string
	// Bounded: 64 descriptors run out long before 200 connections.
	for i := 0; i < 200 && bye == ""; i++ {
		conn, err := net.DialTimeout("tcp", d.addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conn.SetReadDeadline(time.Now().Add(bound))
		l, err := bufio.NewReader(conn).ReadString('\n')
		switch {
		case err != nil:
			conn.Close()
			t.Fatalf("connection %d: no greeting: %v", i, err)
		case strings.HasPrefix(l, "* OK"):
			held = append(held, conn)
		default:
			conn.Close()
			bye = strings.TrimSpace(l)
		}
	}
	if bye != "* BYE [UNAVAILABLE] Server out of resources, try again later" {
		t.Fatalf("after %d connections the next got %q, want the out-of-resources BYE", len(held), bye)
	}
	if !strings.Contains(d.log(), "connection refused: out of file descriptors") {
		t.Errorf("the daemon did not log the refusal")
	}
	t.Logf("%d connections held before the proxy ran out of descriptors", len(held))
	for _, conn := range held {
		conn.Close()
	}
	held = nil

	// Recovered: a whole login cycle works again once descriptors are
	// free (the proxy sees the closes a moment later).
	u := dovecottest.UserName(801)
	waitFor(t, "a login after clients left", func() (bool, string) {
		_, err := c.session(d.addr, u)
		return err == nil, fmt.Sprint(err)
	})
	if m := d.metrics(t); m.get("imapproxy_backends_marked_down_total") != 0 {
		t.Errorf("running out of descriptors marked a backend down: %s", m.summary())
	}
}
