package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/config"
	"github.com/imapproxy/imapproxy/discovery"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
	"github.com/imapproxy/imapproxy/session"
)

// daemon is the running process: the proxy server and the parts around it
// that a reload (SIGHUP) may replace one by one. The server itself, its
// sessions and its pool live for the whole process, so a reload never
// drops a session or a cached connection.
type daemon struct {
	path    string
	log     hclog.Logger // the root logger; its level follows log_level
	srv     *proxy.Server
	pool    *pool.Pool
	metrics *session.Metrics // kept across reloads
	ctx     context.Context  // the process's: ends at shutdown
	wg      sync.WaitGroup
	errc    chan error // a listener that failed for good

	mu        sync.Mutex // serialises start and reloads
	cfg       *config.Config
	listeners map[string]*runningListener // by address: a reload keeps the socket of an address it keeps
	disc      *discoveryRun
	// reg is read by metrics without mu, which a drain holds for long.
	reg atomic.Pointer[registration] // nil: not registered in Consul

	discGen atomic.Uint64 // the discovery run whose updates count
	status  atomic.Pointer[func() admin.SourceStatus]

	// adminAddr is the admin listener's address as bound at start (it
	// changes only with a restart); "" without one.
	adminAddr string

	reloadsOK, reloadsFailed atomic.Uint64
	lastReloadFailed         atomic.Bool
}

type runningListener struct {
	cfg  config.Listener
	opts proxy.ListenerOptions
	ln   net.Listener
}

// registration keeps the proxy registered in Consul until stopped.
type registration struct {
	opts   discovery.RegisterOptions
	r      *discovery.Registrar
	cancel context.CancelFunc
	done   chan struct{}
}

// stop deregisters (bounded by the registrar) and waits for it.
func (r *registration) stop() {
	r.cancel()
	<-r.done
}

// startRegistration registers the proxy as cfg says, if it says so,
// replacing a registration that differs. Called with listeners open.
func (d *daemon) startRegistration(cfg *config.Config) error {
	o, on := registerOptions(cfg, d.log, d.adminAddr)
	if cur := d.reg.Load(); cur != nil {
		cmpOpts := func(o discovery.RegisterOptions) discovery.RegisterOptions {
			o.Logger = nil
			return o
		}
		if on && reflect.DeepEqual(cmpOpts(cur.opts), cmpOpts(o)) {
			return nil
		}
		cur.stop()
		d.reg.Store(nil)
	}
	if !on {
		return nil
	}
	r, err := discovery.NewRegistrar(o)
	if err != nil {
		return fmt.Errorf("register: %w", err)
	}
	ctx, cancel := context.WithCancel(d.ctx)
	reg := &registration{opts: o, r: r, cancel: cancel, done: make(chan struct{})}
	d.wg.Go(func() {
		defer close(reg.done)
		r.Run(ctx) // logs its own failures and never gives up
	})
	d.reg.Store(reg)
	d.log.Info("registering in Consul", "service", o.Service, "id", r.ID(), "address", o.Address, "check", o.Check)
	return nil
}

// registered reports whether Consul has the proxy's registration (false
// when the proxy does not register).
func (d *daemon) registered() (on, ok bool) {
	reg := d.reg.Load()
	if reg == nil {
		return false, false
	}
	return true, reg.r.Status().Registered
}

// discoveryRun is one source feeding the server, stopped by cancel.
type discoveryRun struct {
	gen    uint64
	cancel context.CancelFunc
	done   chan struct{}
}

func newDaemon(ctx context.Context, path string, cfg *config.Config, log hclog.Logger) (*daemon, error) {
	p := pool.New(poolOptions(cfg, log))
	opts, err := serverOptions(cfg, log, p)
	if err != nil {
		return nil, err
	}
	opts.Metrics = session.NewMetrics()
	d := &daemon{
		metrics:   opts.Metrics,
		path:      path,
		log:       log,
		srv:       proxy.New(opts),
		pool:      p,
		ctx:       ctx,
		errc:      make(chan error, 16),
		cfg:       cfg,
		listeners: map[string]*runningListener{},
	}
	d.wg.Go(func() { p.Run(ctx) })
	return d, nil
}

