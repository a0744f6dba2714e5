package discovery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
)

const (
	defaultWaitTime   = 5 * time.Minute
	defaultMinBackoff = time.Second
	defaultMaxBackoff = 60 * time.Second

	// minQueryInterval is the least time from the start of one successful
	// query to the start of the next, plus up to queryJitter: an agent
	// that answers at once, again and again (an index that does not move,
	// a flapping check), costs at most ten queries a second. consul-template
	// limits its watches the same way.
	minQueryInterval = 100 * time.Millisecond
	queryJitter      = 20 * time.Millisecond

	// queryGrace is added to a blocking query's own bound (WaitTime plus
	// the agent's jitter of up to WaitTime/16) before the watcher gives up
	// on an answer: a silently dead connection must not stall it forever.
	queryGrace = 15 * time.Second
)

// Service meta keys read from each instance.
const (
	metaWeight = "imap_weight" // positive integer
	metaTLS    = "imap_tls"    // none | starttls | implicit
)

var (
	// ErrNoService is returned by NewWatcher without ConsulOptions.Service.
	ErrNoService = errors.New("discovery: consul service name required")
	// ErrRunning is returned by Run while another Run of the same Watcher
	// or Registrar is under way.
	ErrRunning = errors.New("discovery: already running")
)

// ConsulOptions configures a Watcher. Only Service is required: every
// other zero value means the Consul client's default (which honours the
// CONSUL_HTTP_* environment variables) or the default written next to it.
type ConsulOptions struct {
	Address    string // host:port or URL (http://, https://, unix://); "" = api.DefaultConfig (CONSUL_HTTP_ADDR)
	Scheme     string // "http" or "https"; "" = the client default
	Token      string // ACL token; "" = CONSUL_HTTP_TOKEN via api.DefaultConfig
	TokenFile  string // read once by NewWatcher; takes precedence over Token
	Datacenter string // "" = the agent's
	Namespace  string // Enterprise; passed through QueryOptions
	Partition  string // Enterprise; passed through QueryOptions

	// TLS to Consul.
	CAFile, CertFile, KeyFile string
	InsecureSkipVerify        bool

	Service string // required: the Consul service name of the IMAP backends
	Tag     string // optional: only instances with this tag

	WaitTime   time.Duration // blocking query wait; default 5m (Consul caps it at 10m)
	MinBackoff time.Duration // first pause after a failed query; default 1s
	MaxBackoff time.Duration // cap of the doubling pauses; default 60s

	// DefaultTLS is Backend.TLS for an instance without a valid imap_tls
	// meta value: "" (leave it to the proxy), "none", "starttls" or
	// "implicit".
	DefaultTLS backend.TLSMode

	Logger hclog.Logger // default: no logging
}

func (o ConsulOptions) waitTime() time.Duration {
	if o.WaitTime <= 0 {
		return defaultWaitTime
	}
	return o.WaitTime
}

func (o ConsulOptions) minBackoff() time.Duration {
	if o.MinBackoff <= 0 {
		return defaultMinBackoff
	}
	return o.MinBackoff
}

func (o ConsulOptions) maxBackoff() time.Duration {
	if o.MaxBackoff <= 0 {
		return defaultMaxBackoff
	}
	return o.MaxBackoff
}

func (o ConsulOptions) logger() hclog.Logger {
	if o.Logger == nil {
		return hclog.NewNullLogger()
	}
	return o.Logger
}

// validate reports every problem with o at once.
func (o ConsulOptions) validate() error {
	var errs []error
	if o.Service == "" {
		errs = append(errs, ErrNoService)
	}
	if _, err := backend.ParseTLSMode(string(o.DefaultTLS)); err != nil {
		errs = append(errs, fmt.Errorf("discovery: default tls: %w", err))
	}
	errs = append(errs, o.validateClient())
	return errors.Join(errs...)
}

// validateClient reports the problems with the options that a Registrar
// uses too: how to reach the agent and how to back off.
func (o ConsulOptions) validateClient() error {
	var errs []error
	switch o.Scheme {
	case "", "http", "https":
	default:
		errs = append(errs, fmt.Errorf("discovery: consul scheme %q: want http or https", o.Scheme))
	}
	if o.WaitTime < 0 || o.MinBackoff < 0 || o.MaxBackoff < 0 {
		errs = append(errs, errors.New("discovery: negative wait time or backoff"))
	} else if o.minBackoff() > o.maxBackoff() {
		errs = append(errs, fmt.Errorf("discovery: min backoff %v exceeds max backoff %v", o.minBackoff(), o.maxBackoff()))
	}
	return errors.Join(errs...)
}

// apiConfig is api.DefaultConfig (environment included) with the options
// that are set laid over it.
func (o ConsulOptions) apiConfig() *api.Config {
	cfg := api.DefaultConfigWithLogger(o.logger())
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&cfg.Address, o.Address)
	set(&cfg.Scheme, o.Scheme)
	set(&cfg.Token, o.Token)
	set(&cfg.TokenFile, o.TokenFile)
	set(&cfg.Datacenter, o.Datacenter)
	set(&cfg.Namespace, o.Namespace)
	set(&cfg.Partition, o.Partition)
	set(&cfg.TLSConfig.CAFile, o.CAFile)
	set(&cfg.TLSConfig.CertFile, o.CertFile)
	set(&cfg.TLSConfig.KeyFile, o.KeyFile)
	if o.InsecureSkipVerify {
		cfg.TLSConfig.InsecureSkipVerify = true
	}
	return cfg
}

