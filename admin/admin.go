// Package admin is imapproxy's admin HTTP listener: Prometheus metrics,
// /healthz, /readyz, profiles and, under /api/v1/, the JSON admin API that
// the operator and the status and map subcommands use. It reads the
// daemon's state through the proxy server it is given and knows nothing of
// the configuration file: cmd/imapproxy turns that into Options.
package admin

import (
	"crypto/sha256"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/imapproxy/imapproxy/proxy"
)

// Options are what the daemon hands the admin listener besides the proxy
// server. The zero value serves an API without a token or tracing, and
// empty metrics.
type Options struct {
	// Token, when not empty, is required as a bearer token on every
	// /api/ request. New keeps only its hash; the caller may clear it.
	Token []byte
	// TraceDir is where per-user traces are written; "" disables them.
	TraceDir string
	// Source reports the backend source's state; nil reports nothing.
	Source func() SourceStatus
	// Listening is false while the proxy's listeners are not open, so
	// that /readyz keeps a load balancer away; nil counts as open.
	Listening func() bool
	// Metrics is what /metrics serves; nil serves an empty registry.
	Metrics prometheus.Gatherer
	Logger  hclog.Logger
}

// SourceStatus is what the admin view and metrics show of the backend
// source.
type SourceStatus struct {
	Kind        string // "static" or "consul"
	Healthy     bool
	LastSuccess time.Time
	Backends    int
}

func (o Options) source() SourceStatus {
	if o.Source == nil {
		return SourceStatus{}
	}
	return o.Source()
}

func (o Options) listening() bool { return o.Listening == nil || o.Listening() }

func (o Options) metrics() prometheus.Gatherer {
	if o.Metrics == nil {
		return prometheus.NewRegistry()
	}
	return o.Metrics
}

func (o Options) logger() hclog.Logger {
	if o.Logger == nil {
		return hclog.NewNullLogger()
	}
	return o.Logger
}

// Handler serves the admin listener's paths. Only /api/ needs the token:
// monitoring scrapes and probes must work without one.
type Handler struct {
	srv   *proxy.Server
	opts  Options
	log   hclog.Logger
	start time.Time
	// tokenSum is the SHA-256 of the token, so that the compare takes
	// the same time whatever the length of what a client sends; nil
	// when no token is required.
	tokenSum *[sha256.Size]byte
	mux      *http.ServeMux
}

// New returns the admin handler for srv. A changed token needs a new
// Handler, which the daemon makes only at a restart.
func New(srv *proxy.Server, opts Options) *Handler {
	h := &Handler{srv: srv, opts: opts, log: opts.logger(), start: time.Now()}
	if len(opts.Token) > 0 {
		sum := sha256.Sum256(opts.Token)
		h.tokenSum = &sum
	}
	mux := http.NewServeMux()
	mux.Handle("/api/", h.api())
	mux.Handle("/metrics", promhttp.HandlerFor(opts.metrics(), promhttp.HandlerOpts{}))
	// Profiles, for the operator on the admin network (never user data).
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		switch {
		case !opts.listening():
			http.Error(w, "listeners not open", http.StatusServiceUnavailable)
		case len(srv.Backends()) == 0:
			http.Error(w, "no backends", http.StatusServiceUnavailable)
		default:
			w.Write([]byte("ready\n"))
		}
	})
	h.mux = mux
	return h
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) { h.mux.ServeHTTP(w, r) }

// The admin server's timeouts. Its requests are small and its answers
// quick, except CPU profiles and execution traces, which stream for their
// "seconds" (30 by default): the write timeout leaves room for those of up
// to two minutes (pprof refuses longer ones with a clear error). Traces of
// users go to files, not to a response. The idle timeout frees the
// connections monitoring leaves open between scrapes.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = 2*time.Minute + 10*time.Second
	idleTimeout       = 2 * time.Minute
)

// NewServer is the admin listener's HTTP server: no connection stays
// open, idle or half-sent, longer than a timeout.
func NewServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
	}
}
