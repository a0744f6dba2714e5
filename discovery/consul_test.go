package discovery

import (
	"errors"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/imapproxy/imapproxy/backend"
)

// entry builds a health entry of service ID id on a node at 10.0.0.1.
func entry(id, addr string, port int, passing int, meta map[string]string) *api.ServiceEntry {
	return &api.ServiceEntry{
		Node: &api.Node{Node: "node-" + id, Address: "10.0.0.1"},
		Service: &api.AgentService{
			ID: id, Service: "imap", Address: addr, Port: port, Meta: meta,
			Weights: api.AgentWeights{Passing: passing, Warning: 1},
		},
	}
}

func TestBackendFromEntry(t *testing.T) {
	noNode := entry("x", "", 143, 1, nil)
	noNode.Node = nil
	tests := []struct {
		name       string
		e          *api.ServiceEntry
		defaultTLS backend.TLSMode
		want       Backend
		ok         bool
		problems   int
	}{
		{name: "service address", e: entry("a", "10.0.0.5", 143, 1, nil),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1}, ok: true},
		{name: "node address fallback", e: entry("a", "", 143, 1, nil),
			want: Backend{ID: "a", Addr: "10.0.0.1:143", Weight: 1}, ok: true},
		{name: "hostname", e: entry("a", "imap1.example.net", 143, 1, nil),
			want: Backend{ID: "a", Addr: "imap1.example.net:143", Weight: 1}, ok: true},
		{name: "ipv6 bracketed", e: entry("a", "2001:db8::1", 993, 1, nil),
			want: Backend{ID: "a", Addr: "[2001:db8::1]:993", Weight: 1}, ok: true},
		{name: "weight from Weights.Passing", e: entry("a", "10.0.0.5", 143, 3, nil),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 3}, ok: true},
		{name: "meta weight beats Weights.Passing", e: entry("a", "10.0.0.5", 143, 3, map[string]string{"imap_weight": "5"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 5}, ok: true},
		{name: "meta weight with spaces", e: entry("a", "10.0.0.5", 143, 3, map[string]string{"imap_weight": " 7 "}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 7}, ok: true},
		{name: "invalid meta weight falls back to Weights.Passing", e: entry("a", "10.0.0.5", 143, 3, map[string]string{"imap_weight": "heavy"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 3}, ok: true, problems: 1},
		{name: "zero meta weight is invalid", e: entry("a", "10.0.0.5", 143, 3, map[string]string{"imap_weight": "0"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 3}, ok: true, problems: 1},
		{name: "negative meta weight is invalid", e: entry("a", "10.0.0.5", 143, 0, map[string]string{"imap_weight": "-2"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1}, ok: true, problems: 1},
		{name: "no weight at all", e: entry("a", "10.0.0.5", 143, 0, nil),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1}, ok: true},
		{name: "tls meta", e: entry("a", "10.0.0.5", 993, 1, map[string]string{"imap_tls": "implicit"}), defaultTLS: TLSStartTLS,
			want: Backend{ID: "a", Addr: "10.0.0.5:993", Weight: 1, TLS: TLSImplicit}, ok: true},
		{name: "tls meta none", e: entry("a", "10.0.0.5", 143, 1, map[string]string{"imap_tls": "none"}), defaultTLS: TLSStartTLS,
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1, TLS: TLSNone}, ok: true},
		{name: "tls meta any case", e: entry("a", "10.0.0.5", 143, 1, map[string]string{"imap_tls": "StartTLS"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1, TLS: TLSStartTLS}, ok: true},
		{name: "invalid tls meta uses default", e: entry("a", "10.0.0.5", 143, 1, map[string]string{"imap_tls": "ssl"}), defaultTLS: TLSStartTLS,
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1, TLS: TLSStartTLS}, ok: true, problems: 1},
		{name: "invalid tls meta, empty default", e: entry("a", "10.0.0.5", 143, 1, map[string]string{"imap_tls": "yes"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1}, ok: true, problems: 1},
		{name: "absent tls meta uses default", e: entry("a", "10.0.0.5", 143, 1, map[string]string{"other": "x"}), defaultTLS: TLSNone,
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 1, TLS: TLSNone}, ok: true},
		{name: "two bad meta values", e: entry("a", "10.0.0.5", 143, 2, map[string]string{"imap_tls": "tls", "imap_weight": "1.5"}),
			want: Backend{ID: "a", Addr: "10.0.0.5:143", Weight: 2}, ok: true, problems: 2},
		{name: "no address anywhere", e: noNode, ok: false, problems: 1},
		{name: "no port", e: entry("a", "10.0.0.5", 0, 1, nil), ok: false, problems: 1},
		{name: "port out of range", e: entry("a", "10.0.0.5", 70000, 1, nil), ok: false, problems: 1},
		{name: "no id", e: entry("", "10.0.0.5", 143, 1, nil), ok: false, problems: 1},
		{name: "no service", e: &api.ServiceEntry{Node: &api.Node{Address: "10.0.0.1"}}, ok: false},
		{name: "nil entry", e: nil, ok: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, problems, ok := backendFromEntry(tt.e, tt.defaultTLS)
			if ok != tt.ok || (ok && got != tt.want) {
				t.Errorf("backendFromEntry = %+v, %v; want %+v, %v", got, ok, tt.want, tt.ok)
			}
			if len(problems) != tt.problems {
				t.Errorf("backendFromEntry problems = %v, want %d", problems, tt.problems)
			}
		})
	}
}

