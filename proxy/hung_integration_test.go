package proxy

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// hang freezes a Dovecot started by dovecottest, master and sessions with
// their sockets open, as a stopped process or an NFS stall does, and
// resumes it at cleanup. dovecottest starts the master in a process group
// of its own, so the group's ID is the master's pid, found by its
// configuration file on the command line.
func hang(t *testing.T, dc *dovecottest.Server) {
	t.Helper()
	conf := filepath.Join(dc.Dir, "dovecot.conf")
	pgid := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, f := range procs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) > 0 && strings.HasSuffix(args[0], "dovecot") && strings.Contains(string(b), "\x00"+conf+"\x00") {
			pgid, _ = strconv.Atoi(filepath.Base(filepath.Dir(f)))
			break
		}
	}
	if pgid == 0 {
		t.Fatalf("no dovecot master found for %s", conf)
	}
	if err := syscall.Kill(-pgid, syscall.SIGSTOP); err != nil {
		t.Fatalf("SIGSTOP %s: %v", dc.Name, err)
	}
	t.Cleanup(func() { syscall.Kill(-pgid, syscall.SIGCONT) })
}

// TestHungBackendLeaves: a backend that hangs with a few dozen cached
// connections leaves the set. The change is applied at once, the next
// change (the other backend failing too) as well, logins go on elsewhere
// meanwhile, and Shutdown returns by its deadline with every slot back.
// Before, each cached connection was logged out in turn under the
// backend-set lock, for up to timeouts.check each: minutes.
func TestHungBackendLeaves(t *testing.T) {
	const cached = 40
	dcs := []*dovecottest.Server{
		dovecottest.StartT(t, dovecottest.Options{Name: "hung", Users: 120, Messages: -1}),
		dovecottest.StartT(t, dovecottest.Options{Name: "other", Users: 120, Messages: -1}),
	}
	p := startProxy(t, dcs, func(o *Options) { o.Dialer.CheckTimeout = 5 * time.Second })
	set := p.srv.Backends()
	ring := p.srv.backends.Load().Ring()
	var onHung, onOther []string
	for i := 1; i <= 120; i++ {
		u := dovecottest.UserName(i)
		if b, _ := ring.Pick(u); b.ID == "hung" {
			onHung = append(onHung, u)
		} else {
			onOther = append(onOther, u)
		}
	}
	if len(onHung) < cached || len(onOther) == 0 {
		t.Fatalf("users on hung = %d, on other = %d; want %d and some", len(onHung), len(onOther), cached)
	}
	for _, u := range onHung[:cached] {
		c := testkit.Dial(t, p.addr)
		c.MustLogin(u, dcs[0].PasswordOf(u))
		c.Logout()
	}
	p.waitIdle(t)
	p.waitCached(t, cached)

	hang(t, dcs[0])
	start := time.Now()
	p.srv.SetBackends(set[1:])
	first := time.Since(start)
	// Logins of users of the remaining backend go on meanwhile.
	u := onOther[0]
	c := testkit.Dial(t, p.addr)
	c.MustLogin(u, dcs[1].PasswordOf(u))
	c.Logout()
	start = time.Now()
	p.srv.SetBackends(nil)
	second := time.Since(start)
	if n := len(p.srv.Backends()); n != 0 {
		t.Fatalf("backends after the second change = %d, want 0", n)
	}
	t.Logf("hung backend with %d cached connections left the set in %v; the next change applied in %v", cached, first, second)
	if first > time.Second || second > time.Second {
		t.Errorf("changes applied in %v and %v, want each within 1s", first, second)
	}
	if st := p.srv.Pool().Stats(); st.Closing < cached {
		t.Errorf("closes under way = %d, want the hung backend's %d still logging out", st.Closing, cached)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start = time.Now()
	p.srv.Shutdown(ctx)
	took := time.Since(start)
	t.Logf("Shutdown with a 500ms deadline returned in %v", took)
	if took > time.Second {
		t.Errorf("Shutdown took %v, want about its 500ms deadline", took)
	}
	if st := p.srv.Pool().Stats(); st.Open != 0 || st.Closing != 0 {
		t.Errorf("pool after Shutdown = %+v, want every slot back", st)
	}
}
