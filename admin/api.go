package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/proxy"
	"github.com/imapproxy/imapproxy/session"
)

// The admin API: JSON under /api/v1/ on the admin listener, for the
// operator and for the status and map subcommands (cmd/imapproxy/cli.go),
// which decode the exported types below. Reads are GET; changes are POST
// or DELETE, so that no link or prefetch can change anything, and
// cross-origin browser requests that would are refused. With admin.token_file set, every /api/
// request needs the token as a bearer token.

// Status is GET /api/v1/status.
type Status struct {
	UptimeSeconds float64 `json:"uptime_seconds"`
	Sessions      int     `json:"sessions"` // client connections open
	Logins        Logins  `json:"logins"`
	// ReuseRatio is client logins per backend login: how many logins the
	// cache turned into one. 0 before the first backend login.
	ReuseRatio          float64   `json:"reuse_ratio"`
	ConnectionsRejected uint64    `json:"connections_rejected"`
	BackendsMarkedDown  uint64    `json:"backends_marked_down"`
	SessionsDrained     uint64    `json:"sessions_drained"`
	Cache               Cache     `json:"cache"`
	Discovery           Discovery `json:"discovery"`
	Backends            []Backend `json:"backends"`
}

// Logins are cumulative counts since the start.
type Logins struct {
	Client      uint64 `json:"client"`  // logged in through the proxy: backend + reused
	Backend     uint64 `json:"backend"` // served by a new backend login
	Reused      uint64 `json:"reused"`  // served by a cached connection
	Refused     uint64 `json:"refused"` // refused by the backend (wrong password and the like)
	Failed      uint64 `json:"failed"`  // no backend could take them
	Failovers   uint64 `json:"failovers"`
	UserLimited uint64 `json:"user_limited"`
}

// Cache is the pool of backend connections, in Status.
type Cache struct {
	Open     int               `json:"open"` // backend connections, active and cached
	Cached   int               `json:"cached"`
	Hits     uint64            `json:"hits"`
	Misses   uint64            `json:"misses"`
	HitRatio float64           `json:"hit_ratio"` // hits / (hits + misses); 0 before the first login
	Closed   map[string]uint64 `json:"closed"`    // cached connections closed, by cause
}

// Discovery is the backend source, in Status.
type Discovery struct {
	Kind                  string    `json:"kind"` // static or consul
	Healthy               bool      `json:"healthy"`
	LastSuccess           time.Time `json:"last_success"`
	LastSuccessAgeSeconds float64   `json:"last_success_age_seconds"`
	Backends              int       `json:"backends"`
}

// Backend is one backend of the set as this proxy sees it, in Status and
// GET /api/v1/backends.
type Backend struct {
	ID        string          `json:"id"`
	Address   string          `json:"address"`
	Weight    int             `json:"weight"`
	TLS       backend.TLSMode `json:"tls"`
	State     string          `json:"state"` // up, down or drained
	Down      bool            `json:"down"`
	DownUntil *time.Time      `json:"down_until,omitempty"`
	Drained   bool            `json:"drained"`
	Held      bool            `json:"held"` // healthy in discovery, held back by cluster.rejoin_hold
	Active    int             `json:"active"`
	Cached    int             `json:"cached"`
}

// User is GET /api/v1/users/{user}.
type User struct {
	User     string    `json:"user"`
	HashKey  string    `json:"hash_key"`
	Backend  string    `json:"backend"` // where a login goes now; "" if none is in service
	Order    []Choice  `json:"order"`
	Active   int       `json:"active"`
	Sessions []Session `json:"sessions"`
	Cached   []Cached  `json:"cached"`
}

// Choice is one backend of a user's failover order, first first.
type Choice struct {
	ID    string `json:"id"`
	State string `json:"state"`
}

// Session is a client session logged in through the proxy.
type Session struct {
	ID      string    `json:"id"`
	User    string    `json:"user"`
	AuthzID string    `json:"authzid,omitempty"`
	Backend string    `json:"backend"`
	Client  string    `json:"client"`
	Since   time.Time `json:"since"`
}

// Cached is an idle backend connection kept for a user.
type Cached struct {
	Backend     string  `json:"backend"`
	AgeSeconds  float64 `json:"age_seconds"`
	IdleSeconds float64 `json:"idle_seconds"`
}

// Drain, Kick and Flush answer the POST and DELETE endpoints.

// Drain answers a drain or undrain of a backend.
type Drain struct {
	Backend string `json:"backend"`
	Drained bool   `json:"drained"`
}

// Kick answers a kick of a user: what it closed.
type Kick struct {
	User     string `json:"user"`
	Sessions int    `json:"sessions"`
	Cached   int    `json:"cached"`
}

// Flush answers a cache flush: how many cached connections it closed.
type Flush struct {
	Closed int `json:"closed"`
}

// ErrorBody is every non-200 answer of the API.
type ErrorBody struct {
	Error string `json:"error"`
}

