package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
	"github.com/imapproxy/imapproxy/upstream"
)

// testAdminDrain drains one of the three backends through the admin API
// of the running daemon: its users' new logins go to their next backend
// (and only theirs), its cached connections close, a session on it goes
// on; `imapproxy map` and `imapproxy status -once` show it; undrain gives
// the users back.
func (c *cluster) testAdminDrain(t *testing.T) {
	agent := c.newAgent(t)
	d := c.startDaemon(t, agent, daemonOptions{cache: true})
	drained := c.backends[2]
	ring, without := c.ring(), c.ring(drained.id)
	sample := users(501, 540)
	var movers []string
	for _, u := range sample {
		if c.pick(ring, u) == drained.id {
			movers = append(movers, u)
		}
	}
	c.round(t, d, sample)
	d.waitMetric(t, "imapproxy_cached_connections", float64(len(sample)))

	// A session that stays on the drained backend throughout.
	resident := movers[0]
	ic, err := dialIMAP(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ic.Close()
	if res, err := ic.Login(resident, c.password(resident)); err != nil || !res.OK() {
		t.Fatalf("LOGIN: %v %v", res, err)
	}

	hc := &http.Client{Timeout: 10 * time.Second}
	call := func(method, path string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+d.admin+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := call("POST", "/api/v1/backends/"+drained.id+"/drain"); code != 200 {
		t.Fatalf("drain: %d %s", code, body)
	}
	m := d.metrics(t)
	// The metrics, as an operator's dashboard reads them.
	for _, series := range []string{
		`imapproxy_client_login_seconds_count{served="fresh"}`,
		`imapproxy_client_login_seconds_count{served="reused"}`,
		fmt.Sprintf(`imapproxy_backend_logins_total{backend=%q,result="ok"}`, drained.id),
		fmt.Sprintf(`imapproxy_backend_dial_seconds_count{backend=%q,result="ok"}`, drained.id),
		`imapproxy_relayed_bytes_total{direction="to_client"}`,
		`imapproxy_relayed_bytes_total{direction="to_server"}`,
		`imapproxy_reuse_ratio`,
		fmt.Sprintf(`imapproxy_backend_connections{backend=%q,state="active"}`, drained.id),
	} {
		if m.get(series) <= 0 {
			t.Errorf("%s = %v, want > 0", series, m.get(series))
		}
	}
	if got := m.get(fmt.Sprintf(`imapproxy_backend_connections{backend=%q,state="cached"}`, drained.id)); got != 0 {
		t.Errorf("cached connections on the drained backend = %v, want 0", got)
	}
	if got := m.get(fmt.Sprintf(`imapproxy_backend_in_service{backend=%q}`, drained.id)); got != 0 {
		t.Errorf("imapproxy_backend_in_service for the drained backend = %v, want 0", got)
	}
	for u, r := range c.round(t, d, sample) {
		switch want := c.pick(without, u); {
		case r.backend != want:
			t.Errorf("drained: %s on %s, want %s", u, r.backend, want)
		case c.pick(ring, u) != drained.id && !r.reused:
			t.Errorf("drained: %s, not on the drained backend, lost its cached connection", u)
		}
	}
	if res, err := ic.Cmd("ID NIL"); err != nil || !res.OK() || !strings.Contains(strings.Join(res.Untagged, " "), drained.name) {
		t.Errorf("the session on the drained backend: %v %v", res, err)
	}

	// The CLI, as an operator would run it.
	out, err := exec.Command(c.bin, "map", "-admin", d.admin, resident).CombinedOutput()
	if err != nil || !strings.Contains(string(out), drained.id) || !strings.Contains(string(out), "drained") {
		t.Errorf("imapproxy map %s: %v\n%s", resident, err, out)
	}
	out, err = exec.Command(c.bin, "status", "-once", "-admin", d.admin).CombinedOutput()
	if err != nil || !strings.Contains(string(out), drained.id) || !strings.Contains(string(out), "drained") {
		t.Errorf("imapproxy status -once: %v\n%s", err, out)
	}
	t.Logf("imapproxy status -once with %s drained:\n%s", drained.id, out)

	var u struct {
		Backend string `json:"backend"`
	}
	if code, body := call("GET", "/api/v1/users/"+resident); code != 200 || json.Unmarshal([]byte(body), &u) != nil || u.Backend != c.pick(without, resident) {
		t.Errorf("GET user %s: %d %s, want backend %s", resident, code, body, c.pick(without, resident))
	}

	if code, body := call("DELETE", "/api/v1/backends/"+drained.id+"/drain"); code != 200 {
		t.Fatalf("undrain: %d %s", code, body)
	}
	for u, r := range c.round(t, d, movers) {
		if r.backend != drained.id {
			t.Errorf("undrained: %s on %s, want %s", u, r.backend, drained.id)
		}
	}
}

// call serves one request and returns the status and body.
func call(h http.Handler, method, path string, hdr ...string) (int, http.Header, string) {
	req := httptest.NewRequest(method, path, nil)
	req.Host = "127.0.0.1:9143" // as curl or `imapproxy status` would send
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Header(), rec.Body.String()
}

// TestAdminAPIAgainstDovecot: through the HTTP layer, a user's session and
// cached connection show up, a kick ends the session with a BYE, and no
// answer holds the password.
func TestAdminAPIAgainstDovecot(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	srv := proxy.New(proxy.Options{Pool: pool.New(pool.Options{}), Dialer: &upstream.Dialer{Timeout: 2 * time.Second, CheckTimeout: 2 * time.Second}})
	srv.SetBackends([]backend.Backend{{ID: dc.Name, Addr: dc.Addr, Weight: 1}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln, backend.TLSNone)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	traceDir := t.TempDir()
	h := admin.New(srv, admin.Options{
		Source:   func() admin.SourceStatus { return admin.SourceStatus{Kind: "static", Healthy: true} },
		TraceDir: traceDir,
	})

	login := func() *testkit.Conn {
		t.Helper()
		c, err := dialIMAP(ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if res, err := c.Login(user, pass); err != nil || !res.OK() {
			t.Fatalf("LOGIN: %v %s", err, res)
		}
		return c
	}
	if err := login().Logout(); err != nil {
		t.Fatal(err)
	}
	// The second login reuses the first's connection; the third needs a
	// new one, which its LOGOUT caches before it is answered.
	active := login()
	if err := login().Logout(); err != nil {
		t.Fatal(err)
	}
	var bodies []string
	var u admin.User
	_, _, body := call(h, "GET", "/api/v1/users/"+user)
	bodies = append(bodies, body)
	if err := json.Unmarshal([]byte(body), &u); err != nil {
		t.Fatal(err)
	}
	if u.Active != 1 || len(u.Sessions) != 1 || len(u.Cached) != 1 || u.Sessions[0].Client != active.NetConn.LocalAddr().String() || u.Sessions[0].User != user {
		t.Fatalf("user = %+v", u)
	}
	_, _, body = call(h, "GET", "/api/v1/status")
	bodies = append(bodies, body)
	var st admin.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Logins.Client != 3 || st.Logins.Backend != 2 || st.ReuseRatio != 1.5 || st.Backends[0].Active != 1 || st.Backends[0].Cached != 1 {
		t.Errorf("status = %+v", st)
	}

	// A trace of the user, through the API: only inside trace_dir, no
	// password in it.
	code, _, body := call(h, "POST", "/api/v1/users/"+user+"/trace")
	var tr admin.Trace
	if code != 200 || json.Unmarshal([]byte(body), &tr) != nil || filepath.Dir(tr.Path) != traceDir {
		t.Fatalf("start trace = %d %s", code, body)
	}
	if code, _, body := call(h, "POST", "/api/v1/users/"+user+"/trace"); code != http.StatusConflict {
		t.Errorf("second start trace = %d %s, want 409", code, body)
	}
	traced := login()
	if res, err := traced.Cmd("SELECT INBOX"); err != nil || !res.OK() {
		t.Fatalf("SELECT: %v %s", err, res)
	}
	if _, _, body := call(h, "GET", "/api/v1/traces"); !strings.Contains(body, tr.Path) {
		t.Errorf("traces = %s, want %s listed", body, tr.Path)
	}
	code, _, body = call(h, "DELETE", "/api/v1/users/"+user+"/trace")
	if code != 200 || json.Unmarshal([]byte(body), &tr) != nil || tr.Bytes == 0 {
		t.Fatalf("stop trace = %d %s", code, body)
	}
	if code, _, _ := call(h, "DELETE", "/api/v1/users/"+user+"/trace"); code != http.StatusNotFound {
		t.Errorf("second stop trace = %d, want 404", code)
	}
	b, err := os.ReadFile(tr.Path)
	if err != nil || !strings.Contains(string(b), "SELECT INBOX") || strings.Contains(string(b), pass) {
		t.Errorf("trace file (%v):\n%s", err, b)
	}
	traced.Logout()

	code, _, body = call(h, "POST", "/api/v1/users/"+user+"/kick")
	bodies = append(bodies, body)
	var k admin.Kick
	if code != 200 || json.Unmarshal([]byte(body), &k) != nil || k.Sessions != 1 || k.Cached != 1 {
		t.Fatalf("kick = %d %s", code, body)
	}
	lines, err := active.ReadToEOF()
	if err != nil || len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE [UNAVAILABLE]") {
		t.Errorf("kicked client got %q (%v), want a BYE [UNAVAILABLE] and EOF", lines, err)
	}
	for _, b := range bodies {
		if strings.Contains(b, pass) {
			t.Fatalf("an admin API answer holds the password: %s", b)
		}
	}
}
