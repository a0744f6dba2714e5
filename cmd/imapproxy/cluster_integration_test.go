package main

// End-to-end tests of the daemon in cluster mode: the real imapproxy binary,
// run as a child process with a config file, in front of three real Dovecot
// backends registered in a real Consul dev agent.
//
// One parent test (TestCluster) builds the binary once and starts the three
// Dovecots (1,000 users each, no mail), which every subtest shares. Each
// subtest gets its own Consul agent (about 0.4 s to start), its own daemon
// and so its own cache and metrics, so that maintenance modes and a stopped
// agent stay inside the subtest that caused them.
//
//	IMAPPROXY_REQUIRE_DOVECOT=1 IMAPPROXY_REQUIRE_CONSUL=1 go test -race -count=1 -v -run TestCluster ./cmd/imapproxy/

import (
	"bufio"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
	"github.com/imapproxy/imapproxy/internal/consultest"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

const (
	// clusterUsers is the number of users on every backend.
	clusterUsers = 1000
	// serviceName is the Consul service the backends are registered as.
	serviceName = "imap"
	// bound limits every wait for observable state (a metric, a log line,
	// a process exit). Tests never assert on how long a step took.
	bound = 30 * time.Second
	// pollEvery is the pause between two looks at observable state.
	pollEvery = 20 * time.Millisecond
	// workers is how many client sessions run at once in a round.
	workers = 8
)

// clusterBackend is one Dovecot and the Consul service instance that
// announces it. The service ID (the hash input) deliberately differs from
// the name Dovecot gives in its ID reply, so that the test checks the
// mapping rather than a coincidence.
type clusterBackend struct {
	id     string // Consul service ID: "imap-N"
	name   string // Dovecot's ID name: "backend-N"
	weight int
	srv    *dovecottest.Server
}

// cluster is what the subtests share.
type cluster struct {
	bin      string // the imapproxy binary
	backends []*clusterBackend
	byName   map[string]*clusterBackend // by Dovecot name
}

func TestCluster(t *testing.T) {
	requireDovecot(t)
	requireConsul(t)
	c := &cluster{byName: map[string]*clusterBackend{}}
	start := time.Now()
	var (
		wg       sync.WaitGroup
		buildErr error
	)
	binDir := t.TempDir()
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.bin, buildErr = buildDaemon(binDir)
	}()
	c.startBackends(t, []int{1, 1, 2}, dovecottest.Options{Users: clusterUsers, Messages: -1})
	wg.Wait()
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	t.Logf("binary built and %d backends with %d users each up in %v", len(c.backends), clusterUsers, time.Since(start).Round(time.Millisecond))

	t.Run("SpreadByWeight", c.testSpreadByWeight)
	t.Run("PinningAndReuse", c.testPinningAndReuse)
	t.Run("FailureMovesOnlyThatBackendsUsers", c.testFailureMovesOnlyItsUsers)
	t.Run("TwoProxiesAgree", c.testTwoProxiesAgree)
	t.Run("ConsulDown", c.testConsulDown)
	t.Run("GracefulSIGTERM", c.testGracefulSIGTERM)
	t.Run("SIGTERMUnderLoad", c.testSIGTERMUnderLoad)
	t.Run("OutOfFileDescriptors", c.testOutOfFileDescriptors)
	t.Run("Reload", c.testReload)
	t.Run("FlappingCheck", c.testFlappingCheck)
	t.Run("LastBackendMaintenance", c.testLastBackendMaintenance)
	t.Run("ConsulFaults", c.testConsulFaults)
	t.Run("SelfRegistration", c.testSelfRegistration)
	t.Run("AdminDrain", c.testAdminDrain)
}

// requireDovecot skips t without Dovecot or root, or fails it with
// IMAPPROXY_REQUIRE_DOVECOT=1, as dovecottest.StartT would: the backends
// are started concurrently with Start, where StartT cannot be used.
func requireDovecot(t *testing.T) {
	t.Helper()
	_, err := dovecottest.Binary()
	if err == nil && os.Geteuid() != 0 {
		err = dovecottest.ErrNotRoot
	}
	if err == nil {
		return
	}
	if os.Getenv(dovecottest.RequireEnv) == "1" {
		t.Fatalf("%v (%s=1)", err, dovecottest.RequireEnv)
	}
	t.Skipf("%v (set %s=1 to fail instead)", err, dovecottest.RequireEnv)
}

// requireConsul skips t without a Consul agent binary, or fails it with
// IMAPPROXY_REQUIRE_CONSUL=1.
func requireConsul(t *testing.T) {
	t.Helper()
	if _, err := consultest.Binary(); err != nil {
		if os.Getenv(consultest.RequireEnv) == "1" {
			t.Fatalf("%v (%s=1)", err, consultest.RequireEnv)
		}
		t.Skipf("%v (set %s=1 to fail instead)", err, consultest.RequireEnv)
	}
}

// buildDaemon builds this package's binary (without -race: that only
// matters in the test process) into dir.
func buildDaemon(dir string) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(dir, "imapproxy")
	cmd := exec.Command(goBin, "build", "-o", bin, ".")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
}

