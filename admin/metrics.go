package admin

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
)

// RegisterMetrics exposes the proxy's, the pool's and the backend source's
// state on reg. Everything is read at scrape time from counters the
// packages keep anyway; no metric has a user label. status may be nil.
func RegisterMetrics(reg prometheus.Registerer, srv *proxy.Server, status func() SourceStatus) {
	if status == nil {
		status = func() SourceStatus { return SourceStatus{} }
	}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r := metricReg{reg}
	registerSessionMetrics(r, srv.Stats)
	registerBackendMetrics(r, srv)
	registerPoolMetrics(r, srv.Pool().Stats)
	registerDiscoveryMetrics(r, srv, status)
}

// metricReg registers metrics read at scrape time, under the imapproxy
// namespace.
type metricReg struct{ prometheus.Registerer }

func (r metricReg) counter(name, help string, f func() uint64) {
	r.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "imapproxy", Name: name, Help: help},
		func() float64 { return float64(f()) }))
}

func (r metricReg) gauge(name, help string, f func() float64) {
	r.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "imapproxy", Name: name, Help: help}, f))
}

// registerSessionMetrics exposes the client side: sessions, logins, bytes.
func registerSessionMetrics(r metricReg, st func() proxy.Stats) {
	r.gauge("sessions", "Client connections open.", func() float64 { return float64(st().Sessions) })
	r.counter("client_logins_fresh_total", "Client logins served by a new backend connection.", func() uint64 { return st().LoginsFresh })
	r.counter("client_logins_reused_total", "Client logins served by a cached backend connection.", func() uint64 { return st().LoginsReused })
	r.counter("client_logins_refused_total", "Client logins refused by the backend (wrong password and the like).", func() uint64 { return st().LoginsRefused })
	r.counter("client_logins_failed_total", "Client logins no backend could take.", func() uint64 { return st().LoginsFailed })
	r.counter("failovers_total", "Logins served by a backend other than the user's first.", func() uint64 { return st().Failovers })
	r.counter("backends_marked_down_total", "Times this proxy marked a backend down after a failed dial or login.", func() uint64 { return st().BackendsDown })
	r.counter("connections_rejected_total", "Client connections refused by max_clients, max_clients_per_ip or max_preauth.", func() uint64 { return st().Rejected })
	r.counter("logins_user_limited_total", "Logins refused by max_sessions_per_user.", func() uint64 { return st().UserLimited })
	r.counter("sessions_drained_total", "Sessions ended because their backend left the set.", func() uint64 { return st().BackendsDrained })

	relayed := prometheus.NewDesc("imapproxy_relayed_bytes_total", "Bytes relayed after login, by direction (to_client, to_server).", []string{"direction"}, nil)
	r.MustRegister(collectorFunc{descs: []*prometheus.Desc{relayed}, collect: func(ch chan<- prometheus.Metric) {
		s := st()
		ch <- prometheus.MustNewConstMetric(relayed, prometheus.CounterValue, float64(s.BytesToClient), "to_client")
		ch <- prometheus.MustNewConstMetric(relayed, prometheus.CounterValue, float64(s.BytesToServer), "to_server")
	}})
	// up-imapproxy's pimpstat headline: how many client logins one
	// backend login served.
	r.gauge("reuse_ratio", "Client logins served per backend login since start (1 without reuse; 0 before the first backend login).", func() float64 {
		return reuseRatio(st())
	})
}

func registerBackendMetrics(r metricReg, srv *proxy.Server) {
	// Per backend, from the proxy's own view at scrape time. The label
	// is the backend ID from the operator's set, never a user.
	perBackend := prometheus.NewDesc("imapproxy_backend_connections", "Backend connections by backend and state (cached, active).", []string{"backend", "state"}, nil)
	backendUp := prometheus.NewDesc("imapproxy_backend_in_service", "1 if the backend takes new logins (in the set, not drained by an operator, not marked down by this proxy).", []string{"backend"}, nil)
	// One BackendStatus per scrape: it walks every session and table.
	r.MustRegister(collectorFunc{descs: []*prometheus.Desc{perBackend, backendUp}, collect: func(ch chan<- prometheus.Metric) {
		for _, b := range srv.BackendStatus() {
			ch <- prometheus.MustNewConstMetric(perBackend, prometheus.GaugeValue, float64(b.Cached), b.ID, "cached")
			ch <- prometheus.MustNewConstMetric(perBackend, prometheus.GaugeValue, float64(b.Active), b.ID, "active")
			v := 1.0
			if b.Down || b.Drained || b.Held {
				v = 0
			}
			ch <- prometheus.MustNewConstMetric(backendUp, prometheus.GaugeValue, v, b.ID)
		}
	}})
}

func registerPoolMetrics(r metricReg, ps func() pool.Stats) {
	r.gauge("upstream_connections", "Backend connections open, active and cached.", func() float64 { return float64(ps().Open) })
	r.gauge("cached_connections", "Backend connections cached for reuse.", func() float64 { return float64(ps().Cached) })
	r.gauge("cache_closing", "Backend connections being logged out in the background (counted in upstream_connections until closed).", func() float64 { return float64(ps().Closing) })
	r.counter("cache_close_aborted_total", "Background closes cut short without LOGOUT: the backend did not answer in time, or shutdown's deadline came.", func() uint64 { return ps().CloseAborted })
	r.counter("cache_hits_total", "Cached connections handed to a login.", func() uint64 { return ps().Hits })
	r.counter("cache_misses_total", "Logins that found no reusable cached connection.", func() uint64 { return ps().Misses })
	closed := prometheus.NewDesc("imapproxy_cache_closed_total", "Cached connections closed, by cause.", []string{"cause"}, nil)
	r.MustRegister(collectorFunc{descs: []*prometheus.Desc{closed}, collect: func(ch chan<- prometheus.Metric) {
		for cause, n := range closedByCause(ps()) {
			ch <- prometheus.MustNewConstMetric(closed, prometheus.CounterValue, float64(n), cause)
		}
	}})
}

func registerDiscoveryMetrics(r metricReg, srv *proxy.Server, status func() SourceStatus) {
	r.gauge("discovery_up", "1 if the last backend discovery query succeeded.", func() float64 {
		if status().Healthy {
			return 1
		}
		return 0
	})
	r.gauge("discovery_last_success_age_seconds", "Seconds since backend discovery last succeeded.", func() float64 {
		return time.Since(status().LastSuccess).Seconds()
	})
	r.gauge("backends", "Backends in the current set.", func() float64 { return float64(len(srv.Backends())) })
}

type collectorFunc struct {
	descs   []*prometheus.Desc
	collect func(chan<- prometheus.Metric)
}

func (c collectorFunc) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}
func (c collectorFunc) Collect(ch chan<- prometheus.Metric) { c.collect(ch) }

// closedByCause names the pool's close counters as the metrics and the
// admin API both show them.
func closedByCause(s pool.Stats) map[string]uint64 {
	return map[string]uint64{
		"expired": s.ClosedExpired, "max_age": s.ClosedMaxAge, "dead": s.ClosedDead,
		"user_limit": s.ClosedUserLimit, "full": s.ClosedFull, "backend_gone": s.ClosedBackendGone,
		"admin": s.ClosedAdmin,
	}
}

// reuseRatio is up-imapproxy's headline figure: client logins per backend
// login, 0 before the first backend login.
func reuseRatio(s proxy.Stats) float64 {
	if s.LoginsFresh == 0 {
		return 0
	}
	return float64(s.LoginsFresh+s.LoginsReused) / float64(s.LoginsFresh)
}