// Status is a snapshot of a Watcher's health, for status pages and
// metrics.
type Status struct {
	Healthy     bool      // the last query succeeded
	LastSuccess time.Time // end of the last successful query
	LastChange  time.Time // of the last update() call
	LastError   string    // of the last failed query; kept after recovery
	Backends    int       // size of the last set delivered
	Failures    uint64    // consecutive failures so far (0 when Healthy)
}

// Watcher follows the healthy (passing) instances of one Consul service
// with blocking queries and hands each new backend set to an update
// callback. A failing Consul never empties the set: the last one delivered
// stays in force until Consul answers again.
type Watcher struct {
	opts   ConsulOptions
	client *api.Client
	log    hclog.Logger

	minInterval time.Duration // minQueryInterval; tests shorten it
	// afterQuery, when set (by tests), is called with the status after
	// each query's outcome has been handled, update() included.
	afterQuery func(Status)

	running atomic.Bool

	mu     sync.Mutex
	status Status
}

// NewWatcher checks opts and builds the Consul client. It does not talk to
// Consul; Run does.
func NewWatcher(opts ConsulOptions) (*Watcher, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	return newWatcher(opts, opts.apiConfig())
}

// newWatcher builds a Watcher on cfg (tests replace its transport).
func newWatcher(opts ConsulOptions, cfg *api.Config) (*Watcher, error) {
	client, err := newClient(cfg)
	if err != nil {
		return nil, err
	}
	return &Watcher{
		opts:        opts,
		client:      client,
		log:         opts.logger().With("service", opts.Service),
		minInterval: minQueryInterval,
	}, nil
}

// newClient builds a Consul client on cfg, normally from apiConfig. It
// reads TokenFile, if set, once.
func newClient(cfg *api.Config) (*api.Client, error) {
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery: consul client: %w", err)
	}
	return client, nil
}

// Status returns a snapshot of the watcher's health. It is safe to call
// from any goroutine.
func (w *Watcher) Status() Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.status
}

// Run queries Consul until ctx is done and calls update, from Run's
// goroutine, with the normalized set of passing instances: always after
// the first successful query (an empty set included: no healthy instance
// is an answer too), then only when the set changes. A failed query never
// calls update; Run retries after a capped, jittered exponential pause
// that a success resets, with a query that does not block (index 0).
// Run returns nil when ctx is done, ErrRunning if the Watcher is already
// running. update must not block for long: the next query waits for it.
func (w *Watcher) Run(ctx context.Context, update func([]backend.Backend)) error {
	if !w.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer w.running.Store(false)

	var (
		index uint64            // WaitIndex of the next query
		last  []backend.Backend // last set delivered; nil before the first
	)
	loop := retryLoop{
		minBackoff: w.opts.minBackoff(),
		maxBackoff: w.opts.maxBackoff(),
		failed:     w.queryFailed,
		recovered: func(failures uint64) {
			w.log.Info("consul query succeeded again", "failures", failures)
		},
	}
	loop.run(ctx, func(ctx context.Context) (time.Duration, error) {
		start := time.Now()
		entries, meta, err := w.query(ctx, index)
		if err != nil {
			// The next query does not block: after losing contact the
			// watcher cannot tell whether its index still belongs to the
			// same Consul state. A restarted agent or a restored snapshot
			// starts lower, and a query at the old index would hang until
			// the new index passed it or WaitTime ran out.
			index = 0
			return 0, err
		}
		if ctx.Err() != nil {
			return 0, ctx.Err() // an answer after cancel is not delivered
		}
		prev := index
		index = nextIndex(prev, meta.LastIndex)
		if index == 0 && prev != 0 {
			w.log.Debug("consul index went backwards; resetting", "index", meta.LastIndex, "previous", prev)
		}
		set, problems := backendsFromEntries(entries, w.opts.DefaultTLS)
		changed := last == nil || !backend.Equal(last, set)
		w.recordSuccess(time.Now(), changed, len(set))
		if changed {
			// Problems are logged with the set they shaped, not on every
			// answer that repeats them.
			for _, p := range problems {
				w.log.Warn(p.msg, p.args...)
			}
			w.log.Info("backend set changed", "backends", len(set), "index", meta.LastIndex)
			last = set
			update(slices.Clone(set))
		}
		w.observe()
		if wait := w.minInterval - time.Since(start); wait > 0 {
			return wait + rand.N(queryJitter), nil
		}
		return 0, nil
	})
	w.log.Debug("consul watcher stopped")
	return nil
}

