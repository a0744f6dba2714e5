package discovery

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/consultest"
)

// integrationBound is how long any one step against the real agent may
// take: TCP checks run every second, a restart takes a few.
const integrationBound = 30 * time.Second

// waitSet reads updates until one equals want.
func waitSet(t *testing.T, updates <-chan []Backend, want []Backend, step string) {
	t.Helper()
	timer := time.NewTimer(integrationBound)
	defer timer.Stop()
	var last []Backend
	for {
		select {
		case bs := <-updates:
			if Equal(bs, want) {
				return
			}
			last = bs
		case <-timer.C:
			t.Fatalf("%s: no update(%v) within %v; last update(%v)", step, want, integrationBound, last)
		}
	}
}

func TestConsulIntegration(t *testing.T) {
	agent := consultest.StartT(t)

	var (
		svcs []consultest.Service
		want []Backend
	)
	for i := 1; i <= 3; i++ {
		host, port := consultest.CheckTarget(t)
		id := "imap-" + strconv.Itoa(i)
		s := consultest.Service{Name: "imap-it", ID: id, Address: host, Port: port, Tags: []string{"mail"}}
		b := Backend{ID: id, Addr: net.JoinHostPort(host, strconv.Itoa(port)), Weight: 1, TLS: TLSStartTLS}
		switch i {
		case 1: // meta weight beats Weights.Passing
			s.Weight, s.Meta = 2, map[string]string{"imap_weight": "5"}
			b.Weight = 5
		case 2: // Weights.Passing, TLS from meta
			s.Weight, s.Meta = 3, map[string]string{"imap_tls": "implicit"}
			b.Weight, b.TLS = 3, TLSImplicit
		}
		svcs, want = append(svcs, s), append(want, b)
	}
	register := func(ss ...consultest.Service) {
		t.Helper()
		for _, s := range ss {
			if err := agent.Register(s); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Another service and an untagged instance of this one stay out.
	host, port := consultest.CheckTarget(t)
	register(consultest.Service{Name: "other", ID: "other-1", Address: host, Port: port, Tags: []string{"mail"}},
		consultest.Service{Name: "imap-it", ID: "imap-untagged", Address: host, Port: port})

	w, err := NewWatcher(ConsulOptions{
		Address:    agent.Addr,
		Service:    "imap-it",
		Tag:        "mail",
		WaitTime:   integrationBound,
		MinBackoff: 50 * time.Millisecond,
		MaxBackoff: 200 * time.Millisecond,
		DefaultTLS: TLSStartTLS,
		Logger:     hclog.New(&hclog.LoggerOptions{Name: "discovery", Level: hclog.Debug, Output: t.Output()}),
	})
	if err != nil {
		t.Fatal(err)
	}
	statuses := make(chan Status, 256)
	w.afterQuery = func(st Status) {
		select {
		case statuses <- st:
		default: // the test only waits for later ones
		}
	}
	updates := make(chan []Backend, 256)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, func(bs []Backend) { updates <- bs }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	}()

	register(svcs...)
	waitSet(t, updates, want, "three registered")
	if st := w.Status(); !st.Healthy || st.Backends != 3 {
		t.Errorf("Status = %+v, want healthy with 3 backends", st)
	}

	if err := agent.Maintenance("imap-2", true); err != nil {
		t.Fatal(err)
	}
	waitSet(t, updates, []Backend{want[0], want[2]}, "imap-2 in maintenance")
	if err := agent.Maintenance("imap-2", false); err != nil {
		t.Fatal(err)
	}
	waitSet(t, updates, want, "imap-2 out of maintenance")
	if err := agent.Deregister("imap-3"); err != nil {
		t.Fatal(err)
	}
	two := want[:2]
	waitSet(t, updates, two, "imap-3 deregistered")

	// Consul goes away: the watcher turns unhealthy, keeps retrying and
	// never touches the set.
	for len(statuses) > 0 {
		<-statuses
	}
	if err := agent.Stop(); err != nil {
		t.Fatal(err)
	}
	timer := time.NewTimer(integrationBound)
	defer timer.Stop()
	for down := false; !down; {
		select {
		case st := <-statuses:
			down = !st.Healthy && st.Failures >= 3
		case <-timer.C:
			t.Fatalf("watcher did not see 3 failures within %v of the agent's stop; status %+v", integrationBound, w.Status())
		}
	}
	select {
	case bs := <-updates:
		t.Errorf("update(%v) while Consul was down, want none", bs)
	default:
	}
	if st := w.Status(); st.Healthy || st.Backends != 2 || st.LastError == "" {
		t.Errorf("Status with Consul down = %+v, want unhealthy, 2 backends, an error", st)
	}

	// Consul is back, empty (a dev agent keeps nothing): once the services
	// are registered again the watcher delivers them, by itself.
	if err := agent.Restart(); err != nil {
		t.Fatal(err)
	}
	register(svcs[:2]...)
	waitSet(t, updates, two, "after restart")
	if st := w.Status(); !st.Healthy || st.Failures != 0 || st.Backends != 2 {
		t.Errorf("Status after recovery = %+v, want healthy, 0 failures, 2 backends", st)
	}
}