// startBackends starts one Dovecot per weight, concurrently, each with
// the options base and its own name, and stops them when t ends.
func (c *cluster) startBackends(t *testing.T, weights []int, base dovecottest.Options) {
	t.Helper()
	opts := make([]dovecottest.Options, len(weights))
	for i := range opts {
		opts[i] = base
		opts[i].Name = "backend-" + strconv.Itoa(i+1)
	}
	servers, err := dovecottest.StartAll(opts)
	t.Cleanup(func() {
		for _, s := range servers {
			if s != nil && t.Failed() {
				t.Logf("dovecot %s log tail:\n%s", s.Name, tailLines(s.Log(), 20))
			}
		}
		if err := dovecottest.StopAll(servers); err != nil {
			t.Errorf("stop dovecot: %v", err)
		}
	})
	for i, s := range servers {
		if s == nil {
			continue
		}
		b := &clusterBackend{id: "imap-" + strconv.Itoa(i+1), name: s.Name, weight: weights[i], srv: s}
		c.backends = append(c.backends, b)
		c.byName[b.name] = b
	}
	if err != nil {
		t.Fatal(err)
	}
}

// ring is what every proxy should compute for the backends that are up:
// built here from the Consul service IDs and weights alone.
func (c *cluster) ring(except ...string) *balancer.Ring {
	var bs []backend.Backend
	for _, b := range c.backends {
		if !slices.Contains(except, b.id) {
			bs = append(bs, backend.Backend{ID: b.id, Addr: b.srv.Addr, Weight: b.weight})
		}
	}
	return balancer.New(bs, balancer.Options{})
}

func (c *cluster) pick(r *balancer.Ring, user string) string {
	b, ok := r.Pick(user)
	if !ok {
		return ""
	}
	return b.ID
}

func (c *cluster) password(user string) string { return c.backends[0].srv.PasswordOf(user) }

// newAgent starts a Consul agent for t with every backend registered and
// passing.
func (c *cluster) newAgent(t *testing.T) *consultest.Agent {
	t.Helper()
	agent := consultest.StartT(t)
	c.register(t, agent)
	return agent
}

// register announces every backend in agent (weights as Weights.Passing,
// with the harness's TCP check) and waits until Consul reports them all
// passing.
func (c *cluster) register(t *testing.T, agent *consultest.Agent) {
	t.Helper()
	for _, b := range c.backends {
		_, port, _ := net.SplitHostPort(b.srv.Addr)
		p, _ := strconv.Atoi(port)
		s := consultest.Service{Name: serviceName, ID: b.id, Address: "127.0.0.1", Port: p, Weight: b.weight}
		if err := agent.Register(s); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "all backends passing in Consul", func() (bool, string) {
		n, err := passing(agent)
		return err == nil && n == len(c.backends), fmt.Sprintf("passing=%d err=%v", n, err)
	})
}

// passing counts the passing instances of the service, as the proxy's
// watch asks for them.
func passing(agent *consultest.Agent) (int, error) {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + agent.Addr + "/v1/health/service/" + serviceName + "?passing")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var entries []json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
		return 0, err
	}
	return len(entries), nil
}

// users returns user names first..last (1-based, inclusive).
func users(first, last int) []string {
	var us []string
	for i := first; i <= last; i++ {
		us = append(us, dovecottest.UserName(i))
	}
	return us
}

// ---------------------------------------------------------------------
// 1. Spread by weight

func (c *cluster) testSpreadByWeight(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: false})
	ring := c.ring()

	before := c.loginCounts(t)
	all := users(1, clusterUsers)
	res := c.round(t, d, all)

	count := map[string]int{} // service ID -> users
	var wrong []string
	for _, u := range all {
		got := res[u].backend
		count[got]++
		if want := c.pick(ring, u); got != want && len(wrong) < 10 {
			wrong = append(wrong, fmt.Sprintf("%s on %s, balancer.Pick says %s", u, got, want))
		}
	}
	if len(wrong) > 0 {
		t.Errorf("users not on the backend the test's own ring picks (first %d): %s", len(wrong), strings.Join(wrong, "; "))
	}

	// Shares against weight/Σweight, within ±5 percentage points. The
	// mapping is deterministic; with 1,000 users one standard deviation of
	// a 25 % share is about 1.4 points.
	const tolerance = 5.0
	total := 0
	for _, b := range c.backends {
		total += b.weight
	}
	var report []string
	for _, b := range c.backends {
		share := 100 * float64(count[b.id]) / float64(len(all))
		want := 100 * float64(b.weight) / float64(total)
		report = append(report, fmt.Sprintf("%s (weight %d): %d users = %.1f %% (want %.0f %%)", b.id, b.weight, count[b.id], share, want))
		if share < want-tolerance || share > want+tolerance {
			t.Errorf("%s (weight %d) got %.1f %% of users, want %.0f ± %.0f %%", b.id, b.weight, share, want, tolerance)
		}
	}
	t.Logf("spread of %d users: %s", len(all), strings.Join(report, "; "))

	// Dovecot's own logs agree with the ID replies: each backend saw
	// exactly the logins the test counted for it.
	for _, b := range c.backends {
		want := before[b.id] + count[b.id]
		got, err := b.srv.WaitLogins(want, bound)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("%s (%s): dovecot logged %d new logins, ID replies counted %d", b.id, b.name, got-before[b.id], count[b.id])
		}
	}
	m := d.metrics(t)
	if got := m.get("imapproxy_client_logins_fresh_total"); got != float64(len(all)) {
		t.Errorf("imapproxy_client_logins_fresh_total = %v, want %d", got, len(all))
	}
	if got := m.get("imapproxy_failovers_total"); got != 0 {
		t.Errorf("imapproxy_failovers_total = %v, want 0 with every backend up", got)
	}
}