// query is one blocking health query for the passing instances.
func (w *Watcher) query(ctx context.Context, index uint64) ([]*api.ServiceEntry, *api.QueryMeta, error) {
	wait := w.opts.waitTime()
	ctx, cancel := context.WithTimeout(ctx, wait+wait/16+queryGrace)
	defer cancel()
	q := &api.QueryOptions{
		WaitIndex:  index,
		WaitTime:   wait,
		Datacenter: w.opts.Datacenter,
		Namespace:  w.opts.Namespace,
		Partition:  w.opts.Partition,
	}
	entries, meta, err := w.client.Health().Service(w.opts.Service, w.opts.Tag, true, q.WithContext(ctx))
	if err != nil {
		return nil, nil, fmt.Errorf("consul health query for %q: %w", w.opts.Service, err)
	}
	return entries, meta, nil
}

// queryFailed records and logs the failures-th failed query in a row:
// a warning for the first of a streak, so that an agent that stays away
// does not flood the log.
func (w *Watcher) queryFailed(err error, failures uint64, retryIn time.Duration) {
	w.mu.Lock()
	w.status.Healthy = false
	w.status.LastError = err.Error()
	w.status.Failures = failures
	w.mu.Unlock()
	if failures == 1 {
		w.log.Warn("consul query failed", "error", err, "retry_in", retryIn)
	} else {
		w.log.Debug("consul query failed again", "error", err, "failures", failures, "retry_in", retryIn)
	}
	w.observe()
}

func (w *Watcher) recordSuccess(now time.Time, changed bool, n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.status.Healthy = true
	w.status.LastSuccess = now
	w.status.Failures = 0
	if changed {
		w.status.LastChange = now
		w.status.Backends = n
	}
}

func (w *Watcher) observe() {
	if w.afterQuery != nil {
		w.afterQuery(w.Status())
	}
}

// nextIndex is the WaitIndex for the query after one sent with prev and
// answered with X-Consul-Index got, as Consul's blocking query docs ask:
// an index that went backwards (a restored snapshot, a rebuilt or
// restarted agent) resets to 0, so the next query answers at once with
// the current state; an index of 0 otherwise becomes 1, since waiting on
// 0 does not block and would answer at once forever.
func nextIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	}
	return got
}

// problem is something in Consul's answer the watcher ignored, as an
// hclog message and its key/value pairs.
type problem struct {
	msg  string
	args []any
}

// backendsFromEntries converts a health answer into a normalized set.
func backendsFromEntries(entries []*api.ServiceEntry, defaultTLS backend.TLSMode) ([]backend.Backend, []problem) {
	var (
		bs       = make([]backend.Backend, 0, len(entries))
		problems []problem
		seen     = make(map[string]string, len(entries)) // ID -> Addr
	)
	for _, e := range entries {
		b, ps, ok := backendFromEntry(e, defaultTLS)
		problems = append(problems, ps...)
		if !ok {
			continue
		}
		// Service IDs are unique per agent, not per cluster: two nodes
		// registering the same ID are one backend here, the first wins.
		if kept, dup := seen[b.ID]; dup {
			problems = append(problems, problem{"ignoring service instance with a duplicate id",
				[]any{"service_id", b.ID, "addr", b.Addr, "kept_addr", kept}})
			continue
		}
		seen[b.ID] = b.Addr
		bs = append(bs, b)
	}
	return backend.Normalize(bs), problems
}

// backendFromEntry converts one instance. ok is false when the instance
// cannot be a backend (no ID, address or port).
func backendFromEntry(e *api.ServiceEntry, defaultTLS backend.TLSMode) (b backend.Backend, problems []problem, ok bool) {
	if e == nil || e.Service == nil {
		return backend.Backend{}, nil, false
	}
	s := e.Service
	host := s.Address
	if host == "" && e.Node != nil {
		host = e.Node.Address
	}
	switch {
	case s.ID == "":
		return backend.Backend{}, []problem{{"ignoring service instance without id", []any{"addr", host}}}, false
	case host == "":
		return backend.Backend{}, []problem{{"ignoring service instance without address", []any{"service_id", s.ID}}}, false
	case s.Port <= 0 || s.Port > 65535:
		return backend.Backend{}, []problem{{"ignoring service instance without valid port", []any{"service_id", s.ID, "port", s.Port}}}, false
	}
	b = backend.Backend{
		ID:     s.ID,
		Addr:   net.JoinHostPort(host, strconv.Itoa(s.Port)),
		Weight: 1,
		TLS:    defaultTLS,
	}

	weightSet := false
	if v, present := s.Meta[metaWeight]; present {
		if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n > 0 {
			b.Weight, weightSet = n, true
		} else {
			problems = append(problems, problem{"ignoring invalid service meta",
				[]any{"service_id", s.ID, "key", metaWeight, "value", v}})
		}
	}
	if !weightSet && s.Weights.Passing > 0 {
		b.Weight = s.Weights.Passing
	}

	if v := strings.ToLower(strings.TrimSpace(s.Meta[metaTLS])); v != "" {
		if m, err := backend.ParseTLSMode(v); err == nil {
			b.TLS = m
		} else {
			problems = append(problems, problem{"ignoring invalid service meta",
				[]any{"service_id", s.ID, "key", metaTLS, "value", s.Meta[metaTLS], "using", defaultTLS}})
		}
	}
	return b, problems, true
}