func TestBackendsFromEntries(t *testing.T) {
	entries := []*api.ServiceEntry{
		entry("c", "10.0.0.3", 143, 1, nil),
		entry("a", "10.0.0.1", 143, 1, nil),
		entry("skip", "10.0.0.4", 0, 1, nil),
		entry("a", "10.0.0.9", 143, 1, nil), // same ID on another node
	}
	got, problems := backendsFromEntries(entries, "")
	want := []Backend{
		{ID: "a", Addr: "10.0.0.1:143", Weight: 1},
		{ID: "c", Addr: "10.0.0.3:143", Weight: 1},
	}
	if !Equal(got, want) {
		t.Errorf("backendsFromEntries = %v, want %v", got, want)
	}
	var msgs []string
	for _, p := range problems {
		msgs = append(msgs, p.msg)
	}
	wantMsgs := []string{"ignoring service instance without valid port", "ignoring service instance with a duplicate id"}
	if !slices.Equal(msgs, wantMsgs) {
		t.Errorf("backendsFromEntries problems = %q, want %q", msgs, wantMsgs)
	}

	if got, _ := backendsFromEntries(nil, ""); got == nil || len(got) != 0 {
		t.Errorf("backendsFromEntries(nil) = %#v, want an empty non-nil set", got)
	}
}

func TestNextIndex(t *testing.T) {
	tests := []struct {
		name            string
		prev, got, want uint64
	}{
		{"first answer", 0, 42, 42},
		{"forward", 42, 50, 50},
		{"unchanged", 42, 42, 42},
		{"backwards resets", 42, 7, 0},
		{"backwards to zero resets", 42, 0, 0},
		{"zero is never waited on", 0, 0, 1},
		{"after a reset", 0, 7, 7},
	}
	for _, tt := range tests {
		if got := nextIndex(tt.prev, tt.got); got != tt.want {
			t.Errorf("%s: nextIndex(%d, %d) = %d, want %d", tt.name, tt.prev, tt.got, got, tt.want)
		}
	}
}

func TestBackoff(t *testing.T) {
	const s = time.Second
	tests := []struct {
		minB, maxB time.Duration
		n          uint64
		r          float64
		want       time.Duration
	}{
		{s, 60 * s, 1, 0, s},
		{s, 60 * s, 1, 0.5, 750 * time.Millisecond},
		{s, 60 * s, 2, 0, 2 * s},
		{s, 60 * s, 3, 0, 4 * s},
		{s, 60 * s, 6, 0, 32 * s},
		{s, 60 * s, 7, 0, 60 * s}, // 64s capped
		{s, 60 * s, 7, 0.999999, 30*s + 30*time.Microsecond},
		{s, 60 * s, 1 << 40, 0, 60 * s}, // no overflow, no long loop
		{s, 60 * s, ^uint64(0), 0, 60 * s},
		{3 * s, 3 * s, 5, 0, 3 * s},
		{time.Duration(1) << 62, time.Duration(math.MaxInt64), 3, 0, time.Duration(math.MaxInt64)},
	}
	for _, tt := range tests {
		got := backoff(tt.minB, tt.maxB, tt.n, tt.r)
		if got != tt.want {
			t.Errorf("backoff(%v, %v, %d, %v) = %v, want %v", tt.minB, tt.maxB, tt.n, tt.r, got, tt.want)
		}
	}
	// Every jitter stays within (d/2, d].
	for n := uint64(1); n <= 10; n++ {
		d := min(s<<(n-1), 60*s)
		for _, r := range []float64{0, 0.25, 0.5, 0.75, 0.9999} {
			if got := backoff(s, 60*s, n, r); got <= d/2 || got > d {
				t.Errorf("backoff(1s, 60s, %d, %v) = %v, want within (%v, %v]", n, r, got, d/2, d)
			}
		}
	}
}

