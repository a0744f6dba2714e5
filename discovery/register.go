package discovery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

const (
	defaultCheckInterval   = 10 * time.Second
	defaultDeregisterAfter = time.Minute

	// Consul raises shorter values to these minimums (checks.MinInterval
	// and check_deregister_interval_min) and says so only in its own log:
	// NewRegistrar refuses them instead, so what is configured is what
	// runs.
	minCheckInterval   = time.Second
	minDeregisterAfter = time.Minute

	// agentCallTimeout bounds one call to the agent: a hung agent must not
	// stall the registrar, which has nothing else to wait for.
	agentCallTimeout = 10 * time.Second

	// deregisterTimeout bounds the deregistration after ctx has ended, so
	// a shutdown does not wait on an agent that is down. The service is
	// then left to DeregisterAfter.
	deregisterTimeout = 5 * time.Second
)

// Consul's limits on service meta (structs.ValidateServiceMetadata): the
// agent answers 400 to anything else, which retrying would not fix.
const (
	metaMaxPairs          = 64
	metaKeyMaxLength      = 128
	metaValueMaxLength    = 512
	metaKeyReservedPrefix = "consul-"
)

var metaKeyFormat = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)

// RegisterOptions describe the service this proxy registers for itself.
// Service and Address are required; every other zero value means the
// default written next to it.
type RegisterOptions struct {
	// Consul is the agent to talk to: Address, Scheme, Token, TokenFile,
	// Datacenter, Namespace, Partition, TLS, MinBackoff, MaxBackoff and
	// Logger (default: RegisterOptions.Logger) are used; Service, Tag,
	// WaitTime and DefaultTLS are not.
	Consul ConsulOptions

	Service string // required: the service name, e.g. "imapproxy"
	// ID is the service ID, unique per agent; "" = Service-HOSTNAME-PORT.
	// It must not contain '/'.
	ID string
	// Address is the advertised host:port, the IMAP listener: required,
	// with a host that clients can dial (not empty, 0.0.0.0 or ::) and a
	// numeric port.
	Address string
	Tags    []string
	Meta    map[string]string // e.g. version; Consul's key format and limits apply

	// Check is how Consul checks the proxy: "tcp" (the default: Consul
	// connects to Address) or "http" (Consul GETs CheckHTTP and wants a
	// 2xx, e.g. http://127.0.0.1:9143/readyz).
	Check     string
	CheckHTTP string
	// CheckInterval is the check's interval, and how often the registrar
	// asks the agent whether it still has the service; default 10s,
	// Consul's minimum is 1s.
	CheckInterval time.Duration
	// DeregisterAfter is the check's DeregisterCriticalServiceAfter:
	// a crashed proxy disappears by itself once its check has been
	// critical this long. Default 1m, Consul's minimum.
	DeregisterAfter time.Duration

	Logger hclog.Logger // default: no logging
}

func (o RegisterOptions) check() string {
	if o.Check == "" {
		return "tcp"
	}
	return o.Check
}

func (o RegisterOptions) checkInterval() time.Duration {
	if o.CheckInterval == 0 {
		return defaultCheckInterval
	}
	return o.CheckInterval
}

func (o RegisterOptions) deregisterAfter() time.Duration {
	if o.DeregisterAfter == 0 {
		return defaultDeregisterAfter
	}
	return o.DeregisterAfter
}

func (o RegisterOptions) logger() hclog.Logger {
	if o.Logger == nil {
		return hclog.NewNullLogger()
	}
	return o.Logger
}

// validate reports every problem with o at once.
func (o RegisterOptions) validate() error {
	var errs []error
	if o.Service == "" {
		errs = append(errs, ErrNoService)
	}
	if strings.Contains(o.ID, "/") {
		// The ID is a path segment of the agent API, unescaped by the
		// client.
		errs = append(errs, fmt.Errorf("discovery: service id %q must not contain '/'", o.ID))
	}
	if _, _, err := splitAdvertised(o.Address); err != nil {
		errs = append(errs, err)
	}
	switch o.check() {
	case "tcp":
		if o.CheckHTTP != "" {
			errs = append(errs, fmt.Errorf("discovery: check http url %q set, but the check is tcp", o.CheckHTTP))
		}
	case "http":
		if u, err := url.Parse(o.CheckHTTP); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("discovery: check http url %q: want an http:// or https:// url", o.CheckHTTP))
		}
	default:
		errs = append(errs, fmt.Errorf("discovery: check %q: want tcp or http", o.Check))
	}
	if iv := o.checkInterval(); iv < minCheckInterval {
		errs = append(errs, fmt.Errorf("discovery: check interval %v: want at least %v", iv, minCheckInterval))
	}
	if da := o.deregisterAfter(); da < minDeregisterAfter {
		errs = append(errs, fmt.Errorf("discovery: deregister after %v: want at least %v", da, minDeregisterAfter))
	}
	errs = append(errs, validateMeta(o.Meta), o.Consul.validateClient())
	return errors.Join(errs...)
}