func (d *daemon) sourceStatus() admin.SourceStatus {
	if f := d.status.Load(); f != nil {
		return (*f)()
	}
	return admin.SourceStatus{}
}

// startDiscovery starts a source for cfg and makes it the one whose sets
// count; the previous run, if any, is stopped first, and the server keeps
// the set it had until the new source delivers one.
// first is closed at the new source's first set.
func (d *daemon) startDiscovery(cfg *config.Config, first chan<- struct{}) error {
	src, status, err := newSource(cfg, d.log)
	if err != nil {
		return err
	}
	// The old source stops before the new one runs: a set it was still
	// delivering must not land after the new source's first.
	if old := d.disc; old != nil {
		old.cancel()
		<-old.done
		d.disc = nil
	}
	gen := d.discGen.Add(1)
	d.status.Store(&status)
	ctx, cancel := context.WithCancel(d.ctx)
	run := &discoveryRun{gen: gen, cancel: cancel, done: make(chan struct{})}
	var once sync.Once
	var probing atomic.Bool // a probe runs or succeeded
	// A flapping backend returns only once it has stayed: see
	// cluster.rejoin_hold.
	damper := discovery.NewDamper(cfg.Cluster.RejoinHold, func(bs, held []backend.Backend) {
		// The damper calls this one set at a time.
		if d.discGen.Load() != gen {
			return // a reload replaced this source
		}
		// Held backends are healthy in discovery: the proxy ends no
		// session on them, it only sends them no new login yet.
		d.srv.SetBackendsHeld(bs, held)
		if first != nil {
			once.Do(func() { close(first) })
		}
		// The greeting shows the backends' capabilities: read them
		// as soon as there is a backend to ask (later logins keep
		// them fresh). Off this goroutine: the probe dials, and the
		// damper's next set must not wait for it.
		if len(bs) > 0 && probing.CompareAndSwap(false, true) {
			d.wg.Go(func() {
				if err := d.srv.ProbeCapabilities(ctx); err != nil {
					d.log.Warn("could not read backend capabilities; greeting uses defaults until a login succeeds", "error", err)
					probing.Store(false) // the next set tries again
				}
			})
		}
	})
	damper.Log = d.log.Named("discovery")
	d.wg.Go(func() {
		defer close(run.done)
		defer damper.Stop()
		err := src.Run(ctx, damper.Update)
		if err != nil && ctx.Err() == nil {
			d.log.Error("backend discovery stopped", "error", err)
		}
	})
	d.disc = run
	return nil
}

// openListeners opens a listener for every address of cfg that has none
// yet. Nothing is served yet: serve does that, so that a reload that fails
// half-way can close what it opened and change nothing. Addresses open
// already keep their socket, whatever else changed (see reloadLocked).
func (d *daemon) openListeners(cfg *config.Config) (map[string]*runningListener, error) {
	opened := map[string]*runningListener{}
	for _, l := range cfg.Listeners {
		if _, ok := d.listeners[l.Address]; ok {
			continue
		}
		ln, err := listen(l.Address)
		if err != nil {
			closeListeners(opened)
			return nil, fmt.Errorf("listener %s: %w", l.Name, err)
		}
		opened[l.Address] = &runningListener{cfg: l, ln: ln, opts: listenerOptions(l)}
	}
	return opened, nil
}

func listenerOptions(l config.Listener) proxy.ListenerOptions {
	from, _ := proxyproto.ParseTrusted(l.ProxyProtocolFrom) // checked by config already
	return proxy.ListenerOptions{TLS: l.TLS, ProxyProtocolFrom: from, CacheByClientAddress: l.CacheByClientAddress}
}

func (d *daemon) serve(rl *runningListener) {
	d.log.Info("listening", "listener", rl.cfg.Name, "address", rl.ln.Addr().String(), "tls", rl.cfg.TLS,
		"proxy_protocol_from", rl.cfg.ProxyProtocolFrom)
	d.wg.Go(func() {
		err := d.srv.ServeListener(rl.ln, rl.opts)
		if err == nil || errors.Is(err, proxy.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
			return
		}
		d.errc <- fmt.Errorf("listener %s: %w", rl.cfg.Name, err)
	})
}