// ---------------------------------------------------------------------
// 2. Pinning and reuse

func (c *cluster) testPinningAndReuse(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	ring := c.ring()
	sample := users(101, 150)

	before := c.userLogins(t, sample)
	perBackend := map[string]int{}
	for _, u := range sample {
		perBackend[c.pick(ring, u)]++
	}
	totalBefore := c.loginCounts(t)

	for cycle := 1; cycle <= 3; cycle++ {
		res := c.round(t, d, sample)
		for _, u := range sample {
			r := res[u]
			if want := c.pick(ring, u); r.backend != want {
				t.Errorf("cycle %d: %s on %s, want %s", cycle, u, r.backend, want)
			}
			if wantReuse := cycle > 1; r.reused != wantReuse {
				t.Errorf("cycle %d: %s: XPROXYREUSE = %v, want %v", cycle, u, r.reused, wantReuse)
			}
		}
		// The logout's connection goes back to the pool after the
		// client has seen EOF (docs/caching.md): wait for the pool to
		// hold every user's connection before the next cycle.
		d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)))
	}

	// Each backend logged exactly one login per sample user of its own,
	// and none for anyone else's.
	for _, b := range c.backends {
		want := totalBefore[b.id] + perBackend[b.id]
		if got, err := b.srv.WaitLogins(want, bound); err != nil || got != want {
			t.Errorf("%s: %d new logins in dovecot's log (err %v), want %d", b.id, got-totalBefore[b.id], err, perBackend[b.id])
		}
	}
	after := c.userLogins(t, sample)
	for _, u := range sample {
		home := c.pick(ring, u)
		for _, b := range c.backends {
			n := after[u][b.id] - before[u][b.id]
			want := 0
			if b.id == home {
				want = 1
			}
			if n != want {
				t.Errorf("%s: %d logins on %s (%s) in 3 cycles, want %d", u, n, b.id, b.name, want)
			}
		}
	}
	m := d.metrics(t)
	if fresh, reused := m.get("imapproxy_client_logins_fresh_total"), m.get("imapproxy_client_logins_reused_total"); fresh != float64(len(sample)) || reused != float64(2*len(sample)) {
		t.Errorf("logins fresh=%v reused=%v, want %d and %d", fresh, reused, len(sample), 2*len(sample))
	}
}

// ---------------------------------------------------------------------
// 3. A backend in maintenance moves only its users, and they come back

