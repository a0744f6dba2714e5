package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/proxy"
)

const testToken = "tok-3f9c2e1a"

// newTestAdmin returns the admin listener's handler for a server whose set
// is backends b0 and b1 (never dialled), with the token when withToken.
func newTestAdmin(t *testing.T, withToken bool) (http.Handler, *proxy.Server) {
	t.Helper()
	srv := proxy.New(proxy.Options{})
	srv.SetBackends([]backend.Backend{
		{ID: "b0", Addr: "127.0.0.1:1", Weight: 1},
		{ID: "b1", Addr: "127.0.0.1:2", Weight: 2, TLS: backend.TLSStartTLS},
	})
	opts := Options{
		Source: func() SourceStatus {
			return SourceStatus{Kind: "static", Healthy: true, LastSuccess: time.Now(), Backends: 2}
		},
		Listening: func() bool { return true },
		Metrics:   prometheus.NewRegistry(),
	}
	if withToken {
		opts.Token = []byte(testToken)
	}
	return New(srv, opts), srv
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
			var e ErrorBody
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
		var e ErrorBody
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
	var st Status
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
	var bs struct{ Backends []Backend }
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

	var u User
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
	var k Kick
	if code, _, body := call(h, "POST", "/api/v1/users/alice/kick"); code != 200 || json.Unmarshal([]byte(body), &k) != nil || k.User != "alice" {
		t.Errorf("kick = %d %s", code, body)
	}
	var f Flush
	if code, _, body := call(h, "POST", "/api/v1/cache/flush"); code != 200 || json.Unmarshal([]byte(body), &f) != nil || !strings.Contains(body, `"closed": 0`) {
		t.Errorf("flush = %d %s", code, body)
	}
}

// TestZeroOptions: a Handler with zero Options serves every path: no
// source, listener state, registry or logger is needed, and no token.
func TestZeroOptions(t *testing.T) {
	srv := proxy.New(proxy.Options{})
	srv.SetBackends([]backend.Backend{{ID: "b0", Addr: "127.0.0.1:1", Weight: 1}})
	h := New(srv, Options{})
	for _, path := range []string{"/healthz", "/readyz", "/metrics", "/api/v1/status", "/api/v1/users/alice"} {
		if code, _, body := call(h, "GET", path); code != http.StatusOK {
			t.Errorf("GET %s = %d %s, want 200", path, code, body)
		}
	}
	if code, _, body := call(h, "POST", "/api/v1/users/alice/trace"); code != http.StatusConflict {
		t.Errorf("trace without a trace dir = %d %s, want 409", code, body)
	}
	// A kick logs: the nil Logger must not be used as is.
	if code, _, body := call(h, "POST", "/api/v1/users/alice/kick"); code != http.StatusOK {
		t.Errorf("kick = %d %s, want 200", code, body)
	}
}