// start opens the listeners of the first configuration and serves them.
func (d *daemon) start() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	opened, err := d.openListeners(d.cfg)
	if err != nil {
		return err
	}
	for addr, rl := range opened {
		d.listeners[addr] = rl
		d.serve(rl)
	}
	return d.startRegistration(d.cfg)
}

// reload reads the configuration file again and applies it: an invalid
// file, or one whose listeners or certificates cannot be opened, changes
// nothing and logs every problem. Sessions and the cache are kept; what
// cannot change without a restart is named in a warning.
func (d *daemon) reload() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	err := d.reloadLocked()
	if err != nil {
		d.reloadsFailed.Add(1)
		d.lastReloadFailed.Store(true)
		for _, line := range strings.Split(err.Error(), "\n") {
			d.log.Error("configuration reload failed; the running configuration stays", "problem", line)
		}
		return err
	}
	d.reloadsOK.Add(1)
	d.lastReloadFailed.Store(false)
	return nil
}

// reloadLocked applies the file at d.path, all or nothing up to discovery:
// every step that can fail runs before any that cannot, and undoes what the
// steps before it did.
func (d *daemon) reloadLocked() error {
	cfg, err := config.Load(d.path)
	if err != nil {
		return err
	}
	old := d.cfg
	opts, err := serverOptions(cfg, d.log, d.pool)
	if err != nil {
		return err
	}
	opts.Metrics = d.metrics
	opened, err := d.openListeners(cfg)
	if err != nil {
		return err
	}
	changes, err := d.changeListeners(cfg)
	if err != nil {
		closeListeners(opened)
		return err
	}
	// From here on nothing fails but discovery, whose failure keeps the
	// old source running.
	discChanged := discoveryChanged(old, cfg)
	if discChanged {
		if err := d.startDiscovery(cfg, nil); err != nil {
			changes.undo(d.srv)
			closeListeners(opened)
			return fmt.Errorf("discovery: %w", err)
		}
	}
	changes.keep(d.log)

	d.log.SetLevel(hclog.LevelFromString(cfg.LogLevel))
	d.srv.SetOptions(opts)
	d.pool.SetOptions(poolOptions(cfg, d.log))
	d.swapListeners(cfg, opened)
	d.warnUnapplied(old, cfg)
	if err := d.startRegistration(cfg); err != nil {
		// The rest applied; the registration is what it was, or none.
		d.log.Error("configuration reloaded, but the Consul registration could not change", "error", err)
	}
	d.cfg = cfg
	d.log.Info("configuration reloaded", "file", d.path, "listeners", len(d.listeners), "discovery_restarted", discChanged)
	return nil
}

// listenerChange is new settings for a listener whose address a reload
// keeps: it keeps its socket, and a new name, TLS mode or PROXY protocol
// sources apply to the connections it accepts from now on.
type listenerChange struct {
	rl       *runningListener
	cfg      config.Listener
	old, new proxy.ListenerOptions
}

type listenerChanges []listenerChange

// changeListeners gives the server the new settings of every listener cfg
// keeps and changes. On failure it puts back those it changed.
func (d *daemon) changeListeners(cfg *config.Config) (listenerChanges, error) {
	var changes listenerChanges
	for _, l := range cfg.Listeners {
		if rl, ok := d.listeners[l.Address]; ok && !reflect.DeepEqual(rl.cfg, l) {
			changes = append(changes, listenerChange{rl, l, rl.opts, listenerOptions(l)})
		}
	}
	for i, c := range changes {
		if err := d.srv.SetListenerOptions(c.rl.ln, c.new); err != nil {
			changes[:i].undo(d.srv)
			return nil, fmt.Errorf("listener %s: %w; try again", c.cfg.Name, err)
		}
	}
	return changes, nil
}

// undo gives the server back the settings the listeners had.
func (cs listenerChanges) undo(srv *proxy.Server) {
	for _, c := range cs {
		srv.SetListenerOptions(c.rl.ln, c.old)
	}
}