func (c *cluster) testFailureMovesOnlyItsUsers(t *testing.T) {
	// The backend that fails is the one with weight 2: it has the most
	// users, and its users' second choices are spread over the other two.
	failed := c.backends[2]
	// Dovecot logs a login after answering it: the count is read once
	// every login this daemon sent (its metric) is in the log.
	base := c.loginCounts(t)[failed.id]
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	ring := c.ring()
	sample := users(201, 260)
	var movers, stayers []string
	for _, u := range sample {
		if c.pick(ring, u) == failed.id {
			movers = append(movers, u)
		} else {
			stayers = append(stayers, u)
		}
	}
	if len(movers) < 5 || len(stayers) < 5 {
		t.Fatalf("sample splits %d on %s / %d elsewhere; pick another sample", len(movers), failed.id, len(stayers))
	}
	t.Logf("%d sample users: %d on %s, %d on the others", len(sample), len(movers), failed.id, len(stayers))

	// Warm the cache: one login each, then wait for every connection to
	// be cached.
	for u, r := range c.round(t, d, sample) {
		if want := c.pick(ring, u); r.backend != want || r.reused {
			t.Fatalf("warm-up: %s on %s (reused %v), want a fresh login on %s", u, r.backend, r.reused, want)
		}
	}
	d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)))

	// Two users outside the sample stay logged in across the change: one
	// on the failing backend (ended after cluster.backend_drain), one on
	// another (untouched).
	var onFailed, onOther *testkit.Conn
	for i := 261; i <= clusterUsers && (onFailed == nil || onOther == nil); i++ {
		u := dovecottest.UserName(i)
		home := c.pick(ring, u)
		if home == failed.id && onFailed != nil || home != failed.id && onOther != nil {
			continue
		}
		ic, err := dialIMAP(d.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ic.Close()
		if res, err := ic.Login(u, c.password(u)); err != nil || !res.OK() {
			t.Fatalf("LOGIN %s: %v %v", u, res, err)
		}
		if home == failed.id {
			onFailed = ic
		} else {
			onOther = ic
		}
	}
	drained0 := d.metrics(t).get("imapproxy_sessions_drained_total")

	// Maintenance on: the proxy drops the backend and closes its cached
	// connections.
	m0 := d.metrics(t)
	gone0 := m0.get(`imapproxy_cache_closed_total{cause="backend_gone"}`)
	sent := int(d.metrics(t).get(fmt.Sprintf(`imapproxy_backend_logins_total{backend=%q,result="ok"}`, failed.id)))
	failedLogins, err := failed.srv.WaitLogins(base+sent, bound)
	if err != nil || failedLogins != base+sent {
		t.Fatalf("%s logged %d logins before maintenance (err %v), want %d", failed.id, failedLogins-base, err, sent)
	}
	t0 := time.Now()
	if err := agent.Maintenance(failed.id, true); err != nil {
		t.Fatal(err)
	}
	var m metrics
	waitFor(t, "backend dropped and its cached connections closed", func() (bool, string) {
		m = d.metrics(t)
		ok := m.get("imapproxy_backends") == 2 &&
			m.get(`imapproxy_cache_closed_total{cause="backend_gone"}`) >= gone0+float64(len(movers))
		return ok, m.summary()
	})
	elapsed := time.Since(t0)
	t.Logf("MEASURED: Maintenance(%s) to backends=2 and %d cached connections closed (backend_gone): %v",
		failed.id, len(movers), elapsed.Round(time.Millisecond))
	if got := m.get(`imapproxy_cache_closed_total{cause="backend_gone"}`) - gone0; got != float64(len(movers)) {
		t.Errorf("backend_gone closes = %v, want %d (one per cached user of %s)", got, len(movers), failed.id)
	}
	if got := m.get("imapproxy_cached_connections"); got != float64(len(stayers)) {
		t.Errorf("imapproxy_cached_connections = %v, want %d (the other backends' users)", got, len(stayers))
	}

	// The session on the failed backend is ended after backend_drain
	// (1s); the other one goes on.
	lines, err := onFailed.ReadToEOF()
	if err != nil {
		t.Errorf("session on %s: %v", failed.id, err)
	}
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, "* BYE [UNAVAILABLE]") }) {
		t.Errorf("session on %s got %q, want * BYE [UNAVAILABLE] after backend_drain", failed.id, lines)
	}
	d.waitMetric(t, "imapproxy_sessions_drained_total", drained0+1)
	if res, err := onOther.Cmd("NOOP"); err != nil || !res.OK() {
		t.Errorf("session on another backend after the drain: NOOP %v %v", res, err)
	}
	if err := onOther.Logout(); err != nil {
		t.Errorf("session on another backend: %v", err)
	}
	// Its connection is cached too from now on.
	d.waitMetric(t, "imapproxy_cached_connections", float64(len(stayers)+1))

	// Other backends' users keep their backend and their cached
	// connection; the failed backend's users go to their second choice.
	without := c.ring(failed.id)
	orders := map[string][]backend.Backend{}
	for _, u := range sample {
		orders[u] = ring.Order(u, nil)
	}
	res := c.round(t, d, sample)
	for _, u := range stayers {
		if r, want := res[u], c.pick(ring, u); r.backend != want || !r.reused {
			t.Errorf("during maintenance: %s on %s reused=%v, want %s with XPROXYREUSE", u, r.backend, r.reused, want)
		}
	}
	fallback := map[string]string{}
	for _, u := range movers {
		r := res[u]
		second := orders[u][1].ID
		fallback[u] = second
		if r.backend != second || r.reused {
			t.Errorf("during maintenance: %s on %s reused=%v, want a fresh login on its second choice %s", u, r.backend, r.reused, second)
		}
		if p := c.pick(without, u); p != second {
			t.Errorf("balancer: Pick(%s) without %s = %s, but Order[1] = %s", u, failed.id, p, second)
		}
	}
	if got := c.loginCounts(t)[failed.id]; got != failedLogins {
		t.Errorf("%s logged %d logins while in maintenance, want 0", failed.id, got-failedLogins)
	}
	d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)+1))

	// Maintenance off: the users go back to their own backend, with a
	// fresh login there; their connections on the fallback are not used.
	if err := agent.Maintenance(failed.id, false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "backend back in the set", func() (bool, string) {
		m = d.metrics(t)
		return m.get("imapproxy_backends") == 3, m.summary()
	})
	before := c.userLogins(t, movers)
	res = c.round(t, d, sample)
	for _, u := range movers {
		if r := res[u]; r.backend != failed.id || r.reused {
			t.Errorf("after maintenance: %s on %s reused=%v, want a fresh login on %s (its backend before the failure; fallback was %s)",
				u, r.backend, r.reused, failed.id, fallback[u])
		}
	}
	for _, u := range stayers {
		if r, want := res[u], c.pick(ring, u); r.backend != want || !r.reused {
			t.Errorf("after maintenance: %s on %s reused=%v, want %s with XPROXYREUSE", u, r.backend, r.reused, want)
		}
	}
	want := failedLogins + len(movers)
	if got, err := failed.srv.WaitLogins(want, bound); err != nil || got != want {
		t.Errorf("%s: %d logins after maintenance (err %v), want %d", failed.id, got-failedLogins, err, len(movers))
	}
	after := c.userLogins(t, movers)
	for _, u := range movers {
		if n := after[u][failed.id] - before[u][failed.id]; n != 1 {
			t.Errorf("%s: %d new logins on %s after maintenance, want 1", u, n, failed.id)
		}
		if n := after[u][fallback[u]] - before[u][fallback[u]]; n != 0 {
			t.Errorf("%s: %d new logins on the fallback %s after maintenance, want 0", u, n, fallback[u])
		}
	}
	// The movers' connections on the fallback stay cached until they
	// expire (docs/pinning.md); shown, not asserted.
	m = d.metrics(t)
	t.Logf("after return: cached=%v (sample %d + 1 + %d stale on fallbacks), hits=%v misses=%v",
		m.get("imapproxy_cached_connections"), len(sample), len(movers), m.get("imapproxy_cache_hits_total"), m.get("imapproxy_cache_misses_total"))
}

