package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"
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
	defer ic.close()
	if res, err := ic.login(resident, c.password(resident)); err != nil || !res.ok() {
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
	if res, err := ic.cmd("ID NIL"); err != nil || !res.ok() || !strings.Contains(strings.Join(res.untagged, " "), drained.name) {
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