// splitAdvertised splits an advertised host:port and checks that clients
// could dial it.
func splitAdvertised(addr string) (host string, port int, err error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("discovery: advertised address %q: %w", addr, err)
	}
	if host == "" {
		return "", 0, fmt.Errorf("discovery: advertised address %q: no host", addr)
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		return "", 0, fmt.Errorf("discovery: advertised address %q: %s is no address to dial; advertise a reachable one", addr, host)
	}
	port, err = strconv.Atoi(p)
	if err != nil || port <= 0 || port > 65535 {
		return "", 0, fmt.Errorf("discovery: advertised address %q: want a port number in 1..65535", addr)
	}
	return host, port, nil
}

func validateMeta(meta map[string]string) error {
	var errs []error
	if len(meta) > metaMaxPairs {
		errs = append(errs, fmt.Errorf("discovery: %d meta pairs: at most %d", len(meta), metaMaxPairs))
	}
	for _, k := range slices.Sorted(maps.Keys(meta)) {
		switch {
		case !metaKeyFormat.MatchString(k) || len(k) > metaKeyMaxLength:
			errs = append(errs, fmt.Errorf("discovery: meta key %q: want up to %d letters, digits, '-' or '_'", k, metaKeyMaxLength))
		case strings.HasPrefix(k, metaKeyReservedPrefix):
			errs = append(errs, fmt.Errorf("discovery: meta key %q: prefix %q is reserved by Consul", k, metaKeyReservedPrefix))
		}
		if len(meta[k]) > metaValueMaxLength {
			errs = append(errs, fmt.Errorf("discovery: meta %q value: longer than %d bytes", k, metaValueMaxLength))
		}
	}
	return errors.Join(errs...)
}

// RegisterStatus is a snapshot of a Registrar's health, for status pages
// and metrics.
type RegisterStatus struct {
	Registered  bool      // the agent had the service at the last call
	LastSuccess time.Time // end of the last call that found or registered it
	LastError   string    // of the last failed call; kept after recovery
	Failures    uint64    // consecutive failures so far (0 when Registered)
}

// Registrar keeps one service instance, this proxy, registered with the
// local Consul agent while it runs.
type Registrar struct {
	opts   RegisterOptions
	id     string
	reg    *api.AgentServiceRegistration
	client *api.Client
	log    hclog.Logger

	running atomic.Bool

	mu     sync.Mutex
	status RegisterStatus
}

// NewRegistrar checks o and builds the Consul client the way NewWatcher
// does. It does not talk to Consul; Run does.
func NewRegistrar(o RegisterOptions) (*Registrar, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if o.ID == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("discovery: default service id: %w", err)
		}
		o.ID = defaultServiceID(o.Service, h, o.Address)
	}
	if o.Consul.Logger == nil {
		o.Consul.Logger = o.Logger
	}
	return newRegistrar(o, o.Consul.apiConfig())
}

// newRegistrar builds a Registrar of valid options with an ID on cfg
// (tests replace its transport).
func newRegistrar(o RegisterOptions, cfg *api.Config) (*Registrar, error) {
	client, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	return &Registrar{
		opts:   o,
		id:     o.ID,
		reg:    o.registration(),
		client: client,
		log:    o.logger().With("service", o.Service, "service_id", o.ID),
	}, nil
}

// defaultServiceID is the ID of a service without one: the hostname and
// port tell the instances of a fleet apart, also two proxies on one host.
func defaultServiceID(service, hostname, addr string) string {
	_, port, _ := splitAdvertised(addr)
	// A hostname has no '/', but the ID must not get one from anywhere.
	hostname = strings.ReplaceAll(hostname, "/", "-")
	return service + "-" + hostname + "-" + strconv.Itoa(port)
}

// registration is what the registrar puts to the agent; o is valid and
// has an ID.
func (o RegisterOptions) registration() *api.AgentServiceRegistration {
	host, port, _ := splitAdvertised(o.Address)
	check := &api.AgentServiceCheck{
		Interval:                       o.checkInterval().String(),
		DeregisterCriticalServiceAfter: o.deregisterAfter().String(),
	}
	switch o.check() {
	case "http":
		check.Name = "http " + o.CheckHTTP
		check.HTTP = o.CheckHTTP
		check.Method = http.MethodGet
	default:
		check.Name = "tcp " + o.Address
		check.TCP = o.Address
	}
	return &api.AgentServiceRegistration{
		ID:      o.ID,
		Name:    o.Service,
		Tags:    slices.Clone(o.Tags),
		Address: host,
		Port:    port,
		Meta:    maps.Clone(o.Meta),
		Check:   check,
	}
}