// ---------------------------------------------------------------------
// 4. Two proxies agree

func (c *cluster) testTwoProxiesAgree(t *testing.T) {
	agent := c.newAgent(t)
	d1 := c.startDaemon(t, agent, daemonOptions{cache: false})
	d2 := c.startDaemon(t, agent, daemonOptions{cache: false})
	ring := c.ring()
	sample := users(301, 500)

	var r1, r2 map[string]sessionResult
	var wg sync.WaitGroup
	wg.Add(2)
	var e1, e2 error
	go func() { defer wg.Done(); r1, e1 = c.roundErr(d1, sample) }()
	go func() { defer wg.Done(); r2, e2 = c.roundErr(d2, sample) }()
	wg.Wait()
	if err := errors.Join(e1, e2); err != nil {
		t.Fatal(err)
	}
	disagree := 0
	for _, u := range sample {
		want := c.pick(ring, u)
		if r1[u].backend != r2[u].backend {
			disagree++
			t.Errorf("%s: proxy 1 sent it to %s, proxy 2 to %s", u, r1[u].backend, r2[u].backend)
		} else if r1[u].backend != want {
			t.Errorf("%s: both proxies sent it to %s, balancer.Pick says %s", u, r1[u].backend, want)
		}
	}
	t.Logf("%d users through two proxies: %d disagreements", len(sample), disagree)
}

// ---------------------------------------------------------------------
// 5. Consul down: the last set stays; the watch resumes by itself

func (c *cluster) testConsulDown(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	ring := c.ring()
	sample := users(501, 530)

	check := func(step string, wantReuse bool) {
		t.Helper()
		res, err := c.roundErr(d, sample)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		for _, u := range sample {
			if r, want := res[u], c.pick(ring, u); r.backend != want || r.reused != wantReuse {
				t.Errorf("%s: %s on %s reused=%v, want %s reused=%v", step, u, r.backend, r.reused, want, wantReuse)
			}
		}
		d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)))
	}
	check("consul up", false)

	if err := agent.Stop(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	waitFor(t, "discovery_up 0", func() (bool, string) {
		m := d.metrics(t)
		return m.get("imapproxy_discovery_up") == 0, m.summary()
	})
	t.Logf("MEASURED: agent stopped to imapproxy_discovery_up 0: %v", time.Since(t0).Round(time.Millisecond))
	m := d.metrics(t)
	if got := m.get("imapproxy_backends"); got != 3 {
		t.Errorf("with Consul down: imapproxy_backends = %v, want 3 (the last set)", got)
	}
	if code := d.get("/readyz"); code != http.StatusOK {
		t.Errorf("with Consul down: /readyz = %d, want 200", code)
	}
	check("consul down", true)
	gone0 := d.metrics(t).get(`imapproxy_cache_closed_total{cause="backend_gone"}`)

	// Back: a dev agent restarts empty, so the services are registered
	// again.
	t1 := time.Now()
	if err := agent.Restart(); err != nil {
		t.Fatal(err)
	}
	c.register(t, agent)
	waitFor(t, "discovery_up 1 with 3 backends", func() (bool, string) {
		m := d.metrics(t)
		return m.get("imapproxy_discovery_up") == 1 && m.get("imapproxy_backends") == 3, m.summary()
	})
	t.Logf("MEASURED: Restart() to discovery_up 1 with 3 backends: %v", time.Since(t1).Round(time.Millisecond))
	// If the watch asked the restarted agent before the services were
	// passing again, it got an empty set, which the proxy takes as real
	// (docs/pinning.md) and which closes every cached connection.
	m = d.metrics(t)
	emptied := m.get(`imapproxy_cache_closed_total{cause="backend_gone"}`) - gone0
	t.Logf("after restart: %v cached connections closed as backend_gone; daemon logged an empty set: %v",
		emptied, strings.Contains(d.log(), "backends=0"))
	res, err := c.roundErr(d, sample)
	if err != nil {
		t.Fatalf("consul back: %v", err)
	}
	for _, u := range sample {
		if r, want := res[u], c.pick(ring, u); r.backend != want {
			t.Errorf("consul back: %s on %s, want %s", u, r.backend, want)
		}
	}

	// The watch is live again, not just one lucky query: a change in
	// Consul shows up in the proxy.
	c.flipMaintenance(t, agent, d, c.backends[0].id)
}

