package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// testReload changes the configuration under a running daemon with
// SIGHUP: a second listener appears, a limit tightens, and neither the
// cache nor a session in IDLE is lost; then an invalid file is refused
// with its problems logged, and everything goes on as before.
func (c *cluster) testReload(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	u, idleUser := dovecottest.UserName(901), dovecottest.UserName(902)

	if _, err := c.session(d.addr, u); err != nil {
		t.Fatal(err)
	}
	d.waitMetric(t, "imapproxy_cached_connections", 1)

	idler, idleTag := c.startIdle(t, d.addr, idleUser)

	// A valid change: a second listener and one session per user.
	ports, err := freePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	addr2 := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
	conf := d.conf + fmt.Sprintf("listener \"second\" {\n  address = %q\n}\nlimits {\n  max_sessions_per_user = 1\n}\n", addr2)
	d.rewrite(t, conf)
	d.waitMetric(t, `imapproxy_config_reloads_total{result="success"}`, 1)

	r, err := c.session(addr2, u)
	if err != nil {
		t.Fatalf("session on the new listener: %v", err)
	}
	if !r.reused {
		t.Errorf("the login after the reload was not served from the cache")
	}
	if _, err := c.session(d.addr, u); err != nil {
		t.Errorf("the first listener stopped working: %v", err)
	}
	second, err := dialIMAP(addr2)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if res, err := second.Login(idleUser, c.password(idleUser)); err != nil || !strings.Contains(res.Tagged, "NO [LIMIT]") {
		t.Errorf("second session of %s after max_sessions_per_user = 1: %v %v, want NO [LIMIT]", idleUser, res, err)
	}

	// The first listener now takes PROXY headers from 127.0.0.1: its
	// socket is kept (a new bind of the same address would fail), and
	// from now on a connection without a header is closed while one with
	// a header logs in as the client it names.
	proxied := strings.Replace(conf, fmt.Sprintf("address = %q\n}", d.addr),
		fmt.Sprintf("address = %q\n  proxy_protocol_from = [\"127.0.0.1\"]\n}", d.addr), 1)
	if proxied == conf {
		t.Fatal("no listener block to change")
	}
	d.rewrite(t, proxied)
	d.waitMetric(t, `imapproxy_config_reloads_total{result="success"}`, 2)
	if !strings.Contains(d.log(), "listener settings changed; its socket is kept") {
		t.Errorf("the listener change was not logged")
	}
	raw, err := net.DialTimeout("tcp", d.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	raw.SetDeadline(time.Now().Add(bound))
	raw.Write([]byte("PROXY TCP4 203.0.113.9 127.0.0.1 5555 143\r\n"))
	pc := testkit.NewConn(raw)
	if pc.Greeting, err = pc.ReadLine(); err != nil || !strings.HasPrefix(pc.Greeting, "* OK") {
		t.Fatalf("greeting after a PROXY header: %q %v", pc.Greeting, err)
	}
	if res, err := pc.Login(u, c.password(u)); err != nil || !res.HasPrefix("* OK [XPROXYREUSE]") {
		t.Errorf("login through the PROXY header: %v %v, want a reused connection", res, err)
	}
	pc.Close()
	if !strings.Contains(d.log(), "client=203.0.113.9:5555") {
		t.Errorf("the daemon did not log the client address from the PROXY header")
	}
	// A client that speaks IMAP at once is not a PROXY header: closed.
	plain, err := net.DialTimeout("tcp", d.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	plain.SetDeadline(time.Now().Add(bound))
	plain.Write([]byte("a1 CAPABILITY\r\n"))
	// Closed with our line unread, so the kernel may answer with a reset.
	if b, err := io.ReadAll(plain); err != nil && !errors.Is(err, syscall.ECONNRESET) || len(b) != 0 {
		t.Errorf("a connection without a PROXY header from a listed source got %q (%v), want it closed unanswered", b, err)
	}
	plain.Close()

	// An invalid file changes nothing, and says why.
	bad := strings.Replace(proxied, `drain = "5s"`, `drain = "1d"`, 1)
	if bad == proxied {
		t.Fatal("the daemon's config has no drain line to break")
	}
	d.rewrite(t, bad)
	d.waitMetric(t, `imapproxy_config_reloads_total{result="failure"}`, 1)
	if m := d.metrics(t); m.get("imapproxy_config_last_reload_successful") != 0 {
		t.Errorf("config_last_reload_successful = %v after a failed reload, want 0", m.get("imapproxy_config_last_reload_successful"))
	}
	log := d.log()
	if !strings.Contains(log, "configuration reload failed; the running configuration stays") ||
		!strings.Contains(log, `timeouts.drain: invalid duration \"1d\"`) {
		t.Errorf("the refused reload did not log its problem:\n%s", tailLines(log, 20))
	}
	r, err = c.session(addr2, u)
	if err != nil || !r.reused {
		t.Errorf("after the refused reload: %+v %v, want a reused login on the second listener", r, err)
	}

	// The IDLE session lived through both.
	if err := idler.Send("DONE\r\n"); err != nil {
		t.Fatal(err)
	}
	for {
		l, err := idler.ReadLine()
		if err != nil {
			t.Fatalf("IDLE session after the reloads: %v", err)
		}
		if strings.HasPrefix(l, idleTag+" ") {
			if !strings.HasPrefix(l, idleTag+" OK") {
				t.Errorf("IDLE ended with %q", l)
			}
			break
		}
	}
}

// rewrite replaces the daemon's config file and sends SIGHUP.
func (d *daemonProc) rewrite(t *testing.T, conf string) {
	t.Helper()
	if err := os.WriteFile(d.confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
}