// keep records the new settings as the listeners' own, once the reload
// can no longer fail.
func (cs listenerChanges) keep(log hclog.Logger) {
	for _, c := range cs {
		log.Info("listener settings changed; its socket is kept", "listener", c.cfg.Name, "address", c.cfg.Address,
			"tls", c.cfg.TLS, "proxy_protocol_from", c.cfg.ProxyProtocolFrom)
		c.rl.cfg, c.rl.opts = c.cfg, c.new
	}
}

func closeListeners(ls map[string]*runningListener) {
	for _, l := range ls {
		l.ln.Close()
	}
}

// discoveryChanged reports whether the backend source must restart.
func discoveryChanged(old, cfg *config.Config) bool {
	return !reflect.DeepEqual(old.Consul, cfg.Consul) || !reflect.DeepEqual(old.Backends, cfg.Backends) ||
		old.Cluster.RejoinHold != cfg.Cluster.RejoinHold
}

// swapListeners closes the listeners whose address cfg drops and serves
// those just opened.
func (d *daemon) swapListeners(cfg *config.Config, opened map[string]*runningListener) {
	keep := map[string]bool{}
	for _, l := range cfg.Listeners {
		keep[l.Address] = true
	}
	for addr, rl := range d.listeners {
		if !keep[addr] {
			// Closing a listener ends no session it accepted.
			d.log.Info("closing listener", "listener", rl.cfg.Name, "address", addr)
			rl.ln.Close()
			delete(d.listeners, addr)
		}
	}
	for addr, rl := range opened {
		d.listeners[addr] = rl
		d.serve(rl)
	}
}

// warnUnapplied names the settings a reload changed but cannot apply.
func (d *daemon) warnUnapplied(old, cfg *config.Config) {
	var restart []string
	if old.LogFormat != cfg.LogFormat {
		restart = append(restart, "log_format")
	}
	if old.Admin != cfg.Admin {
		restart = append(restart, "admin")
	}
	if old.Cache.Enabled != cfg.Cache.Enabled {
		// The pool applies it, but a cache turned off keeps what it
		// holds until the sweeper: say so rather than surprise.
		d.log.Info("cache.enabled changed; connections already cached are swept as usual", "enabled", cfg.Cache.Enabled)
	}
	if len(restart) > 0 {
		d.log.Warn("configuration reloaded, but these settings apply only after a restart", "settings", strings.Join(restart, ", "))
	}
}

// shutdown stops the listeners and discovery, drains the sessions until
// ctx ends (then closes them), and logs out the cached connections.
func (d *daemon) shutdown(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	// Out of Consul first, so that nothing sends new clients here while
	// the sessions drain.
	if reg := d.reg.Swap(nil); reg != nil {
		reg.stop()
	}
	if d.disc != nil {
		d.disc.cancel()
	}
	return d.srv.Shutdown(ctx)
}

// reloadCounts returns what the metrics show of reloads.
func (d *daemon) reloadCounts() (ok, failed uint64, lastFailed bool) {
	return d.reloadsOK.Load(), d.reloadsFailed.Load(), d.lastReloadFailed.Load()
}

// registerReloadMetrics exposes the outcome of SIGHUP reloads, and the
// proxy's own Consul registration.
func registerReloadMetrics(reg prometheus.Registerer, d *daemon) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "imapproxy", Name: "consul_registered",
		Help: "1 while Consul has this proxy's own registration (register block); 0 while it has not, and without the block."},
		func() float64 {
			if on, ok := d.registered(); on && ok {
				return 1
			}
			return 0
		}))
	// One family, two series: the const label keeps the result apart.
	for result, count := range map[string]func() uint64{
		"success": func() uint64 { ok, _, _ := d.reloadCounts(); return ok },
		"failure": func() uint64 { _, failed, _ := d.reloadCounts(); return failed },
	} {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "imapproxy", Name: "config_reloads_total",
			Help: "Configuration reloads (SIGHUP), by result.", ConstLabels: prometheus.Labels{"result": result}},
			func() float64 { return float64(count()) }))
	}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "imapproxy", Name: "config_last_reload_successful",
		Help: "0 if the last configuration reload failed (the previous configuration is still running), else 1."},
		func() float64 {
			if _, _, failed := d.reloadCounts(); failed {
				return 0
			}
			return 1
		}))
}
