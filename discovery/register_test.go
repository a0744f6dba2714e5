package discovery

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/consultest"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

func TestRegisterOptionsValidate(t *testing.T) {
	valid := func(edit func(*RegisterOptions)) RegisterOptions {
		o := RegisterOptions{Service: "imapproxy", Address: "10.0.0.1:143"}
		if edit != nil {
			edit(&o)
		}
		return o
	}
	tests := []struct {
		name string
		opts RegisterOptions
		want string // in the error; "" = valid
	}{
		{"minimal", valid(nil), ""},
		{"hostname", valid(func(o *RegisterOptions) { o.Address = "imap1.example.net:993" }), ""},
		{"ipv6", valid(func(o *RegisterOptions) { o.Address = "[2001:db8::1]:143" }), ""},
		{"full http", valid(func(o *RegisterOptions) {
			o.ID, o.Tags, o.Meta = "proxy-1", []string{"a"}, map[string]string{"version": "1.2.3", "build_id": "x-1"}
			o.Check, o.CheckHTTP = "http", "http://127.0.0.1:9143/readyz"
			o.CheckInterval, o.DeregisterAfter = time.Second, time.Hour
			o.Consul = ConsulOptions{Scheme: "https", MinBackoff: time.Second, MaxBackoff: time.Second}
		}), ""},
		{"explicit tcp", valid(func(o *RegisterOptions) { o.Check = "tcp" }), ""},
		{"consul service and tag unused", valid(func(o *RegisterOptions) { o.Consul = ConsulOptions{Service: "imap", Tag: "x", DefaultTLS: "bogus"} }), ""},

		{"no service", valid(func(o *RegisterOptions) { o.Service = "" }), "service name required"},
		{"no address", valid(func(o *RegisterOptions) { o.Address = "" }), "advertised address"},
		{"no port", valid(func(o *RegisterOptions) { o.Address = "10.0.0.1" }), "missing port"},
		{"no host", valid(func(o *RegisterOptions) { o.Address = ":143" }), "no host"},
		{"ipv4 unspecified", valid(func(o *RegisterOptions) { o.Address = "0.0.0.0:143" }), "no address to dial"},
		{"ipv6 unspecified", valid(func(o *RegisterOptions) { o.Address = "[::]:143" }), "no address to dial"},
		{"named port", valid(func(o *RegisterOptions) { o.Address = "10.0.0.1:imap" }), "port number"},
		{"port 0", valid(func(o *RegisterOptions) { o.Address = "10.0.0.1:0" }), "port number"},
		{"port too big", valid(func(o *RegisterOptions) { o.Address = "10.0.0.1:65536" }), "port number"},
		{"id with slash", valid(func(o *RegisterOptions) { o.ID = "a/b" }), "must not contain '/'"},
		{"unknown check", valid(func(o *RegisterOptions) { o.Check = "udp" }), `check "udp"`},
		{"http check without url", valid(func(o *RegisterOptions) { o.Check = "http" }), "want an http:// or https:// url"},
		{"http check with other scheme", valid(func(o *RegisterOptions) { o.Check, o.CheckHTTP = "http", "ftp://127.0.0.1/readyz" }), "want an http:// or https:// url"},
		{"http check without host", valid(func(o *RegisterOptions) { o.Check, o.CheckHTTP = "http", "http:///readyz" }), "want an http:// or https:// url"},
		{"http url with tcp check", valid(func(o *RegisterOptions) { o.CheckHTTP = "http://127.0.0.1/readyz" }), "but the check is tcp"},
		{"interval below consul's minimum", valid(func(o *RegisterOptions) { o.CheckInterval = 500 * time.Millisecond }), "check interval 500ms"},
		{"negative interval", valid(func(o *RegisterOptions) { o.CheckInterval = -time.Second }), "check interval -1s"},
		{"deregister below consul's minimum", valid(func(o *RegisterOptions) { o.DeregisterAfter = 30 * time.Second }), "deregister after 30s"},
		{"meta key format", valid(func(o *RegisterOptions) { o.Meta = map[string]string{"the version": "1"} }), `meta key "the version"`},
		{"meta key reserved", valid(func(o *RegisterOptions) { o.Meta = map[string]string{"consul-version": "1"} }), "reserved"},
		{"meta value too long", valid(func(o *RegisterOptions) { o.Meta = map[string]string{"v": strings.Repeat("x", 513)} }), "longer than 512"},
		{"consul scheme", valid(func(o *RegisterOptions) { o.Consul.Scheme = "ftp" }), `scheme "ftp"`},
		{"consul backoff", valid(func(o *RegisterOptions) { o.Consul.MinBackoff = 2 * time.Minute }), "exceeds max backoff"},
	}
	for _, tt := range tests {
		err := tt.opts.validate()
		switch {
		case tt.want == "" && err != nil:
			t.Errorf("%s: validate() = %v, want nil", tt.name, err)
		case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("%s: validate() = %v, want an error with %q", tt.name, err, tt.want)
		}
	}

	// Every problem at once.
	err := RegisterOptions{Address: "0.0.0.0:143", Check: "udp"}.validate()
	if !errors.Is(err, ErrNoService) || err == nil || !strings.Contains(err.Error(), "0.0.0.0") || !strings.Contains(err.Error(), "udp") {
		t.Errorf("validate() = %v, want ErrNoService, the address and the check among the problems", err)
	}
	if _, err := NewRegistrar(RegisterOptions{Service: "imapproxy"}); err == nil {
		t.Error("NewRegistrar without an address succeeded")
	}
	// The client is built as for the Watcher: a token file is read at once.
	if _, err := NewRegistrar(valid(func(o *RegisterOptions) { o.Consul.TokenFile = "/nonexistent/token" })); err == nil {
		t.Error("NewRegistrar with a missing token file succeeded")
	}
}