// ID returns the service ID the registrar registers.
func (r *Registrar) ID() string { return r.id }

// Status returns a snapshot of the registrar's health. It is safe to call
// from any goroutine.
func (r *Registrar) Status() RegisterStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status
}

// Run registers the service and keeps it registered until ctx is done,
// then deregisters it, giving the agent a few seconds at most. Every
// CheckInterval it asks the agent whether it still has the service and
// registers it again if not: an agent forgets services registered
// through its HTTP API when it restarts. A failed call is logged and
// retried after a capped, jittered exponential pause (MinBackoff and
// MaxBackoff of the Consul options, as for the Watcher) that a success
// resets; Run never gives up. It returns nil when ctx is done (also when
// the deregistration failed: the check then goes critical and Consul
// removes the service after DeregisterAfter), ErrRunning if the
// Registrar is already running.
func (r *Registrar) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer r.running.Store(false)

	registered := false // by this Run, and the agent has not said otherwise since
	loop := retryLoop{
		minBackoff: r.opts.Consul.minBackoff(),
		maxBackoff: r.opts.Consul.maxBackoff(),
		failed:     r.callFailed,
		recovered: func(failures uint64) {
			r.log.Info("consul registration succeeded again", "failures", failures)
		},
	}
	loop.run(ctx, func(ctx context.Context) (time.Duration, error) {
		var err error
		registered, err = r.sync(ctx, registered)
		if err != nil || ctx.Err() != nil {
			return 0, err // after cancel, deregister has the last word
		}
		r.recordSuccess(time.Now())
		return r.opts.checkInterval(), nil
	})
	r.deregister(ctx)
	return nil
}

// sync makes sure the agent has the service and reports whether it does.
// registered says that this Run registered it before: the agent is then
// asked first, since an agent that is merely unreachable has not
// necessarily lost it. The first registration of a Run always replaces
// whatever an earlier run of the proxy left under the same ID.
func (r *Registrar) sync(ctx context.Context, registered bool) (bool, error) {
	if registered {
		found, err := r.present(ctx)
		if err != nil || found {
			return true, err
		}
		r.log.Warn("consul lost the service registration; registering again")
	}
	if err := r.register(ctx); err != nil {
		return false, err
	}
	r.log.Info("service registered", "addr", r.opts.Address, "check", r.opts.check())
	return true, nil
}

func (r *Registrar) register(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, agentCallTimeout)
	defer cancel()
	// Replacing the checks keeps a re-registration idempotent, also when
	// an earlier run registered another check under this ID.
	opts := api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx)
	if err := r.client.Agent().ServiceRegisterOpts(r.reg, opts); err != nil {
		return fmt.Errorf("register service %q: %w", r.id, err)
	}
	return nil
}

// present asks the agent whether it has the service.
func (r *Registrar) present(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, agentCallTimeout)
	defer cancel()
	_, _, err := r.client.Agent().Service(r.id, (&api.QueryOptions{}).WithContext(ctx))
	switch {
	case err == nil:
		return true, nil
	case notFound(err):
		return false, nil
	}
	return false, fmt.Errorf("read service %q: %w", r.id, err)
}

// deregister removes the service at the end of Run; ctx is Run's, done.
func (r *Registrar) deregister(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), deregisterTimeout)
	defer cancel()
	err := r.client.Agent().ServiceDeregisterOpts(r.id, (&api.QueryOptions{}).WithContext(ctx))
	if notFound(err) {
		err = nil // gone already: a restarted agent, or an operator
	}
	r.mu.Lock()
	r.status.Registered = false
	if err != nil {
		r.status.LastError = err.Error()
	}
	r.mu.Unlock()
	if err != nil {
		r.log.Warn("consul deregistration failed; consul removes the service once its check has been critical for deregister_after",
			"error", err, "deregister_after", r.opts.deregisterAfter())
		return
	}
	r.log.Info("service deregistered")
}

// notFound reports whether err is the agent's 404: unknown service ID.
func notFound(err error) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}

// callFailed records and logs the failures-th failed call in a row.
func (r *Registrar) callFailed(err error, failures uint64, retryIn time.Duration) {
	r.mu.Lock()
	r.status.Registered = false
	r.status.LastError = err.Error()
	r.status.Failures = failures
	r.mu.Unlock()
	// The error names the agent's address and the service ID, never the
	// token, which travels in a header.
	r.log.Warn("consul registration failed", "error", err, "failures", failures, "retry_in", retryIn)
}

func (r *Registrar) recordSuccess(now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status.Registered = true
	r.status.LastSuccess = now
	r.status.Failures = 0
}