// ---------------------------------------------------------------------
// 6. Graceful SIGTERM

func (c *cluster) testGracefulSIGTERM(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	u1, u2 := dovecottest.UserName(601), dovecottest.UserName(602)

	idle, err := dialIMAP(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if res, err := idle.Login(u1, c.password(u1)); err != nil || !res.OK() {
		t.Fatalf("LOGIN %s: %v %v", u1, res, err)
	}
	if res, err := idle.Cmd("SELECT INBOX"); err != nil || !res.OK() {
		t.Fatalf("SELECT: %v %v", res, err)
	}
	// A second client sits in IDLE: the proxy ends it with DONE first.
	idler, idleTag := c.startIdle(t, d.addr, u2)
	d.waitMetric(t, "imapproxy_sessions", 2)

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	lines, err := idle.ReadToEOF()
	if err != nil {
		t.Errorf("idle client: %v", err)
	}
	if !slices.Contains(lines, "* BYE Server shutting down") {
		t.Errorf("idle client got %q after SIGTERM, want \"* BYE Server shutting down\"", lines)
	}
	lines, err = idler.ReadToEOF()
	if err != nil {
		t.Errorf("IDLE client: %v", err)
	}
	iOK := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, idleTag+" OK") })
	iBye := slices.Index(lines, "* BYE Server shutting down")
	if iOK < 0 || iBye < iOK {
		t.Errorf("IDLE client got %q after SIGTERM, want %s OK (IDLE ended) and then \"* BYE Server shutting down\"", lines, idleTag)
	}

	code, err := d.wait(bound)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0 {
		t.Errorf("exit code after SIGTERM = %d, want 0", code)
	}
	if _, err := net.DialTimeout("tcp", d.addr, time.Second); err == nil {
		t.Errorf("listener %s still accepts after exit", d.addr)
	}
	if !strings.Contains(d.log(), "imapproxy: stopped\n") {
		t.Errorf("daemon did not log its orderly stop")
	}
}

// ---------------------------------------------------------------------
// Rounds of client sessions

// sessionResult is what one login/ID/logout cycle showed.
type sessionResult struct {
	backend string // service ID of the backend that answered ID
	reused  bool   // the login carried * OK [XPROXYREUSE]
}

// round runs one session per user through d, workers at a time, and fails
// t on any error.
func (c *cluster) round(t *testing.T, d *daemonProc, us []string) map[string]sessionResult {
	t.Helper()
	res, err := c.roundErr(d, us)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func (c *cluster) roundErr(d *daemonProc, us []string) (map[string]sessionResult, error) {
	var (
		mu   sync.Mutex
		res  = make(map[string]sessionResult, len(us))
		errs []error
		next = make(chan string)
		wg   sync.WaitGroup
	)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range next {
				r, err := c.session(d.addr, u)
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", u, err))
				} else {
					res[u] = r
				}
				mu.Unlock()
			}
		}()
	}
	for _, u := range us {
		next <- u
	}
	close(next)
	wg.Wait()
	if len(errs) > 5 {
		errs = append(errs[:5], fmt.Errorf("and %d more", len(errs)-5))
	}
	return res, errors.Join(errs...)
}

var idNameRE = regexp.MustCompile(`^\* ID \(.*"name" "([^"]+)"`)

// session logs user in, asks the backend's ID, and logs out.
func (c *cluster) session(addr, user string) (sessionResult, error) {
	var r sessionResult
	ic, err := dialIMAP(addr)
	if err != nil {
		return r, err
	}
	defer ic.Close()
	res, err := ic.Login(user, c.password(user))
	if err != nil {
		return r, fmt.Errorf("LOGIN: %w", err)
	}
	if !res.OK() {
		return r, fmt.Errorf("LOGIN: %s", res)
	}
	r.reused = res.HasPrefix("* OK [XPROXYREUSE]")
	res, err = ic.Cmd("ID NIL")
	if err != nil || !res.OK() {
		return r, fmt.Errorf("ID: %v %v", res, err)
	}
	for _, l := range res.Untagged {
		if m := idNameRE.FindStringSubmatch(l); m != nil {
			b := c.byName[m[1]]
			if b == nil {
				return r, fmt.Errorf("ID names unknown backend %q", m[1])
			}
			r.backend = b.id
		}
	}
	if r.backend == "" {
		return r, fmt.Errorf("no backend name in ID reply %s", res)
	}
	if err := ic.Logout(); err != nil {
		return r, err
	}
	return r, nil
}

// ---------------------------------------------------------------------
// Dovecot login counts

// loginCounts is each backend's number of logins so far, by service ID.
func (c *cluster) loginCounts(t *testing.T) map[string]int {
	t.Helper()
	m := map[string]int{}
	for _, b := range c.backends {
		n, err := b.srv.Logins()
		if err != nil {
			t.Fatal(err)
		}
		m[b.id] = n
	}
	return m
}

