package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// testFlappingCheck flips one backend's Consul maintenance on and off four
// times: its users move to their next backend once and stay there, their
// cached connections there reused at every flip (no fresh login per
// flip), and they return only once the backend has stayed in the set for
// cluster.rejoin_hold.
func (c *cluster) testFlappingCheck(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true, rejoinHold: "10s"})
	flapper := c.backends[2]
	ring, without := c.ring(), c.ring(flapper.id)
	var movers []string
	for _, u := range users(301, 360) {
		if c.pick(ring, u) == flapper.id {
			movers = append(movers, u)
		}
	}
	if len(movers) < 5 {
		t.Fatalf("only %d sample users on %s", len(movers), flapper.id)
	}
	c.round(t, d, movers)
	before := c.userLogins(t, movers)

	const flaps = 4
	for i := range flaps {
		flapped := strings.Count(d.log(), "left again while held back")
		if err := agent.Maintenance(flapper.id, true); err != nil {
			t.Fatal(err)
		}
		d.waitMetric(t, "imapproxy_backends", 2)
		if i > 0 {
			// Held back, it is out of the proxy's set already: wait
			// for the proxy to see it leave Consul's.
			waitFor(t, "the proxy to see the backend leave again", func() (bool, string) {
				n := strings.Count(d.log(), "left again while held back")
				return n > flapped, fmt.Sprintf("%d flapping messages, %d before", n, flapped)
			})
		}
		for u, r := range c.round(t, d, movers) {
			if want := c.pick(without, u); r.backend != want {
				t.Fatalf("flap %d, %s down: %s on %s, want %s", i+1, flapper.id, u, r.backend, want)
			}
			if i > 0 && !r.reused {
				t.Errorf("flap %d: %s logged in afresh on %s; its cached connection there should serve it", i+1, u, r.backend)
			}
		}
		held := strings.Count(d.log(), "held back from the set")
		if err := agent.Maintenance(flapper.id, false); err != nil {
			t.Fatal(err)
		}
		// Consul may report the return in more than one step: wait
		// for the proxy's first word of it.
		waitFor(t, "the proxy to see the backend back and hold it", func() (bool, string) {
			n := strings.Count(d.log(), "held back from the set")
			return n > held, fmt.Sprintf("%d hold messages, %d before", n, held)
		})
		for u, r := range c.round(t, d, movers) {
			if want := c.pick(without, u); r.backend != want || !r.reused {
				t.Fatalf("flap %d, %s held back: %s on %s (reused %v), want a reused login on %s", i+1, flapper.id, u, r.backend, r.reused, want)
			}
		}
	}
	// Once it has stayed for rejoin_hold, the users go home.
	d.waitMetric(t, "imapproxy_backends", 3)
	for u, r := range c.round(t, d, movers) {
		if r.backend != flapper.id {
			t.Errorf("after the flapping: %s on %s, want %s", u, r.backend, flapper.id)
		}
	}
	after := c.userLogins(t, movers)
	for _, u := range movers {
		fb := c.pick(without, u)
		if n := after[u][fb] - before[u][fb]; n != 1 {
			t.Errorf("%s: %d backend logins on its fallback %s over %d flaps, want 1", u, n, fb, flaps)
		}
		if n := after[u][flapper.id] - before[u][flapper.id]; n != 1 {
			t.Errorf("%s: %d backend logins on %s, want 1 (its return)", u, n, flapper.id)
		}
	}
}

// faultyConsul stands between the daemon and the agent and answers as told:
// normally, with 500s, or slowly.
type faultyConsul struct {
	mode   atomic.Int32 // consulOK, consul500, consulSlow
	served atomic.Int64 // 500s written
	rp     *httputil.ReverseProxy
}

const (
	consulOK int32 = iota
	consul500
	consulSlow
)

