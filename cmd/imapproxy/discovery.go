package main

import (
	"cmp"
	"context"
	"slices"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/balancer"
	"github.com/imapproxy/imapproxy/config"
	"github.com/imapproxy/imapproxy/discovery"
)

// source is where the backend set comes from: the file or Consul.
type source interface {
	Run(ctx context.Context, update func([]backend.Backend)) error
}

func newSource(cfg *config.Config, log hclog.Logger) (source, func() admin.SourceStatus, error) {
	if cfg.Consul == nil {
		bs := cfg.Backends
		start := time.Now()
		n := len(backend.Normalize(bs))
		st := func() admin.SourceStatus {
			return admin.SourceStatus{Kind: "static", Healthy: true, LastSuccess: start, Backends: n}
		}
		return &discovery.Static{Backends: bs}, st, nil
	}
	w, err := discovery.NewWatcher(consulOptions(cfg.Consul, log))
	if err != nil {
		return nil, nil, err
	}
	st := func() admin.SourceStatus {
		s := w.Status()
		return admin.SourceStatus{Kind: "consul", Healthy: s.Healthy, LastSuccess: s.LastSuccess, Backends: s.Backends}
	}
	return w, st, nil
}

// consulOptions are the agent settings of the consul block.
func consulOptions(c *config.Consul, log hclog.Logger) discovery.ConsulOptions {
	return discovery.ConsulOptions{
		Address:            c.Address,
		Scheme:             c.Scheme,
		Token:              c.Token,
		TokenFile:          c.TokenFile,
		Datacenter:         c.Datacenter,
		Namespace:          c.Namespace,
		Partition:          c.Partition,
		CAFile:             c.CAFile,
		CertFile:           c.CertFile,
		KeyFile:            c.KeyFile,
		InsecureSkipVerify: c.InsecureSkipVerify,
		Service:            c.Service,
		Tag:                c.Tag,
		WaitTime:           c.WaitTime,
		Logger:             log.Named("consul"),
	}
}

// registerOptions describe the proxy's own Consul service, if the
// register block asks for one.
func registerOptions(cfg *config.Config, log hclog.Logger, adminAddr string) (discovery.RegisterOptions, bool) {
	r := cfg.Register
	if r == nil || len(cfg.Listeners) == 0 {
		return discovery.RegisterOptions{}, false
	}
	l := cfg.Listeners[0]
	if i := slices.IndexFunc(cfg.Listeners, func(c config.Listener) bool { return c.Name == r.Listener }); i >= 0 {
		l = cfg.Listeners[i] // the first of that name, as config checked
	}
	o := discovery.RegisterOptions{
		Consul:          discovery.ConsulOptions{Address: r.ConsulAddress},
		Service:         r.Service,
		ID:              r.ID,
		Address:         cmp.Or(r.Address, l.Address),
		Tags:            r.Tags,
		Meta:            map[string]string{"listener": l.Name, "tls": string(l.TLS)},
		Check:           r.Check,
		CheckInterval:   r.CheckInterval,
		DeregisterAfter: r.DeregisterAfter,
		Logger:          log.Named("register"),
	}
	if cfg.Consul != nil {
		o.Consul = consulOptions(cfg.Consul, log)
	}
	o.Consul.Logger = nil // the registrar logs as "register"
	if r.Check == "http" {
		// The admin listener bound at start: a reload does not move it.
		o.CheckHTTP = adminURL(adminAddr) + "/readyz"
	}
	return o, true
}

func hashKey(s string) balancer.KeyMode {
	switch s {
	case "exact":
		return balancer.KeyExact
	case "domain":
		return balancer.KeyDomain
	}
	return balancer.KeyLowercase
}