// userLogins is every user's logins so far, per backend service ID.
func (c *cluster) userLogins(t *testing.T, us []string) map[string]map[string]int {
	t.Helper()
	out := map[string]map[string]int{}
	for _, u := range us {
		out[u] = map[string]int{}
		for _, b := range c.backends {
			n, err := b.srv.LoginsFor(u)
			if err != nil {
				t.Fatal(err)
			}
			out[u][b.id] = n
		}
	}
	return out
}

// ---------------------------------------------------------------------
// The daemon as a child process

type daemonOptions struct {
	cache      bool
	nofile     int    // RLIMIT_NOFILE for the daemon; 0 inherits the test's
	rejoinHold string // cluster.rejoin_hold; "" is "1s", short for the tests that restore a backend
	drain      string // cluster.backend_drain; "" is "1s"
	consulAddr string // where the daemon finds Consul; "" is the agent's own address
	upstream   string // the upstream block's body; "" is a 2 s dial timeout
	timeouts   string // the timeouts block's body; "" is a 2 s check and a 5 s drain
	extra      string // appended to the config file
}

type daemonProc struct {
	cmd      *exec.Cmd
	addr     string // client listener
	admin    string // admin listener
	logPath  string
	confPath string
	conf     string // the config file as written at start

	done    chan struct{} // closed once the process has been reaped
	waitErr error         // from cmd.Wait, readable after done
}

// startDaemon writes a config for agent and starts the binary, waiting
// until /readyz answers and the whole set is in. It is stopped with
// SIGTERM, and must then exit 0, when t ends.
func (c *cluster) startDaemon(t *testing.T, agent *consultest.Agent, o daemonOptions) *daemonProc {
	t.Helper()
	dir := t.TempDir()
	var lastErr error
	// A port picked free may be taken before the daemon binds it: then
	// try again with fresh ports.
	for attempt := 1; attempt <= 3; attempt++ {
		d, err := c.launch(t, dir, attempt, agent, o)
		if err == nil {
			return d
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatal(lastErr)
	return nil
}

func (c *cluster) launch(t *testing.T, dir string, attempt int, agent *consultest.Agent, o daemonOptions) (*daemonProc, error) {
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	d := &daemonProc{
		addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		admin:   net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1])),
		logPath: filepath.Join(dir, fmt.Sprintf("imapproxy-%d.log", attempt)),
		done:    make(chan struct{}),
	}
	conf := fmt.Sprintf(`log_level = "debug"
listener "imap" {
  address = %q
}
upstream {
  %s
}
cache {
  enabled         = %t
  expiration      = "300s"
  sweep_interval  = "60s"
  max_connections = 2000
}
timeouts {
  %s
}
cluster {
  down_time     = "2s"
  backend_drain = %q
  rejoin_hold   = %q
}
consul {
  address   = %q
  service   = %q
  wait_time = "10s"
}
admin {
  address = %q
}
`, d.addr, cmp.Or(o.upstream, `dial_timeout = "2s"`), o.cache, cmp.Or(o.timeouts, "check = \"2s\"\n  drain = \"5s\""), cmp.Or(o.drain, "1s"), cmp.Or(o.rejoinHold, "1s"), cmp.Or(o.consulAddr, agent.Addr), serviceName, d.admin) + o.extra
	confPath := filepath.Join(dir, fmt.Sprintf("imapproxy-%d.hcl", attempt))
	d.confPath, d.conf = confPath, conf
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(d.logPath)
	if err != nil {
		return nil, err
	}
	d.cmd = exec.Command(c.bin, "-config", confPath)
	if o.nofile > 0 {
		// The shell sets soft and hard limit, then becomes the daemon
		// (same pid), so the Go runtime cannot raise it again.
		d.cmd = exec.Command("/bin/sh", "-c", fmt.Sprintf(`ulimit -n %d && exec "$0" -config "$1"`, o.nofile), c.bin, confPath)
	}
	d.cmd.Stdout = logf
	d.cmd.Stderr = logf
	// If the test binary dies, so does the daemon.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		logf.Close()
		close(d.done)
	}()

	// Ready: /readyz says so and the whole set is in.
	deadline := time.Now().Add(bound)
	var last string
	for {
		select {
		case <-d.done:
			return nil, fmt.Errorf("imapproxy exited during start (%v):\n%s", d.waitErr, tailLines(d.log(), 30))
		default:
		}
		if code := d.get("/readyz"); code == http.StatusOK {
			m, err := d.scrape()
			if err == nil && m.get("imapproxy_backends") == float64(len(c.backends)) && m.get("imapproxy_discovery_up") == 1 {
				break
			}
			last = fmt.Sprintf("ready but %s (err %v)", m.summary(), err)
		} else {
			last = fmt.Sprintf("/readyz %d", code)
		}
		if time.Now().After(deadline) {
			d.kill()
			return nil, fmt.Errorf("imapproxy not ready after %v: %s\n%s", bound, last, tailLines(d.log(), 30))
		}
		time.Sleep(pollEvery)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("imapproxy %s log tail:\n%s", d.addr, tailLines(d.log(), 40))
		}
		select {
		case <-d.done:
			return // the test ended it and checked how
		default:
		}
		if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Errorf("SIGTERM imapproxy: %v", err)
		}
		code, err := d.wait(bound)
		if err != nil {
			t.Error(err)
		} else if code != 0 {
			t.Errorf("imapproxy %s exited %d after SIGTERM, want 0", d.addr, code)
		}
	})
	return d, nil
}