func TestConsulOptionsValidate(t *testing.T) {
	tests := []struct {
		name    string
		opts    ConsulOptions
		wantErr bool
	}{
		{"minimal", ConsulOptions{Service: "imap"}, false},
		{"full", ConsulOptions{Service: "imap", Scheme: "https", DefaultTLS: TLSImplicit, WaitTime: time.Minute, MinBackoff: time.Second, MaxBackoff: time.Second}, false},
		{"no service", ConsulOptions{}, true},
		{"bad scheme", ConsulOptions{Service: "imap", Scheme: "ftp"}, true},
		{"bad default tls", ConsulOptions{Service: "imap", DefaultTLS: "ssl"}, true},
		{"min above max", ConsulOptions{Service: "imap", MinBackoff: 2 * time.Minute}, true},
		{"negative", ConsulOptions{Service: "imap", WaitTime: -time.Second}, true},
	}
	for _, tt := range tests {
		err := tt.opts.validate()
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: validate() = %v, want error %v", tt.name, err, tt.wantErr)
		}
	}
	err := ConsulOptions{Scheme: "ftp"}.validate()
	if !errors.Is(err, ErrNoService) {
		t.Errorf("validate() = %v, want ErrNoService among the problems", err)
	}
}

func TestNewWatcher(t *testing.T) {
	t.Setenv("CONSUL_HTTP_ADDR", "10.1.2.3:8500")
	t.Setenv("CONSUL_HTTP_TOKEN", "env-token")

	cfg := ConsulOptions{Service: "imap"}.apiConfig()
	if cfg.Address != "10.1.2.3:8500" || cfg.Token != "env-token" {
		t.Errorf("apiConfig without Address/Token = %q, %q; want the environment's", cfg.Address, cfg.Token)
	}
	cfg = ConsulOptions{Service: "imap", Address: "127.0.0.1:8501", Scheme: "https", Token: "t",
		CAFile: "ca.pem", CertFile: "c.pem", KeyFile: "k.pem", InsecureSkipVerify: true}.apiConfig()
	if cfg.Address != "127.0.0.1:8501" || cfg.Scheme != "https" || cfg.Token != "t" ||
		cfg.TLSConfig.CAFile != "ca.pem" || cfg.TLSConfig.CertFile != "c.pem" || cfg.TLSConfig.KeyFile != "k.pem" ||
		!cfg.TLSConfig.InsecureSkipVerify {
		t.Errorf("apiConfig did not take the options: %+v", cfg)
	}

	if _, err := NewWatcher(ConsulOptions{}); !errors.Is(err, ErrNoService) {
		t.Errorf("NewWatcher without service = %v, want ErrNoService", err)
	}
	if _, err := NewWatcher(ConsulOptions{Service: "imap", Address: "gopher://x:1"}); err == nil {
		t.Error("NewWatcher with an unknown address scheme succeeded")
	}
	if _, err := NewWatcher(ConsulOptions{Service: "imap", TokenFile: "/nonexistent/token"}); err == nil {
		t.Error("NewWatcher with a missing token file succeeded")
	}
	w, err := NewWatcher(ConsulOptions{Service: "imap", Address: "http://127.0.0.1:8500"})
	if err != nil {
		t.Fatal(err)
	}
	if st := w.Status(); st.Healthy || st.Failures != 0 || !st.LastSuccess.IsZero() {
		t.Errorf("Status of a new watcher = %+v, want the zero Status", st)
	}
}