func (f *faultyConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch f.mode.Load() {
	case consul500:
		f.served.Add(1)
		http.Error(w, "injected by the test", http.StatusInternalServerError)
		return
	case consulSlow:
		// A fault to inject, not a wait for something: each answer
		// comes 3 s late.
		select {
		case <-time.After(3 * time.Second):
		case <-r.Context().Done():
			return
		}
	}
	f.rp.ServeHTTP(w, r)
}

// testConsulFaults puts a fault injector between the daemon and Consul:
// while Consul answers 500s or answers slowly, the daemon serves on the
// last good set, keeps its cache (every login reuses), and reports
// discovery down; when Consul is well again it recovers by itself and
// sees the next change.
func (c *cluster) testConsulFaults(t *testing.T) {
	agent := c.newAgent(t)
	target, err := url.Parse("http://" + agent.Addr)
	if err != nil {
		t.Fatal(err)
	}
	f := &faultyConsul{rp: httputil.NewSingleHostReverseProxy(target)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: f}
	go hs.Serve(ln)
	defer hs.Close()

	d := c.startDaemon(t, agent, daemonOptions{cache: true, consulAddr: ln.Addr().String()})
	ring := c.ring()
	sample := users(401, 430)
	c.round(t, d, sample)
	d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)))
	gone0 := d.metrics(t).get(`imapproxy_cache_closed_total{cause="backend_gone"}`)

	check := func(phase string) {
		t.Helper()
		for u, r := range c.round(t, d, sample) {
			if want := c.pick(ring, u); r.backend != want || !r.reused {
				t.Errorf("%s: %s on %s (reused %v), want a reused login on %s", phase, u, r.backend, r.reused, want)
			}
		}
		m := d.metrics(t)
		if m.get("imapproxy_backends") != 3 || m.get(`imapproxy_cache_closed_total{cause="backend_gone"}`) != gone0 {
			t.Errorf("%s: the set or the cache changed: %s", phase, m.summary())
		}
	}

	f.mode.Store(consul500)
	d.waitMetric(t, "imapproxy_discovery_up", 0)
	check("Consul answering 500")
	if f.served.Load() == 0 {
		t.Fatal("no 500 was served")
	}

	f.mode.Store(consulSlow)
	check("Consul answering slowly")

	f.mode.Store(consulOK)
	d.waitMetric(t, "imapproxy_discovery_up", 1)
	check("Consul well again")
	// The watch is live again: a change in Consul reaches the proxy.
	c.flipMaintenance(t, agent, d, c.backends[0].id)
	if !strings.Contains(d.log(), "500") {
		t.Errorf("the daemon did not log Consul's errors")
	}
}

// testSelfRegistration runs the daemon with a register block: Consul
// shows it as a passing "imapproxy" instance at its listener's address
// (a TCP check Consul runs against it), and SIGTERM takes it out of
// Consul before the process exits.
func (c *cluster) testSelfRegistration(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true,
		extra: "register {\n  id = \"proxy-under-test\"\n  tags = [\"webmail\"]\n  check_interval = \"1s\"\n}\n"})
	hc := &http.Client{Timeout: 5 * time.Second}
	type entry struct {
		Service struct {
			ID      string
			Address string
			Port    int
			Tags    []string
		}
	}
	passing := func() ([]entry, error) {
		resp, err := hc.Get("http://" + agent.Addr + "/v1/health/service/imapproxy?passing=true")
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var es []entry
		return es, json.NewDecoder(resp.Body).Decode(&es)
	}
	waitFor(t, "the proxy passing in Consul", func() (bool, string) {
		es, err := passing()
		return err == nil && len(es) == 1, fmt.Sprintf("%+v %v", es, err)
	})
	es, _ := passing()
	host, port, _ := net.SplitHostPort(d.addr)
	if s := es[0].Service; s.ID != "proxy-under-test" || s.Address != host || fmt.Sprint(s.Port) != port || !slices.Contains(s.Tags, "webmail") {
		t.Errorf("registered %+v, want proxy-under-test at %s with tag webmail", s, d.addr)
	}
	d.waitMetric(t, "imapproxy_consul_registered", 1)

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, err := d.wait(bound); err != nil || code != 0 {
		t.Fatalf("exit after SIGTERM: %d %v", code, err)
	}
	resp, err := hc.Get("http://" + agent.Addr + "/v1/agent/service/proxy-under-test")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("after exit the agent answers %s for the proxy's service, want 404 (deregistered)", resp.Status)
	}
	if !strings.Contains(d.log(), "registering in Consul") {
		t.Errorf("the daemon did not log its registration")
	}
}