// api serves /api/.
func (h *Handler) api() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/status", h.getStatus)
	mux.HandleFunc("GET /api/v1/backends", h.getBackends)
	mux.HandleFunc("GET /api/v1/users/{user}", h.getUser)
	mux.HandleFunc("POST /api/v1/backends/{id}/drain", h.drain)
	mux.HandleFunc("DELETE /api/v1/backends/{id}/drain", h.undrain)
	mux.HandleFunc("POST /api/v1/users/{user}/kick", h.kick)
	mux.HandleFunc("POST /api/v1/cache/flush", h.flush)
	mux.HandleFunc("GET /api/v1/traces", h.getTraces)
	mux.HandleFunc("POST /api/v1/users/{user}/trace", h.startTrace)
	mux.HandleFunc("DELETE /api/v1/users/{user}/trace", h.stopTrace)
	// ServeMux answers a wrong method with a text 405 of its own; these
	// less specific patterns catch it first and answer in JSON.
	for path, allow := range map[string]string{
		"/api/v1/status":              "GET, HEAD",
		"/api/v1/backends":            "GET, HEAD",
		"/api/v1/users/{user}":        "GET, HEAD",
		"/api/v1/backends/{id}/drain": "POST, DELETE",
		"/api/v1/users/{user}/kick":   "POST",
		"/api/v1/cache/flush":         "POST",
		"/api/v1/traces":              "GET, HEAD",
		"/api/v1/users/{user}/trace":  "POST, DELETE",
	} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, r.Method+" not allowed; use "+allow)
		})
	}
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such endpoint")
	})
	// A page in the operator's browser must not be able to make it POST
	// here: no token stops that when none is configured.
	csrf := http.NewCrossOriginProtection()
	csrf.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusForbidden, "cross-origin request refused")
	}))
	return h.authorize(csrf.Handler(mux))
}

// hostAllowed guards a token-less API against DNS rebinding: a page whose
// name an attacker re-points at 127.0.0.1 is same-origin to the browser,
// but it still sends its own name as Host. An IP address or localhost is
// what an operator's curl or `imapproxy status` sends. With a token the
// check is not needed (the browser has no token) and a name may be used.
func hostAllowed(r *http.Request) bool {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	return net.ParseIP(host) != nil || strings.EqualFold(host, "localhost")
}

