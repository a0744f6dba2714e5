package session

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the measurements a Server takes as it goes, beyond the
// counters of Stats: latencies, and backend logins by backend. The
// daemon registers them; a nil *Metrics records nothing. No label holds a
// user name: the only labels are backend IDs (from the operator's set)
// and fixed words.
type Metrics struct {
	// Dial is the time to connect to a backend and read its greeting
	// (TLS included), by backend and result (ok, error).
	Dial *prometheus.HistogramVec
	// Login is the time from a client's login command to its answer, by
	// how it was served: reused (a cached connection), fresh (a backend
	// login), refused (the backend said no), failed (no backend).
	Login *prometheus.HistogramVec
	// BackendLogins counts logins sent to a backend, by backend and
	// result: ok, refused (wrong password and the like), unavailable
	// (the backend's NO [UNAVAILABLE]), error (the connection failed).
	BackendLogins *prometheus.CounterVec
}

// NewMetrics returns Metrics with the names the documentation gives,
// under the imapproxy namespace, unregistered.
func NewMetrics() *Metrics {
	buckets := []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	return &Metrics{
		Dial: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "imapproxy", Name: "backend_dial_seconds",
			Help:    "Time to connect to a backend and read its greeting, TLS included.",
			Buckets: buckets,
		}, []string{"backend", "result"}),
		Login: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "imapproxy", Name: "client_login_seconds",
			Help:    "Time from a client's login command to its answer, by how it was served (reused, fresh, refused, failed).",
			Buckets: buckets,
		}, []string{"served"}),
		BackendLogins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "imapproxy", Name: "backend_logins_total",
			Help: "Logins the proxy sent to a backend, by result (ok, refused, unavailable, error).",
		}, []string{"backend", "result"}),
	}
}

// Collectors lists the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Dial, m.Login, m.BackendLogins}
}

// Forget drops the series of a backend that left the set, so that a
// cluster whose instance IDs change does not grow them for ever.
func (m *Metrics) Forget(backend string) {
	if m == nil {
		return
	}
	l := prometheus.Labels{"backend": backend}
	m.Dial.DeletePartialMatch(l)
	m.BackendLogins.DeletePartialMatch(l)
}

func (m *Metrics) dial(backend string, since time.Time, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.Dial.WithLabelValues(backend, result).Observe(time.Since(since).Seconds())
}

func (m *Metrics) login(served string, since time.Time) {
	if m == nil {
		return
	}
	m.Login.WithLabelValues(served).Observe(time.Since(since).Seconds())
}

func (m *Metrics) backendLogin(backend, result string) {
	if m == nil {
		return
	}
	m.BackendLogins.WithLabelValues(backend, result).Inc()
}
