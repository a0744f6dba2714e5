package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
)

const testToken = "tok-3f9c2e1a"

// newTestAdmin returns the admin listener's handler for a server whose set
// is backends b0 and b1 (never dialled), with the token when withToken.
func newTestAdmin(t *testing.T, withToken bool) (http.Handler, *proxy.Server) {
	t.Helper()
	srv := proxy.New(proxy.Options{})
	srv.SetBackends([]proxy.Backend{
		{ID: "b0", Addr: "127.0.0.1:1", Weight: 1},
		{ID: "b1", Addr: "127.0.0.1:2", Weight: 2, TLS: proxy.TLSStartTLS},
	})
	tokenFile := ""
	if withToken {
		tokenFile = filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(tokenFile, []byte(testToken+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	status := func() sourceStatus {
		return sourceStatus{Kind: "static", Healthy: true, LastSuccess: time.Now(), Backends: 2}
	}
	api, err := newAdminAPI(srv, status, tokenFile, "", hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	var listening atomic.Bool
	listening.Store(true)
	return adminHandler(prometheus.NewRegistry(), srv, &listening, api), srv
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

// TestAdminAPIHost: without a token, only requests naming the listener
// by IP address or as localhost are served, so that a web page re-pointed
// at 127.0.0.1 by DNS rebinding cannot use the API; with a token, names
// are fine.
func TestAdminAPIHost(t *testing.T) {
	open, _ := newTestAdmin(t, false)
	for host, want := range map[string]int{
		"127.0.0.1:9143":     http.StatusOK,
		"[::1]:9143":         http.StatusOK,
		"localhost:9143":     http.StatusOK,
		"evil.example:9143":  http.StatusForbidden,
		"evil.example":       http.StatusForbidden,
		"127.0.0.1.nip.io:1": http.StatusForbidden,
	} {
		if code, _, body := call(open, "GET", "/api/v1/status", "Host", host); code != want {
			t.Errorf("no token, Host %s: %d %s, want %d", host, code, body, want)
		}
	}
	if code, _, _ := call(open, "POST", "/api/v1/cache/flush", "Host", "evil.example:9143"); code != http.StatusForbidden {
		t.Errorf("no token, POST with a name as Host: %d, want 403", code)
	}
	locked, _ := newTestAdmin(t, true)
	if code, _, body := call(locked, "GET", "/api/v1/status", "Host", "admin.example:9143", "Authorization", "Bearer "+testToken); code != http.StatusOK {
		t.Errorf("token, Host a name: %d %s, want 200", code, body)
	}
}

func TestAdminAPIToken(t *testing.T) {
	h, _ := newTestAdmin(t, true)
	tests := []struct {
		name, method, path, auth string
		want                     int
	}{
		{"no token", "GET", "/api/v1/status", "", 401},
		{"wrong token", "GET", "/api/v1/status", "Bearer nope", 401},
		{"token as basic", "GET", "/api/v1/status", "Basic " + testToken, 401},
		{"token with a suffix", "GET", "/api/v1/status", "Bearer " + testToken + "x", 401},
		{"right token", "GET", "/api/v1/status", "Bearer " + testToken, 200},
		{"scheme in lower case", "GET", "/api/v1/backends", "bearer " + testToken, 200},
		{"mutation without token", "POST", "/api/v1/cache/flush", "", 401},
		{"mutation with token", "POST", "/api/v1/cache/flush", "Bearer " + testToken, 200},
		{"unknown path without token", "GET", "/api/v1/nothing", "", 401},
		{"unknown path with token", "GET", "/api/v1/nothing", "Bearer " + testToken, 404},
		{"healthz stays open", "GET", "/healthz", "", 200},
		{"readyz stays open", "GET", "/readyz", "", 200},
		{"metrics stay open", "GET", "/metrics", "", 200},
	}
	for _, tt := range tests {
		code, hdr, body := call(h, tt.method, tt.path, "Authorization", tt.auth)
		if code != tt.want {
			t.Errorf("%s: %s %s = %d, want %d (%s)", tt.name, tt.method, tt.path, code, tt.want, body)
		}
		if code == 401 {
			if hdr.Get("WWW-Authenticate") == "" {
				t.Errorf("%s: 401 without WWW-Authenticate", tt.name)
			}
			var e apiError
			if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
				t.Errorf("%s: 401 body %q is not a JSON error", tt.name, body)
			}
		}
	}
}

func TestAdminAPIMethods(t *testing.T) {
	h, srv := newTestAdmin(t, false)
	tests := []struct {
		method, path, allow string
	}{
		{"GET", "/api/v1/backends/b0/drain", "POST, DELETE"},
		{"PUT", "/api/v1/backends/b0/drain", "POST, DELETE"},
		{"GET", "/api/v1/users/alice/kick", "POST"},
		{"GET", "/api/v1/cache/flush", "POST"},
		{"POST", "/api/v1/status", "GET, HEAD"},
		{"DELETE", "/api/v1/users/alice", "GET, HEAD"},
	}
	for _, tt := range tests {
		code, hdr, body := call(h, tt.method, tt.path)
		var e apiError
		if code != 405 || hdr.Get("Allow") != tt.allow || json.Unmarshal([]byte(body), &e) != nil || e.Error == "" {
			t.Errorf("%s %s = %d, Allow %q, body %q; want 405, Allow %q and a JSON error", tt.method, tt.path, code, hdr.Get("Allow"), body, tt.allow)
		}
	}
	if len(srv.Backends()) != 2 {
		t.Error("a GET drained a backend")
	}
	// A page in a browser must not be able to post here.
	code, _, _ := call(h, "POST", "/api/v1/cache/flush", "Sec-Fetch-Site", "cross-site")
	if code != 403 {
		t.Errorf("cross-site POST = %d, want 403", code)
	}
}

// TestAdminAPIEndpoints checks each endpoint's JSON and status codes.
func TestAdminAPIEndpoints(t *testing.T) {
	h, srv := newTestAdmin(t, false)
	get := func(path string, v any) {
		t.Helper()
		code, hdr, body := call(h, "GET", path)
		if code != 200 || hdr.Get("Content-Type") != "application/json" {
			t.Fatalf("GET %s = %d %q: %s", path, code, hdr.Get("Content-Type"), body)
		}
		if err := json.Unmarshal([]byte(body), v); err != nil {
			t.Fatalf("GET %s: %v: %s", path, err, body)
		}
	}

	var raw map[string]any
	get("/api/v1/status", &raw)
	for _, k := range []string{"uptime_seconds", "sessions", "logins", "reuse_ratio", "cache", "discovery", "backends"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("status lacks %q: %v", k, raw)
		}
	}
	var st apiStatus
	get("/api/v1/status", &st)
	if st.Discovery.Kind != "static" || !st.Discovery.Healthy || len(st.Backends) != 2 {
		t.Errorf("status = %+v", st)
	}
	if b := st.Backends[1]; b.ID != "b1" || b.Weight != 2 || b.TLS != "starttls" || b.State != "up" {
		t.Errorf("status backend b1 = %+v", b)
	}

	code, _, body := call(h, "POST", "/api/v1/backends/b0/drain")
	if code != 200 || !strings.Contains(body, `"drained": true`) {
		t.Fatalf("drain b0 = %d %s", code, body)
	}
	var bs struct{ Backends []apiBackend }
	get("/api/v1/backends", &bs)
	if len(bs.Backends) != 2 || bs.Backends[0].State != "drained" || !bs.Backends[0].Drained || bs.Backends[1].State != "up" {
		t.Errorf("backends after the drain = %+v", bs.Backends)
	}
	if code, _, body := call(h, "POST", "/api/v1/backends/b1/drain"); code != 409 || !strings.Contains(body, `"error"`) {
		t.Errorf("draining the last backend in service = %d %s, want 409", code, body)
	}
	if code, _, body := call(h, "POST", "/api/v1/backends/nope/drain"); code != 404 || !strings.Contains(body, `"error"`) {
		t.Errorf("draining an unknown backend = %d %s, want 404", code, body)
	}

	var u apiUser
	get("/api/v1/users/Some.User@Example.org", &u)
	if u.User != "Some.User@Example.org" || u.HashKey != "some.user@example.org" || u.Backend != "b1" || len(u.Order) != 2 {
		t.Errorf("user = %+v", u)
	}
	for _, c := range u.Order {
		if want := map[string]string{"b0": "drained", "b1": "up"}[c.ID]; c.State != want {
			t.Errorf("order entry %+v, want state %q", c, want)
		}
	}
	if u.Sessions == nil || u.Cached == nil {
		t.Errorf("empty lists should be [], not null: %+v", u)
	}
	// A name with a slash, escaped, is one path segment.
	get("/api/v1/users/"+"a%2Fb", &u)
	if u.User != "a/b" {
		t.Errorf("escaped user = %q, want a/b", u.User)
	}

	if code, _, body := call(h, "DELETE", "/api/v1/backends/b0/drain"); code != 200 || !strings.Contains(body, `"drained": false`) {
		t.Errorf("undrain b0 = %d %s", code, body)
	}
	if len(srv.Backends()) != 2 {
		t.Errorf("after the undrain %d backends in service, want 2", len(srv.Backends()))
	}
	var k apiKick
	if code, _, body := call(h, "POST", "/api/v1/users/alice/kick"); code != 200 || json.Unmarshal([]byte(body), &k) != nil || k.User != "alice" {
		t.Errorf("kick = %d %s", code, body)
	}
	var f apiFlush
	if code, _, body := call(h, "POST", "/api/v1/cache/flush"); code != 200 || json.Unmarshal([]byte(body), &f) != nil || !strings.Contains(body, `"closed": 0`) {
		t.Errorf("flush = %d %s", code, body)
	}
}

// TestAdminAPIAgainstDovecot: through the HTTP layer, a user's session and
// cached connection show up, a kick ends the session with a BYE, and no
// answer holds the password.
func TestAdminAPIAgainstDovecot(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 1, Messages: 1})
	user := dovecottest.UserName(1)
	pass := dc.PasswordOf(user)
	srv := proxy.New(proxy.Options{Pool: pool.New(pool.Options{}), Dialer: &proxy.Dialer{Timeout: 2 * time.Second, CheckTimeout: 2 * time.Second}})
	srv.SetBackends([]proxy.Backend{{ID: dc.Name, Addr: dc.Addr, Weight: 1}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln, proxy.TLSNone)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	traceDir := t.TempDir()
	api, err := newAdminAPI(srv, func() sourceStatus { return sourceStatus{Kind: "static", Healthy: true} }, "", traceDir, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	h := api.handler()

	login := func() *imapConn {
		t.Helper()
		c, err := dialIMAP(ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.close)
		if res, err := c.login(user, pass); err != nil || !res.ok() {
			t.Fatalf("LOGIN: %v %s", err, res)
		}
		return c
	}
	if err := login().logout(); err != nil {
		t.Fatal(err)
	}
	// The second login reuses the first's connection; the third needs a
	// new one, which its LOGOUT caches before it is answered.
	active := login()
	if err := login().logout(); err != nil {
		t.Fatal(err)
	}
	var bodies []string
	var u apiUser
	_, _, body := call(h, "GET", "/api/v1/users/"+user)
	bodies = append(bodies, body)
	if err := json.Unmarshal([]byte(body), &u); err != nil {
		t.Fatal(err)
	}
	if u.Active != 1 || len(u.Sessions) != 1 || len(u.Cached) != 1 || u.Sessions[0].Client != active.conn.LocalAddr().String() || u.Sessions[0].User != user {
		t.Fatalf("user = %+v", u)
	}
	_, _, body = call(h, "GET", "/api/v1/status")
	bodies = append(bodies, body)
	var st apiStatus
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Logins.Client != 3 || st.Logins.Backend != 2 || st.ReuseRatio != 1.5 || st.Backends[0].Active != 1 || st.Backends[0].Cached != 1 {
		t.Errorf("status = %+v", st)
	}

	// A trace of the user, through the API: only inside trace_dir, no
	// password in it.
	code, _, body := call(h, "POST", "/api/v1/users/"+user+"/trace")
	var tr apiTrace
	if code != 200 || json.Unmarshal([]byte(body), &tr) != nil || filepath.Dir(tr.Path) != traceDir {
		t.Fatalf("start trace = %d %s", code, body)
	}
	if code, _, body := call(h, "POST", "/api/v1/users/"+user+"/trace"); code != http.StatusConflict {
		t.Errorf("second start trace = %d %s, want 409", code, body)
	}
	traced := login()
	if res, err := traced.cmd("SELECT INBOX"); err != nil || !res.ok() {
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
	traced.logout()

	code, _, body = call(h, "POST", "/api/v1/users/"+user+"/kick")
	bodies = append(bodies, body)
	var k apiKick
	if code != 200 || json.Unmarshal([]byte(body), &k) != nil || k.Sessions != 1 || k.Cached != 1 {
		t.Fatalf("kick = %d %s", code, body)
	}
	lines, err := active.readToEOF()
	if err != nil || len(lines) != 1 || !strings.HasPrefix(lines[0], "* BYE [UNAVAILABLE]") {
		t.Errorf("kicked client got %q (%v), want a BYE [UNAVAILABLE] and EOF", lines, err)
	}
	for _, b := range bodies {
		if strings.Contains(b, pass) {
			t.Fatalf("an admin API answer holds the password: %s", b)
		}
	}
}

func TestAdminRenderStatus(t *testing.T) {
	prev := &apiStatus{UptimeSeconds: 100, Logins: apiLogins{Client: 1000, Backend: 200}}
	cur := &apiStatus{
		UptimeSeconds: 110,
		Sessions:      42,
		Logins:        apiLogins{Client: 1125, Backend: 225, Reused: 900},
		ReuseRatio:    5,
		Cache:         apiCache{Open: 60, Cached: 18, Hits: 900, Misses: 225, HitRatio: 0.8},
		Discovery:     apiDiscovery{Kind: "consul", Healthy: true},
		Backends: []apiBackend{
			{ID: "imap-mail1", Address: "10.0.0.1:143", Weight: 1, State: "up", Active: 30, Cached: 10},
			{ID: "imap-mail2", Address: "10.0.0.2:143", Weight: 2, State: "drained", Active: 12, Cached: 0},
		},
	}
	out := renderStatus(cur, prev)
	for _, want := range []string{
		"up 1m50s", "sessions 42", "logins/s 12.5", "cache hits 80.0%", "reuse 5.00x", "discovery consul ok",
		"BACKEND", "imap-mail1  10.0.0.1:143  1       up       30      10",
		"imap-mail2  10.0.0.2:143  2       drained  12      0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("renderStatus lacks %q:\n%s", want, out)
		}
	}
	// The first screen has no rate yet, nor has one after a restart.
	for name, p := range map[string]*apiStatus{"first": nil, "restarted": {UptimeSeconds: 500, Logins: apiLogins{Client: 5000}}} {
		if out := renderStatus(cur, p); !strings.Contains(out, "logins/s -") {
			t.Errorf("%s screen shows a rate:\n%s", name, out)
		}
	}
	cur.Discovery = apiDiscovery{Kind: "consul", LastSuccessAgeSeconds: 125}
	if out := renderStatus(cur, nil); !strings.Contains(out, "discovery consul FAILING (last success 2m5s ago)") {
		t.Errorf("failing discovery not shown:\n%s", out)
	}
}

func TestAdminRenderUser(t *testing.T) {
	u := &apiUser{
		User: "Alice", HashKey: "alice", Backend: "b2",
		Order:    []apiChoice{{"b1", "drained"}, {"b2", "up"}, {"b0", "down"}},
		Active:   1,
		Sessions: []apiSession{{ID: "1a", User: "Alice", Backend: "b2", Client: "192.0.2.7:50123", Since: time.Now().Add(-time.Minute)}},
		Cached:   []apiCached{{Backend: "b2", AgeSeconds: 300, IdleSeconds: 20}},
	}
	out := renderUser(u)
	for _, want := range []string{
		`Alice -> b2  (hash key "alice")`, "order:  b1 (drained), b2, b0 (down)", "active: 1", "cached: 1",
		"session  b2       192.0.2.7:50123", "cached   b2       -                5m0s  20s",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("renderUser lacks %q:\n%s", want, out)
		}
	}
}

func TestAdminURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"127.0.0.1:9143", "http://127.0.0.1:9143"},
		{":9143", "http://127.0.0.1:9143"},
		{"0.0.0.0:9143", "http://127.0.0.1:9143"},
		{"[::]:9143", "http://[::1]:9143"},
		{"10.1.2.3:80", "http://10.1.2.3:80"},
		{"https://admin.example:8443/", "https://admin.example:8443"},
	}
	for _, tt := range tests {
		if got := adminURL(tt.in); got != tt.want {
			t.Errorf("adminURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestAdminClient runs the CLI's client against the API: the token goes
// along, and an API error comes back with its message.
func TestAdminClient(t *testing.T) {
	h, _ := newTestAdmin(t, true)
	ts := httptest.NewServer(h)
	defer ts.Close()
	c := &adminClient{base: ts.URL, token: testToken, http: ts.Client()}
	var st apiStatus
	if err := c.do(context.Background(), "GET", "/api/v1/status", &st); err != nil || len(st.Backends) != 2 {
		t.Fatalf("status: %v %+v", err, st)
	}
	var d apiDrain
	err := c.do(context.Background(), "POST", "/api/v1/backends/nope/drain", &d)
	if err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), "unknown backend") {
		t.Errorf("drain of an unknown backend: %v", err)
	}
	c.token = "wrong"
	if err := c.do(context.Background(), "GET", "/api/v1/status", &st); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("wrong token: %v", err)
	}
}
