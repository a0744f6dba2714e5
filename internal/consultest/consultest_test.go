package consultest

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func writeExecutable(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestBinary(t *testing.T) {
	dir := t.TempDir()
	explicit := filepath.Join(dir, "bin", "my-consul")
	writeExecutable(t, explicit)
	cache := filepath.Join(dir, "cache")
	cached := filepath.Join(cache, "consul-"+Version, "consul")
	writeExecutable(t, cached)
	pathDir := filepath.Join(dir, "path")
	inPath := filepath.Join(pathDir, "consul")
	writeExecutable(t, inPath)
	empty := filepath.Join(dir, "empty")
	if err := os.Mkdir(empty, 0o755); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name             string
		binEnv, cacheEnv string
		path             string
		want             string
		wantErr          bool
	}{
		{name: "env wins", binEnv: explicit, cacheEnv: cache, path: pathDir, want: explicit},
		{name: "env missing file is an error", binEnv: filepath.Join(dir, "nope"), cacheEnv: cache, wantErr: true},
		{name: "cache dir", cacheEnv: cache, path: pathDir, want: cached},
		{name: "PATH", cacheEnv: empty, path: pathDir, want: inPath},
		{name: "none", cacheEnv: empty, path: empty, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(BinaryEnv, tt.binEnv)
			t.Setenv(CacheEnv, tt.cacheEnv)
			t.Setenv("PATH", tt.path)
			got, err := Binary()
			if tt.wantErr {
				if !errors.Is(err, ErrNoConsul) {
					t.Fatalf("Binary() = %q, %v; want ErrNoConsul", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Binary() = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// waitPassing follows the passing instances of service with blocking
// queries until their IDs are want (sorted), and returns the entries. It
// fails the test after a bounded time.
func waitPassing(t *testing.T, c *api.Client, service string, want []string) []*api.ServiceEntry {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var (
		index uint64
		got   []string
	)
	for time.Now().Before(deadline) {
		q := &api.QueryOptions{WaitIndex: index, WaitTime: 2 * time.Second}
		entries, meta, err := c.Health().Service(service, "", true, q)
		if err != nil {
			t.Fatalf("health query: %v", err)
		}
		if meta.LastIndex < index {
			index = 0
		} else {
			index = meta.LastIndex
		}
		got = got[:0]
		for _, e := range entries {
			got = append(got, e.Service.ID)
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			return entries
		}
	}
	t.Fatalf("passing instances of %s = %q, want %q", service, got, want)
	return nil
}

func TestAgent(t *testing.T) {
	a := StartT(t)
	c, err := api.NewClient(&api.Config{Address: a.Addr})
	if err != nil {
		t.Fatal(err)
	}

	var svcs []Service
	for i := range 2 {
		host, port := CheckTarget(t)
		svcs = append(svcs, Service{
			Name:    "imap",
			ID:      "imap-" + strconv.Itoa(i),
			Address: host,
			Port:    port,
			Tags:    []string{"t" + strconv.Itoa(i)},
			Meta:    map[string]string{"imap_tls": "none"},
			Weight:  3 + i,
		})
	}
	register := func() {
		t.Helper()
		for _, s := range svcs {
			if err := a.Register(s); err != nil {
				t.Fatal(err)
			}
		}
	}
	register()
	entries := waitPassing(t, c, "imap", []string{"imap-0", "imap-1"})
	for _, e := range entries {
		i := slices.IndexFunc(svcs, func(s Service) bool { return s.ID == e.Service.ID })
		s, got := svcs[i], e.Service
		if got.Address != s.Address || got.Port != s.Port || got.Weights.Passing != s.Weight ||
			got.Meta["imap_tls"] != "none" || !slices.Equal(got.Tags, s.Tags) {
			t.Errorf("registered %+v, catalog has address %q port %d weights %+v meta %v tags %v",
				s, got.Address, got.Port, got.Weights, got.Meta, got.Tags)
		}
	}

	if err := a.Maintenance("imap-0", true); err != nil {
		t.Fatal(err)
	}
	waitPassing(t, c, "imap", []string{"imap-1"})
	if err := a.Maintenance("imap-0", false); err != nil {
		t.Fatal(err)
	}
	waitPassing(t, c, "imap", []string{"imap-0", "imap-1"})
	if err := a.Deregister("imap-1"); err != nil {
		t.Fatal(err)
	}
	waitPassing(t, c, "imap", []string{"imap-0"})

	// A restart keeps the address and loses every registration.
	addr := a.Addr
	if err := a.Restart(); err != nil {
		t.Fatal(err)
	}
	if a.Addr != addr {
		t.Errorf("Addr after Restart = %s, want %s", a.Addr, addr)
	}
	all, _, err := c.Health().Service("imap", "", false, nil)
	if err != nil {
		t.Fatalf("health query after restart: %v", err)
	}
	if len(all) != 0 {
		t.Errorf("after Restart %d instances of imap are registered, want 0", len(all))
	}
	register()
	waitPassing(t, c, "imap", []string{"imap-0", "imap-1"})
	if err := a.Maintenance("nope", true); err == nil {
		t.Error("Maintenance of an unknown service succeeded")
	}

	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Status().Leader(); err == nil {
		t.Error("agent still answers after Stop")
	}
	if _, err := os.Stat(a.dir); !os.IsNotExist(err) {
		t.Errorf("agent dir %s still there after Stop: %v", a.dir, err)
	}
	if err := a.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}