func TestRegistrarID(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Skipf("no hostname: %v", err)
	}
	tests := []struct {
		name, id, addr, want string
	}{
		{"default", "", "10.0.0.1:143", "imapproxy-" + host + "-143"},
		{"default ipv6", "", "[2001:db8::1]:1143", "imapproxy-" + host + "-1143"},
		{"explicit", "proxy-a", "10.0.0.1:143", "proxy-a"},
	}
	for _, tt := range tests {
		r, err := NewRegistrar(RegisterOptions{Service: "imapproxy", ID: tt.id, Address: tt.addr, Consul: ConsulOptions{Address: "127.0.0.1:8500"}})
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if got := r.ID(); got != tt.want {
			t.Errorf("%s: ID() = %q, want %q", tt.name, got, tt.want)
		}
		if got := r.reg.ID; got != tt.want {
			t.Errorf("%s: registered ID = %q, want %q", tt.name, got, tt.want)
		}
	}
	if got, want := defaultServiceID("imapproxy", "odd/host", "10.0.0.1:143"), "imapproxy-odd-host-143"; got != want {
		t.Errorf("defaultServiceID with a slash = %q, want %q", got, want)
	}
}

func TestRegistration(t *testing.T) {
	tags, meta := []string{"imap", "proxy"}, map[string]string{"version": "1.2.3"}
	tcp := RegisterOptions{Service: "imapproxy", ID: "p1", Address: "[2001:db8::1]:143", Tags: tags, Meta: meta}.registration()
	if tcp.ID != "p1" || tcp.Name != "imapproxy" || tcp.Address != "2001:db8::1" || tcp.Port != 143 ||
		!slices.Equal(tcp.Tags, tags) || tcp.Meta["version"] != "1.2.3" {
		t.Errorf("registration = %+v", tcp)
	}
	if c := tcp.Check; c == nil || c.TCP != "[2001:db8::1]:143" || c.HTTP != "" ||
		c.Interval != "10s" || c.DeregisterCriticalServiceAfter != "1m0s" {
		t.Errorf("tcp check = %+v, want tcp [2001:db8::1]:143 every 10s, deregistered after 1m", c)
	}
	// The registration is a copy: the caller may reuse its slice and map.
	tags[0], meta["version"] = "changed", "changed"
	if tcp.Tags[0] != "imap" || tcp.Meta["version"] != "1.2.3" {
		t.Errorf("registration shares Tags or Meta with the options: %v %v", tcp.Tags, tcp.Meta)
	}

	h := RegisterOptions{Service: "imapproxy", ID: "p1", Address: "10.0.0.1:143", Check: "http",
		CheckHTTP: "http://127.0.0.1:9143/readyz", CheckInterval: 2 * time.Second, DeregisterAfter: 5 * time.Minute}.registration()
	if c := h.Check; c == nil || c.HTTP != "http://127.0.0.1:9143/readyz" || c.Method != http.MethodGet || c.TCP != "" ||
		c.Interval != "2s" || c.DeregisterCriticalServiceAfter != "5m0s" {
		t.Errorf("http check = %+v, want GET http://127.0.0.1:9143/readyz every 2s, deregistered after 5m", c)
	}
}

