package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/proxy"
)

const testToken = "tok-3f9c2e1a"

// newTestAdmin returns the admin listener's handler for a server whose
// set is backends b0 and b1 (never dialled), with the token when withToken.
func newTestAdmin(t *testing.T, withToken bool) (http.Handler, *proxy.Server) {
	t.Helper()
	srv := proxy.New(proxy.Options{})
	srv.SetBackends([]backend.Backend{
		{ID: "b0", Addr: "127.0.0.1:1", Weight: 1},
		{ID: "b1", Addr: "127.0.0.1:2", Weight: 2, TLS: backend.TLSStartTLS},
	})
	var opts admin.Options
	if withToken {
		opts.Token = []byte(testToken)
	}
	return admin.New(srv, opts), srv
}

func TestAdminRenderStatus(t *testing.T) {
	prev := &admin.Status{UptimeSeconds: 100, Logins: admin.Logins{Client: 1000, Backend: 200}}
	cur := &admin.Status{
		UptimeSeconds: 110,
		Sessions:      42,
		Logins:        admin.Logins{Client: 1125, Backend: 225, Reused: 900},
		ReuseRatio:    5,
		Cache:         admin.Cache{Open: 60, Cached: 18, Hits: 900, Misses: 225, HitRatio: 0.8},
		Discovery:     admin.Discovery{Kind: "consul", Healthy: true},
		Backends: []admin.Backend{
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
	for name, p := range map[string]*admin.Status{"first": nil, "restarted": {UptimeSeconds: 500, Logins: admin.Logins{Client: 5000}}} {
		if out := renderStatus(cur, p); !strings.Contains(out, "logins/s -") {
			t.Errorf("%s screen shows a rate:\n%s", name, out)
		}
	}
	cur.Discovery = admin.Discovery{Kind: "consul", LastSuccessAgeSeconds: 125}
	if out := renderStatus(cur, nil); !strings.Contains(out, "discovery consul FAILING (last success 2m5s ago)") {
		t.Errorf("failing discovery not shown:\n%s", out)
	}
}

func TestAdminRenderUser(t *testing.T) {
	u := &admin.User{
		User: "Alice", HashKey: "alice", Backend: "b2",
		Order:    []admin.Choice{{ID: "b1", State: "drained"}, {ID: "b2", State: "up"}, {ID: "b0", State: "down"}},
		Active:   1,
		Sessions: []admin.Session{{ID: "1a", User: "Alice", Backend: "b2", Client: "192.0.2.7:50123", Since: time.Now().Add(-time.Minute)}},
		Cached:   []admin.Cached{{Backend: "b2", AgeSeconds: 300, IdleSeconds: 20}},
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
	var st admin.Status
	if err := c.do(context.Background(), "GET", "/api/v1/status", &st); err != nil || len(st.Backends) != 2 {
		t.Fatalf("status: %v %+v", err, st)
	}
	var d admin.Drain
	err := c.do(context.Background(), "POST", "/api/v1/backends/nope/drain", &d)
	if err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), "unknown backend") {
		t.Errorf("drain of an unknown backend: %v", err)
	}
	c.token = "wrong"
	if err := c.do(context.Background(), "GET", "/api/v1/status", &st); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("wrong token: %v", err)
	}
}