// testLastBackendMaintenance: the only healthy backend goes into Consul
// maintenance for 5 s. Damping (rejoin_hold 30 s) must not hold it back
// when users have nowhere else to go: logins work again within a few
// seconds of its return (bound: 5 s; measured and logged), and a session
// on it that outlived the outage is not ended when backend_drain (10 s)
// runs out. Before, every login was refused for rejoin_hold after the
// return (35 s in all), and the session got BYE at the drain.
func (c *cluster) testLastBackendMaintenance(t *testing.T) {
	const (
		outage     = 5 * time.Second
		drain      = 10 * time.Second
		loginBound = 5 * time.Second
	)
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true, rejoinHold: "30s", drain: drain.String()})
	last := c.backends[2]
	for _, b := range c.backends[:2] {
		if err := agent.Maintenance(b.id, true); err != nil {
			t.Fatal(err)
		}
	}
	d.waitMetric(t, "imapproxy_backends", 1)
	user := users(401, 401)[0]
	idle, tag := c.startIdle(t, d.addr, user)

	if err := agent.Maintenance(last.id, true); err != nil {
		t.Fatal(err)
	}
	away := time.Now()
	d.waitMetric(t, "imapproxy_backends", 0)
	ic, err := dialIMAP(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := ic.Login(user, c.password(user)); err != nil || !strings.Contains(res.String(), "No IMAP server available") {
		t.Errorf("login during the outage: %v %v, want NO No IMAP server available", res, err)
	}
	ic.Close()
	// The outage itself: Consul has no healthy backend for this long.
	time.Sleep(outage - time.Since(away))
	if err := agent.Maintenance(last.id, false); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	var r sessionResult
	for {
		if r, err = c.session(d.addr, user); err == nil {
			break
		}
		if time.Since(back) > bound {
			t.Fatalf("no login within %v of the backend's return: %v", bound, err)
		}
		time.Sleep(pollEvery)
	}
	took := time.Since(back)
	t.Logf("logins work again %v after the only backend's return from a %v maintenance (rejoin_hold 30s)", took.Round(time.Millisecond), outage)
	if took > loginBound {
		t.Errorf("first login %v after the return, want within %v", took, loginBound)
	}
	if r.backend != last.id {
		t.Errorf("login on %s, want %s", r.backend, last.id)
	}

	// Past the drain time counted from the backend's leaving, the
	// session is still there: end its IDLE and use it.
	waitFor(t, "the drain time to pass", func() (bool, string) {
		return time.Since(away) > drain+time.Second, "waiting"
	})
	if strings.Contains(d.log(), "ending sessions on a drained backend") {
		t.Errorf("sessions were ended on a backend Consul has as healthy")
	}
	if err := idle.Send("DONE\r\n"); err != nil {
		t.Fatal(err)
	}
	for {
		l, err := idle.ReadLine()
		if err != nil {
			t.Fatalf("the session on %s after the outage: %v", last.id, err)
		}
		if strings.HasPrefix(l, "* BYE") {
			t.Fatalf("the session on %s got %q", last.id, l)
		}
		if strings.HasPrefix(l, tag+" ") {
			if !strings.HasPrefix(l, tag+" OK") {
				t.Fatalf("IDLE ended with %q", l)
			}
			break
		}
	}
}