// registerTest runs a Registrar against a fakeConsul over net.Pipe, in a
// synctest bubble: pauses are measured exactly, in fake time.
type registerTest struct {
	t      *testing.T
	fake   *fakeConsul
	r      *Registrar
	log    *testkit.SyncBuffer
	cancel context.CancelFunc
	done   chan error
	ended  bool // Run has returned
}

const registerBound = time.Hour // of fake time: only passes if all else is stuck

func startRegister(t *testing.T, o RegisterOptions) *registerTest {
	t.Helper()
	rt := &registerTest{t: t, fake: newFakeConsul(), log: &testkit.SyncBuffer{}, done: make(chan error, 1)}
	o.Logger = hclog.New(&hclog.LoggerOptions{
		Name:   "register",
		Level:  hclog.Debug,
		Output: io.MultiWriter(rt.log, t.Output()),
	})
	o.Consul.Logger = o.Logger
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	cfg := o.Consul.apiConfig()
	servePipe(t, rt.fake, cfg)
	r, err := newRegistrar(o, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rt.r = r
	ctx, cancel := context.WithCancel(context.Background())
	rt.cancel = cancel
	go func() { rt.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		for !rt.ended {
			select {
			case <-rt.done:
				rt.ended = true
			case req := <-rt.fake.reqs: // the deregistration, after a test that stopped early
				req.answer(0)
			}
		}
	})
	return rt
}

// next returns the registrar's next request, which must be for path.
func (rt *registerTest) next(path string) *fakeReq {
	rt.t.Helper()
	timer := time.NewTimer(registerBound)
	defer timer.Stop()
	select {
	case r := <-rt.fake.reqs:
		if r.path != path {
			rt.t.Fatalf("request for %s, want %s", r.path, path)
		}
		return r
	case err := <-rt.done:
		rt.ended = true
		rt.t.Fatalf("Run returned %v while a request for %s was expected", err, path)
	case <-timer.C:
		rt.t.Fatalf("no request for %s within %v", path, registerBound)
	}
	return nil
}

// wantReturn wants Run to return nil.
func (rt *registerTest) wantReturn() {
	rt.t.Helper()
	timer := time.NewTimer(registerBound)
	defer timer.Stop()
	select {
	case err := <-rt.done:
		rt.ended = true
		if err != nil {
			rt.t.Errorf("Run = %v, want nil", err)
		}
	case <-timer.C:
		rt.t.Fatalf("Run did not return within %v of cancel", registerBound)
	}
}

func (r *fakeReq) found(id string) {
	r.reply <- fakeReply{body: `{"ID":"` + id + `","Service":"imapproxy","Port":143}`}
}

func TestRegistrarRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			iv         = 10 * time.Second
			minB, maxB = time.Second, 8 * time.Second
			id         = "imapproxy-1"
			regPath    = "/v1/agent/service/register"
			svcPath    = "/v1/agent/service/" + id
		)
		rt := startRegister(t, RegisterOptions{
			Consul:  ConsulOptions{Token: "s3cret", MinBackoff: minB, MaxBackoff: maxB},
			Service: "imapproxy", ID: id, Address: "10.0.0.9:143", CheckInterval: iv,
		})

		// The agent is down: the registration is retried after doubling
		// pauses, each within (d/2, d].
		r := rt.next(regPath)
		if r.token != "s3cret" || r.query.Get("replace-existing-checks") != "true" {
			t.Errorf("register request: token %q, query %v; want the token and replace-existing-checks", r.token, r.query)
		}
		for n, d := range []time.Duration{1, 2, 4, 8, 8} {
			d *= time.Second
			r.fail(http.StatusInternalServerError)
			prev := r.at
			r = rt.next(regPath)
			if gap := r.at.Sub(prev); gap <= d/2 || gap > d {
				t.Errorf("pause after failure %d = %v, want within (%v, %v]", n+1, gap, d/2, d)
			}
			if st := rt.r.Status(); st.Registered || st.Failures != uint64(n+1) || st.LastError == "" {
				t.Errorf("Status after failure %d = %+v, want unregistered with %d failures and an error", n+1, st, n+1)
			}
		}
		r.answer(0)

		// Registered: the registrar asks every CheckInterval whether the
		// agent still has the service.
		prev := r.at
		r = rt.next(svcPath)
		if gap := r.at.Sub(prev); gap != iv {
			t.Errorf("first look after registering came after %v, want %v", gap, iv)
		}
		if st := rt.r.Status(); !st.Registered || st.Failures != 0 || st.LastSuccess.IsZero() || st.LastError == "" {
			t.Errorf("Status after registering = %+v, want registered, a success, the old error kept", st)
		}
		r.found(id)
		prev = r.at
		r = rt.next(svcPath)
		if gap := r.at.Sub(prev); gap != iv {
			t.Errorf("look after finding the service came after %v, want %v", gap, iv)
		}

		// The agent lost it (restarted): registered again at once.
		r.fail(http.StatusNotFound)
		prev = r.at
		r = rt.next(regPath)
		if gap := r.at.Sub(prev); gap != 0 {
			t.Errorf("registration after the agent lost the service came after %v, want at once", gap)
		}
		r.answer(0)

		// The agent does not answer: a success has reset the backoff, and
		// the registrar asks again rather than registering blindly.
		r = rt.next(svcPath)
		r.fail(http.StatusServiceUnavailable)
		prev = r.at
		r = rt.next(svcPath)
		if gap := r.at.Sub(prev); gap <= minB/2 || gap > minB {
			t.Errorf("pause after the first failure following a success = %v, want within (%v, %v]", gap, minB/2, minB)
		}
		if st := rt.r.Status(); st.Registered || st.Failures != 1 {
			t.Errorf("Status with the agent unreachable = %+v, want unregistered, 1 failure", st)
		}
		r.found(id)

		if err := rt.r.Run(t.Context()); err != ErrRunning {
			t.Errorf("second Run = %v, want ErrRunning", err)
		}

		// Cancelled: the service is deregistered and Run returns.
		synctest.Wait() // the registrar is in its pause
		rt.cancel()
		rt.next("/v1/agent/service/deregister/" + id).answer(0)
		rt.wantReturn()
		if st := rt.r.Status(); st.Registered {
			t.Errorf("Status after Run = %+v, want unregistered", st)
		}

		log := rt.log.String()
		if n := strings.Count(log, "[WARN]  register: consul registration failed"); n != 6 {
			t.Errorf("%d warnings of failed calls, want 6:\n%s", n, log)
		}
		if !strings.Contains(log, "error=") || !strings.Contains(log, "Unexpected response code: 500") {
			t.Errorf("the warnings do not carry the error:\n%s", log)
		}
		if n := strings.Count(log, "consul lost the service registration"); n != 1 {
			t.Errorf("%d lines about the lost registration, want 1:\n%s", n, log)
		}
		if n := strings.Count(log, "service deregistered"); n != 1 {
			t.Errorf("%d lines about the deregistration, want 1:\n%s", n, log)
		}
		if strings.Contains(log, "s3cret") {
			t.Errorf("the token is in the log:\n%s", log)
		}
	})
}

func TestRegistrarDeregisterTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const id = "imapproxy-1"
		rt := startRegister(t, RegisterOptions{Service: "imapproxy", ID: id, Address: "10.0.0.9:143"})
		rt.next("/v1/agent/service/register").answer(0)
		synctest.Wait()
		rt.cancel()
		// The agent never answers the deregistration: Run gives up after
		// deregisterTimeout and returns all the same.
		r := rt.next("/v1/agent/service/deregister/" + id)
		rt.wantReturn()
		if waited := time.Since(r.at); waited != deregisterTimeout {
			t.Errorf("Run returned %v after the deregistration began, want %v", waited, deregisterTimeout)
		}
		if st := rt.r.Status(); st.Registered || st.LastError == "" {
			t.Errorf("Status = %+v, want unregistered with the deregistration's error", st)
		}
		if log := rt.log.String(); !strings.Contains(log, "[WARN]  register: consul deregistration failed") {
			t.Errorf("no warning about the failed deregistration:\n%s", log)
		}
	})
}

// The tests below run against a real agent.

// waitAgent polls the agent's state until cond holds, at most
// integrationBound. cond describes what it saw, for the failure.
func waitAgent(t *testing.T, step string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.NewTimer(integrationBound)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, saw := cond()
		if ok {
			return
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			t.Fatalf("%s: not within %v; last saw %s", step, integrationBound, saw)
		}
	}
}

// instance is the health of service instance id of service name, as the
// catalog has it: "" when absent, else the aggregated check status.
func instance(c *api.Client, name, id string) (status string, saw string) {
	entries, _, err := c.Health().Service(name, "", false, nil)
	if err != nil {
		return "", err.Error()
	}
	for _, e := range entries {
		if e.Service.ID == id {
			st := e.Checks.AggregatedStatus()
			return st, st
		}
	}
	return "", strconv.Itoa(len(entries)) + " other instances"
}

// runRegistrar starts a Registrar against agent and returns a stop
// function that cancels it and wants Run to return nil, bounded.
func runRegistrar(t *testing.T, agent *consultest.Agent, o RegisterOptions) (*Registrar, func()) {
	t.Helper()
	o.Consul = ConsulOptions{Address: agent.Addr, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}
	o.Logger = hclog.New(&hclog.LoggerOptions{Name: "register", Level: hclog.Debug, Output: t.Output()})
	r, err := NewRegistrar(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	stopped := false
	stop := func() {
		t.Helper()
		if stopped {
			return
		}
		stopped = true
		cancel()
		timer := time.NewTimer(integrationBound)
		defer timer.Stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v, want nil", err)
			}
		case <-timer.C:
			t.Fatalf("Run did not return within %v of cancel", integrationBound)
		}
	}
	t.Cleanup(stop)
	return r, stop
}

func agentClient(t *testing.T, agent *consultest.Agent) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: agent.Addr})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wantDeregistered checks, after Run has returned, that the agent no
// longer has the service and the catalog follows.
func wantDeregistered(t *testing.T, c *api.Client, r *Registrar, name string) {
	t.Helper()
	if svc, _, err := c.Agent().Service(r.ID(), nil); !notFound(err) {
		t.Errorf("agent service %s after Run = %+v, %v; want 404", r.ID(), svc, err)
	}
	waitAgent(t, "gone from the catalog", func() (bool, string) {
		ss, _, err := c.Catalog().Service(name, "", nil)
		if err != nil {
			return false, err.Error()
		}
		return len(ss) == 0, strconv.Itoa(len(ss)) + " instances"
	})
	if st := r.Status(); st.Registered {
		t.Errorf("Status after Run = %+v, want unregistered", st)
	}
}