// wait waits, bounded, for the process to exit and returns its exit code
// (-1 when killed by a signal). After the bound it is killed.
func (d *daemonProc) wait(limit time.Duration) (int, error) {
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-d.done:
	case <-timer.C:
		d.kill()
		return -1, fmt.Errorf("imapproxy %s did not exit within %v of SIGTERM; killed", d.addr, limit)
	}
	return d.cmd.ProcessState.ExitCode(), nil
}

func (d *daemonProc) kill() {
	_ = d.cmd.Process.Kill()
	<-d.done
}

func (d *daemonProc) log() string {
	b, _ := os.ReadFile(d.logPath)
	return string(b)
}

// get returns the status code of an admin GET, 0 if it failed.
func (d *daemonProc) get(path string) int {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + d.admin + path)
	if err != nil {
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// metrics is one scrape of /metrics: series (name with labels, as
// written) to value.
type metrics map[string]float64

func (m metrics) get(series string) float64 {
	v, ok := m[series]
	if !ok {
		return -1
	}
	return v
}

func (m metrics) summary() string {
	keys := []string{
		"imapproxy_backends", "imapproxy_discovery_up", "imapproxy_sessions", "imapproxy_cached_connections",
		`imapproxy_cache_closed_total{cause="backend_gone"}`, "imapproxy_client_logins_fresh_total",
		"imapproxy_client_logins_reused_total", "imapproxy_client_logins_failed_total",
	}
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%v ", strings.TrimPrefix(k, "imapproxy_"), m.get(k))
	}
	return strings.TrimSpace(b.String())
}

func (d *daemonProc) scrape() (metrics, error) {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + d.admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/metrics: %s", resp.Status)
	}
	m := metrics{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			continue
		}
		m[l[:i]] = v
	}
	return m, sc.Err()
}

func (d *daemonProc) metrics(t *testing.T) metrics {
	t.Helper()
	m, err := d.scrape()
	if err != nil {
		t.Fatalf("scrape %s: %v", d.admin, err)
	}
	return m
}

// waitMetric polls until series has the value want.
func (d *daemonProc) waitMetric(t *testing.T, series string, want float64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s == %v", series, want), func() (bool, string) {
		m := d.metrics(t)
		return m.get(series) == want, fmt.Sprintf("%s=%v; %s", series, m.get(series), m.summary())
	})
}

// waitFor polls cond until it holds, failing t after bound with cond's
// last description.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		ok, desc := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last: %s", what, bound, desc)
		}
		time.Sleep(pollEvery)
	}
}

// freePorts picks n distinct free TCP ports on 127.0.0.1, holding each
// until all are picked.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// dialIMAP connects to the daemon at addr and wants its "* OK" greeting.
func dialIMAP(addr string) (*testkit.Conn, error) {
	c, err := testkit.DialConn(addr)
	if err != nil {
		return nil, err
	}
	c.Timeout = bound
	if !strings.HasPrefix(c.Greeting, "* OK") {
		c.Close()
		return nil, fmt.Errorf("greeting %q", c.Greeting)
	}
	return c, nil
}

// startIdle logs user in on a new connection to addr, selects INBOX and
// enters IDLE; it returns the connection and the IDLE command's tag.
func (c *cluster) startIdle(t *testing.T, addr, user string) (*testkit.Conn, string) {
	t.Helper()
	ic, err := dialIMAP(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ic.Close() })
	if res, err := ic.Login(user, c.password(user)); err != nil || !res.OK() {
		t.Fatalf("LOGIN %s: %v %v", user, res, err)
	}
	if res, err := ic.Cmd("SELECT INBOX"); err != nil || !res.OK() {
		t.Fatalf("SELECT: %v %v", res, err)
	}
	tag := ic.NextTag()
	if err := ic.Send(tag + " IDLE\r\n"); err != nil {
		t.Fatal(err)
	}
	if l, err := ic.ReadLine(); err != nil || !strings.HasPrefix(l, "+") {
		t.Fatalf("IDLE: got %q %v, want a continuation", l, err)
	}
	return ic, tag
}

// flipMaintenance turns maintenance of backend id on and off and waits
// for the proxy to see each: proof that its watch is live.
func (c *cluster) flipMaintenance(t *testing.T, agent *consultest.Agent, d *daemonProc, id string) {
	t.Helper()
	if err := agent.Maintenance(id, true); err != nil {
		t.Fatal(err)
	}
	d.waitMetric(t, "imapproxy_backends", float64(len(c.backends)-1))
	if err := agent.Maintenance(id, false); err != nil {
		t.Fatal(err)
	}
	d.waitMetric(t, "imapproxy_backends", float64(len(c.backends)))
}