// authorize requires the bearer token, when there is one.
func (h *Handler) authorize(next http.Handler) http.Handler {
	if h.tokenSum == nil {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !hostAllowed(r) {
				h.log.Warn("admin request refused: Host is a name and no token is set", "remote", r.RemoteAddr, "host", r.Host)
				writeError(w, http.StatusForbidden, "Host must be an IP address or localhost (or set admin.token_file)")
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := bearerToken(r)
		sum := sha256.Sum256([]byte(tok))
		if !ok || subtle.ConstantTimeCompare(sum[:], h.tokenSum[:]) != 1 {
			h.log.Warn("admin request refused: missing or wrong token", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
			w.Header().Set("WWW-Authenticate", `Bearer realm="imapproxy admin"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// bearerToken returns the token of an "Authorization: Bearer" header; the
// scheme is case-insensitive (RFC 9110 11.1).
func bearerToken(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(tok), true
}

func (h *Handler) getStatus(w http.ResponseWriter, r *http.Request) {
	st, ps, ds := h.srv.Stats(), h.srv.Pool().Stats(), h.opts.source()
	out := Status{
		UptimeSeconds: time.Since(h.start).Seconds(),
		Sessions:      st.Sessions,
		Logins: Logins{
			Client:      st.LoginsFresh + st.LoginsReused,
			Backend:     st.LoginsFresh,
			Reused:      st.LoginsReused,
			Refused:     st.LoginsRefused,
			Failed:      st.LoginsFailed,
			Failovers:   st.Failovers,
			UserLimited: st.UserLimited,
		},
		ConnectionsRejected: st.Rejected,
		BackendsMarkedDown:  st.BackendsDown,
		SessionsDrained:     st.BackendsDrained,
		Cache: Cache{
			Open:   ps.Open,
			Cached: ps.Cached,
			Hits:   ps.Hits,
			Misses: ps.Misses,
			Closed: closedByCause(ps),
		},
		Discovery: Discovery{
			Kind:                  ds.Kind,
			Healthy:               ds.Healthy,
			LastSuccess:           ds.LastSuccess,
			LastSuccessAgeSeconds: time.Since(ds.LastSuccess).Seconds(),
			Backends:              ds.Backends,
		},
		Backends: h.backends(),
	}
	out.ReuseRatio = reuseRatio(st)
	if n := ps.Hits + ps.Misses; n > 0 {
		out.Cache.HitRatio = float64(ps.Hits) / float64(n)
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) getBackends(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, struct {
		Backends []Backend `json:"backends"`
	}{h.backends()})
}

func (h *Handler) backends() []Backend {
	bs := h.srv.BackendStatus()
	out := make([]Backend, 0, len(bs))
	for _, b := range bs {
		ab := Backend{
			ID: b.ID, Address: b.Address, Weight: b.Weight, TLS: b.TLS,
			State: backendState(b.Down, b.Drained), Down: b.Down, Drained: b.Drained, Held: b.Held,
			Active: b.Active, Cached: b.Cached,
		}
		if b.Down {
			ab.DownUntil = &b.DownUntil
		}
		if b.Held {
			ab.State = "held"
		}
		out = append(out, ab)
	}
	return out
}

// backendState is the one word the status view shows: a drain is the
// operator's and outlasts a down mark, so it wins.
func backendState(down, drained bool) string {
	switch {
	case drained:
		return "drained"
	case down:
		return "down"
	}
	return "up"
}

func (h *Handler) getUser(w http.ResponseWriter, r *http.Request) {
	ui := h.srv.UserInfo(r.PathValue("user"))
	out := User{
		User: ui.User, HashKey: ui.Key, Backend: ui.Backend,
		Order: []Choice{}, Sessions: []Session{}, Cached: []Cached{},
		Active: len(ui.Sessions),
	}
	for _, c := range ui.Order {
		out.Order = append(out.Order, Choice{ID: c.ID, State: backendState(c.Down, c.Drained)})
	}
	for _, s := range ui.Sessions {
		out.Sessions = append(out.Sessions, Session{
			ID: s.ID, User: s.User, AuthzID: s.AuthzID, Backend: s.Backend, Client: s.Client, Since: s.Since,
		})
	}
	for _, c := range ui.Cached {
		out.Cached = append(out.Cached, Cached{Backend: c.Backend, AgeSeconds: c.Age.Seconds(), IdleSeconds: c.Idle.Seconds()})
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *Handler) drain(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := h.srv.DrainBackend(id); err != nil {
		writeError(w, errorStatus(err), err.Error())
		return
	}
	h.log.Info("admin: backend drained", "backend", id, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, Drain{Backend: id, Drained: true})
}

func (h *Handler) undrain(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := h.srv.UndrainBackend(id); err != nil {
		writeError(w, errorStatus(err), err.Error())
		return
	}
	h.log.Info("admin: backend undrained", "backend", id, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, Drain{Backend: id, Drained: false})
}

func (h *Handler) kick(w http.ResponseWriter, r *http.Request) {
	user := r.PathValue("user")
	sessions, cached := h.srv.KickUser(user)
	h.log.Info("admin: user kicked", "user", user, "sessions", sessions, "cached", cached, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, Kick{User: user, Sessions: sessions, Cached: cached})
}

func (h *Handler) flush(w http.ResponseWriter, r *http.Request) {
	n := h.srv.FlushCache()
	h.log.Info("admin: cache flushed", "closed", n, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, Flush{Closed: n})
}

// Trace is a running or just stopped trace.
type Trace struct {
	User    string    `json:"user"`
	Path    string    `json:"path"`
	Started time.Time `json:"started"`
	Bytes   int64     `json:"bytes"`
}

func toTrace(t session.TraceInfo) Trace {
	return Trace{User: t.User, Path: t.Path, Started: t.Started.UTC(), Bytes: t.Bytes}
}

func (h *Handler) getTraces(w http.ResponseWriter, r *http.Request) {
	out := []Trace{}
	for _, t := range h.srv.Traces() {
		out = append(out, toTrace(t))
	}
	writeJSON(w, http.StatusOK, out)
}

// startTrace traces a user into a new file in admin.trace_dir. The file
// name is made here, from the user name with anything unusual replaced:
// an API caller never chooses a path.
func (h *Handler) startTrace(w http.ResponseWriter, r *http.Request) {
	user := r.PathValue("user")
	if h.opts.TraceDir == "" {
		writeError(w, http.StatusConflict, "tracing is disabled: set admin.trace_dir")
		return
	}
	name := strings.Map(func(c rune) rune {
		if c < 0x80 && (c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("@.+_-", c)) {
			return c
		}
		return '_'
	}, user)
	path := filepath.Join(h.opts.TraceDir, name+"-"+time.Now().UTC().Format("20060102T150405.000Z")+".trace")
	if err := h.srv.StartTrace(user, path); err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, proxy.ErrTraceActive):
			code = http.StatusConflict
		case errors.Is(err, proxy.ErrTooManyTraces):
			code = http.StatusTooManyRequests
		}
		writeError(w, code, err.Error())
		return
	}
	h.log.Info("admin: trace started", "user", user, "path", path, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, Trace{User: user, Path: path, Started: time.Now().UTC()})
}

func (h *Handler) stopTrace(w http.ResponseWriter, r *http.Request) {
	user := r.PathValue("user")
	info, err := h.srv.StopTrace(user)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, proxy.ErrNoTrace) {
			code = http.StatusNotFound
		}
		writeError(w, code, err.Error())
		return
	}
	h.log.Info("admin: trace stopped", "user", user, "path", info.Path, "bytes", info.Bytes, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, toTrace(info))
}

func errorStatus(err error) int {
	switch {
	case errors.Is(err, proxy.ErrUnknownBackend):
		return http.StatusNotFound
	case errors.Is(err, proxy.ErrLastBackend):
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v) // the client went away if this fails
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, ErrorBody{Error: msg})
}