func TestRegistrarIntegration(t *testing.T) {
	agent := consultest.StartT(t)
	c := agentClient(t, agent)
	const name = "imapproxy-it"
	host, port := consultest.CheckTarget(t) // the IMAP listener
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	r, stop := runRegistrar(t, agent, RegisterOptions{
		Service: name, Address: addr, Tags: []string{"proxy"}, Meta: map[string]string{"version": "test"},
		Check: "tcp", CheckInterval: time.Second,
	})
	passing := func(step string) {
		t.Helper()
		waitAgent(t, step, func() (bool, string) {
			st, saw := instance(c, name, r.ID())
			return st == api.HealthPassing, saw
		})
	}

	passing("registered")
	svc, _, err := c.Agent().Service(r.ID(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if svc.Service != name || svc.Address != host || svc.Port != port ||
		!slices.Equal(svc.Tags, []string{"proxy"}) || svc.Meta["version"] != "test" {
		t.Errorf("agent service = %+v, want %s at %s with tag proxy and meta version=test", svc, name, addr)
	}
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	if ch := checks["service:"+r.ID()]; ch == nil || ch.Type != "tcp" || ch.Status != api.HealthPassing {
		t.Errorf("agent check = %+v, want a passing tcp check", ch)
	}
	if st := r.Status(); !st.Registered || st.LastSuccess.IsZero() {
		t.Errorf("Status = %+v, want registered", st)
	}

	// Deregistered behind the registrar's back: it comes back. The
	// agent's own state changes at once, so once the service is gone
	// there, seeing it again can only be the registrar's doing (the
	// catalog, synced in the background, could show the old one).
	if err := agent.Deregister(r.ID()); err != nil {
		t.Fatal(err)
	}
	if svc, _, err := c.Agent().Service(r.ID(), nil); !notFound(err) {
		t.Fatalf("agent service %s after deregistering = %+v, %v; want 404", r.ID(), svc, err)
	}
	waitAgent(t, "back in the agent after a deregistration", func() (bool, string) {
		_, _, err := c.Agent().Service(r.ID(), nil)
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	passing("passing again after a deregistration")

	// The agent restarts and forgets everything: it comes back.
	if err := agent.Restart(); err != nil {
		t.Fatal(err)
	}
	passing("registered again after an agent restart")

	stop()
	wantDeregistered(t, c, r, name)
}

func TestRegistrarIntegrationHTTP(t *testing.T) {
	agent := consultest.StartT(t)
	c := agentClient(t, agent)
	const name = "imapproxy-http-it"
	var ready atomic.Bool
	ready.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/readyz" || !ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	}))
	t.Cleanup(srv.Close)
	host, port := consultest.CheckTarget(t)
	r, stop := runRegistrar(t, agent, RegisterOptions{
		Service: name, Address: net.JoinHostPort(host, strconv.Itoa(port)),
		Check: "http", CheckHTTP: srv.URL + "/readyz", CheckInterval: time.Second,
	})
	status := func(step, want string) {
		t.Helper()
		waitAgent(t, step, func() (bool, string) {
			st, saw := instance(c, name, r.ID())
			return st == want, saw
		})
	}

	status("ready", api.HealthPassing)
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	if ch := checks["service:"+r.ID()]; ch == nil || ch.Type != "http" {
		t.Errorf("agent check = %+v, want an http check", ch)
	}

	ready.Store(false)
	status("not ready", api.HealthCritical)
	// Registered says the agent has the service, whatever its health.
	if st := r.Status(); !st.Registered {
		t.Errorf("Status with a critical check = %+v, want registered", st)
	}
	ready.Store(true)
	status("ready again", api.HealthPassing)

	stop()
	wantDeregistered(t, c, r, name)
}
