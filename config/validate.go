package config

import (
	"cmp"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
)

// Validate reports every problem in c at once, joined with errors.Join. When
// c came from Parse, each problem starts with "file:line: ". It reads the
// client certificate and the upstream CA bundle to prove they load.
func (c *Config) Validate() error {
	ck := checker{pos: c.pos}
	c.check(&ck)
	return ck.err()
}

func (c *Config) check(ck *checker) {
	ck.oneOf(top("log_level"), c.LogLevel, "trace", "debug", "info", "warn", "error")
	ck.oneOf(top("log_format"), c.LogFormat, "text", "json")

	// One address space for listeners and backends: a backend that is also a
	// listener would make the proxy connect to itself.
	addrs := map[string]string{}
	c.checkListeners(ck, addrs)
	c.checkClientTLS(ck)
	c.checkUpstream(ck)
	c.checkBackends(ck, addrs)

	c.checkCache(ck)
	c.checkTimeouts(ck)
	c.checkCluster(ck)
	c.checkConsul(ck)
	c.checkRegister(ck)
	c.checkAdmin(ck, addrs)
	c.checkLimits(ck)
}

func (c *Config) checkCache(ck *checker) {
	k := top("cache")
	ck.positive(k.dot("expiration"), c.Cache.Expiration)
	ck.positive(k.dot("sweep_interval"), c.Cache.SweepInterval)
	ck.positive(k.dot("reuse_max_age"), c.Cache.ReuseMaxAge)
	ck.atLeast(k.dot("max_cached_per_user"), int64(c.Cache.MaxCachedPerUser), 1)
	ck.atLeast(k.dot("max_connections"), int64(c.Cache.MaxConnections), 1)
}

func (c *Config) checkTimeouts(ck *checker) {
	k, t := top("timeouts"), c.Timeouts
	ck.positive(k.dot("preauth"), t.PreAuth)
	ck.positive(k.dot("auth_idle"), t.AuthIdle)
	ck.positive(k.dot("idle"), t.Idle)
	ck.positive(k.dot("literal"), t.Literal)
	ck.positive(k.dot("backend_login"), t.BackendLogin)
	ck.positive(k.dot("check"), t.Check)
	ck.positive(k.dot("response"), t.Response)
	ck.positive(k.dot("write"), t.Write)
	ck.positive(k.dot("drain"), t.Drain)
}

func (c *Config) checkCluster(ck *checker) {
	k := top("cluster")
	ck.oneOf(k.dot("hash_key"), c.Cluster.HashKey, "lowercase", "exact", "domain")
	ck.positive(k.dot("backend_drain"), c.Cluster.BackendDrain)
	ck.positive(k.dot("down_time"), c.Cluster.DownTime)
	if c.Cluster.RejoinHold < 0 {
		ck.addf(k.dot("rejoin_hold"), "must not be negative (\"0s\" disables it), got %s", c.Cluster.RejoinHold)
	}
}

// checkAdmin takes the addresses of listeners and backends so that the
// admin listener cannot collide with either.
func (c *Config) checkAdmin(ck *checker, addrs map[string]string) {
	if c.Admin.Address != "" {
		ck.address(top("admin"), c.Admin.Address, addrs, false)
	}
	if f := c.Admin.TokenFile; f != "" {
		if _, err := ReadToken(f); err != nil {
			ck.addf(top("admin").dot("token_file"), "%v", err)
		}
	}
	if d := c.Admin.TraceDir; d != "" {
		if st, err := os.Stat(d); err != nil {
			ck.addf(top("admin").dot("trace_dir"), "%v", err)
		} else if !st.IsDir() {
			ck.addf(top("admin").dot("trace_dir"), "%s is not a directory", d)
		}
	}
}

func (c *Config) checkLimits(ck *checker) {
	k := top("limits")
	ck.atLeast(k.dot("max_line_length"), int64(c.Limits.MaxLineLength), 1024)
	ck.atLeast(k.dot("max_literal_preauth"), int64(c.Limits.MaxLiteralPreAuth), 1)
	ck.atLeast(k.dot("max_literal"), c.Limits.MaxLiteral, 1)
	ck.atLeast(k.dot("max_bad_commands"), int64(c.Limits.MaxBadCommands), 1)
	ck.atLeast(k.dot("max_command_preauth"), int64(c.Limits.MaxCommandPreAuth), 1024)
	ck.atLeast(k.dot("max_user_length"), int64(c.Limits.MaxUserLength), 1)
	ck.atLeast(k.dot("max_password_length"), int64(c.Limits.MaxPasswordLength), 1)
	ck.atLeast(k.dot("max_login_failures"), int64(c.Limits.MaxLoginFailures), 0)
	if c.Limits.LoginFailureDelay < 0 {
		ck.addf(k.dot("login_failure_delay"), "must not be negative")
	}
	ck.atLeast(k.dot("max_clients"), int64(c.Limits.MaxClients), 0)
	ck.atLeast(k.dot("max_clients_per_ip"), int64(c.Limits.MaxClientsPerIP), 0)
	ck.atLeast(k.dot("max_preauth"), int64(c.Limits.MaxPreAuth), 0)
	ck.atLeast(k.dot("max_preauth_per_ip"), int64(c.Limits.MaxPreAuthPerIP), 0)
	ck.atLeast(k.dot("max_sessions_per_user"), int64(c.Limits.MaxSessionsPerUser), 0)
}

func (c *Config) checkListeners(ck *checker, addrs map[string]string) {
	if len(c.Listeners) == 0 {
		ck.addf(key{"", "listener"}, "at least one listener block is required")
	}
	names := map[string]bool{}
	for i, l := range c.Listeners {
		k := key{fmt.Sprintf("listener[%d]", i), "listener." + l.Name}
		if names[l.Name] {
			ck.addf(k, "duplicate listener name %q", l.Name)
		}
		names[l.Name] = true
		ck.address(k, l.Address, addrs, false)
		ck.tlsMode(k.dot("tls"), l.TLS)
		if _, err := proxyproto.ParseTrusted(l.ProxyProtocolFrom); err != nil {
			ck.addf(k.dot("proxy_protocol_from"), "%s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	}
}

func (c *Config) checkClientTLS(ck *checker) {
	k, t := top("client_tls"), c.ClientTLS
	ck.oneOf(k.dot("min_version"), t.MinVersion, "1.2", "1.3")

	needs := -1 // the first listener that needs a certificate
	for i, l := range c.Listeners {
		if l.TLS == backend.TLSStartTLS || l.TLS == backend.TLSImplicit {
			needs = i
			break
		}
	}
	if t.RequireTLSForLogin && needs < 0 {
		ck.addf(k.dot("require_tls_for_login"), "no listener offers TLS, so no client could log in")
	}

	if t.CertFile != "" && t.KeyFile != "" {
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			ck.addf(k.dot("cert_file"), "%v", err)
		}
		return
	}
	for _, f := range []struct{ attr, path string }{{"cert_file", t.CertFile}, {"key_file", t.KeyFile}} {
		switch {
		case f.path != "":
		case needs >= 0:
			// Point at the listener: its tls line is what makes the file required.
			l := c.Listeners[needs]
			at := key{fmt.Sprintf("listener[%d].tls", needs), k.name + "." + f.attr}
			ck.addf(at, "required because listener.%s uses tls %q", l.Name, l.TLS)
		case t.CertFile != "" || t.KeyFile != "":
			ck.addf(k.dot(f.attr), "cert_file and key_file must be set together")
		}
	}
}

func (c *Config) checkUpstream(ck *checker) {
	k, u := top("upstream"), c.Upstream
	ck.tlsMode(k.dot("tls"), u.TLS)
	ck.oneOf(k.dot("login_method"), u.LoginMethod, "auto", "login", "plain")
	if u.CAFile != "" {
		pem, err := os.ReadFile(u.CAFile)
		switch {
		case err != nil:
			ck.addf(k.dot("ca_file"), "%v", err)
		case !x509.NewCertPool().AppendCertsFromPEM(pem):
			ck.addf(k.dot("ca_file"), "no PEM certificates in %s", u.CAFile)
		}
	}
	ck.positive(k.dot("dial_timeout"), u.DialTimeout)
	ck.atLeast(k.dot("dial_retries"), int64(u.DialRetries), 0)
	ck.positive(k.dot("retry_delay"), u.RetryDelay)
	if u.KeepAlive < 0 {
		ck.addf(k.dot("tcp_keepalive"), "must not be negative (\"0s\" keeps the system default), got %s", u.KeepAlive)
	}
}

func (c *Config) checkBackends(ck *checker, addrs map[string]string) {
	// The one place that decides where the backend set comes from.
	switch {
	case c.Consul != nil && len(c.Backends) > 0:
		ck.addf(key{"backend[0]", "backend"}, "backend blocks and a consul block exclude each other: the backend set comes from one source")
	case c.Consul == nil && len(c.Backends) == 0:
		ck.addf(key{"", "backend"}, "at least one backend block (or a consul block) is required")
	}
	names := map[string]bool{}
	for i, b := range c.Backends {
		k := key{fmt.Sprintf("backend[%d]", i), "backend." + b.ID}
		if names[b.ID] {
			ck.addf(k, "duplicate backend name %q", b.ID)
		}
		names[b.ID] = true
		ck.address(k, b.Addr, addrs, true)
		ck.atLeast(k.dot("weight"), int64(b.Weight), 1)
		if b.TLS != "" {
			ck.tlsMode(k.dot("tls"), b.TLS)
		}
	}
}

func (c *Config) checkConsul(ck *checker) {
	cs := c.Consul
	if cs == nil {
		return
	}
	k := top("consul")
	if cs.Service == "" {
		ck.addf(k, "service is required")
	}
	if cs.Scheme != "" {
		ck.oneOf(k.dot("scheme"), cs.Scheme, "http", "https")
	}
	ck.positive(k.dot("wait_time"), cs.WaitTime)
	for _, f := range []struct{ attr, path string }{{"ca_file", cs.CAFile}, {"cert_file", cs.CertFile}, {"key_file", cs.KeyFile}, {"token_file", cs.TokenFile}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			ck.addf(k.dot(f.attr), "%v", err)
		}
	}
	if (cs.CertFile == "") != (cs.KeyFile == "") {
		ck.addf(k.dot("cert_file"), "cert_file and key_file must be set together")
	}
}

func (c *Config) checkRegister(ck *checker) {
	r := c.Register
	if r == nil {
		return
	}
	k := top("register")
	if r.Service == "" {
		ck.addf(k.dot("service"), "must not be empty")
	}
	ck.oneOf(k.dot("check"), r.Check, "tcp", "http")
	if r.Check == "http" && c.Admin.Address == "" {
		ck.addf(k.dot("check"), `"http" checks the admin listener's /readyz, but admin.address is empty`)
	}
	// Consul raises shorter values silently; say so instead.
	if r.CheckInterval < time.Second {
		ck.addf(k.dot("check_interval"), "must be at least 1s, got %s", r.CheckInterval)
	}
	if r.DeregisterAfter < time.Minute {
		ck.addf(k.dot("deregister_after"), "must be at least 1m, got %s", r.DeregisterAfter)
	}
	if len(c.Listeners) == 0 {
		return
	}
	l := c.Listeners[0]
	if r.Listener != "" {
		i := slices.IndexFunc(c.Listeners, func(l Listener) bool { return l.Name == r.Listener })
		if i < 0 {
			ck.addf(k.dot("listener"), "no listener %q", r.Listener)
			return
		}
		l = c.Listeners[i]
	}
	if r.Address == "" {
		host, _, err := net.SplitHostPort(l.Address)
		if ip := net.ParseIP(host); err == nil && (host == "" || ip != nil && ip.IsUnspecified()) {
			ck.addf(k.dot("address"), "required: listener.%s listens on all interfaces (%q), so say which address others reach it at", l.Name, l.Address)
		}
		return
	}
	host, port, err := net.SplitHostPort(r.Address)
	if ip := net.ParseIP(host); err != nil || host == "" || ip != nil && ip.IsUnspecified() {
		ck.addf(k.dot("address"), "want host:port with a host others can reach, got %q", r.Address)
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		ck.addf(k.dot("address"), "invalid port %q (want 1-65535)", port)
	}
}

// key names a setting twice: where it is in the file, to look up its
// position ("listener[0].address"), and how an operator calls it
// ("listener.imap.address"). They differ only inside labelled blocks.
type key struct{ pos, name string }

func top(name string) key { return key{name, name} }

func (k key) dot(attr string) key { return key{k.pos + "." + attr, k.name + "." + attr} }

type problem struct {
	at  *hcl.Range // nil when unknown
	msg string
}

type checker struct {
	pos      map[string]hcl.Range
	problems []problem
	decoded  map[string]bool // keys HCL already reported: a value that failed to decode is left zero, not wrong
}

func (ck *checker) addf(k key, format string, args ...any) {
	if ck.decoded[k.pos] {
		return
	}
	ck.problems = append(ck.problems, problem{ck.find(k.pos), k.name + ": " + fmt.Sprintf(format, args...)})
}

// find returns where pos is written or, for an absent attribute, the nearest
// enclosing block that is; a setting missing everywhere points at the top of the file.
func (ck *checker) find(pos string) *hcl.Range {
	if ck.pos == nil {
		return nil
	}
	for {
		if r, ok := ck.pos[pos]; ok {
			return &r
		}
		if pos == "" {
			return nil
		}
		i := max(strings.LastIndexByte(pos, '.'), 0)
		pos = pos[:i]
	}
}

func (ck *checker) diags(diags hcl.Diagnostics) {
	for _, d := range diags {
		if d.Severity != hcl.DiagError {
			continue
		}
		msg := d.Summary
		if d.Detail != "" {
			msg += "; " + d.Detail
		}
		ck.problems = append(ck.problems, problem{d.Subject, msg})
		if d.Subject == nil {
			continue
		}
		for k, r := range ck.pos {
			if k != "" && r.ContainsPos(d.Subject.Start) {
				if ck.decoded == nil {
					ck.decoded = map[string]bool{}
				}
				ck.decoded[k] = true
			}
		}
	}
}

// err joins the problems in file order, those without a position last.
func (ck *checker) err() error {
	slices.SortStableFunc(ck.problems, func(a, b problem) int {
		switch {
		case a.at == nil && b.at == nil:
			return 0
		case a.at == nil:
			return 1
		case b.at == nil:
			return -1
		}
		return cmp.Compare(a.at.Start.Byte, b.at.Start.Byte)
	})
	errs := make([]error, len(ck.problems))
	for i, p := range ck.problems {
		if p.at == nil {
			errs[i] = errors.New(p.msg)
		} else {
			errs[i] = fmt.Errorf("%s:%d: %s", p.at.Filename, p.at.Start.Line, p.msg)
		}
	}
	return errors.Join(errs...)
}

// tlsMode refuses what is not one of backend.Modes.
func (ck *checker) tlsMode(k key, m backend.TLSMode) {
	if !slices.Contains(backend.Modes, m) {
		ck.addf(k, "invalid value %q (want none, starttls, implicit)", m)
	}
}

func (ck *checker) oneOf(k key, v string, allowed ...string) {
	if !slices.Contains(allowed, v) {
		ck.addf(k, "invalid value %q (want %s)", v, strings.Join(allowed, ", "))
	}
}

func (ck *checker) positive(k key, d time.Duration) {
	if d <= 0 {
		ck.addf(k, "must be positive, got %s", d)
	}
}

func (ck *checker) atLeast(k key, v, min int64) {
	if v < min {
		ck.addf(k, "must be at least %d, got %d", min, v)
	}
}

// address checks the address attribute of block k. A listener may omit the
// host to listen on every interface; a backend may not.
func (ck *checker) address(k key, addr string, seen map[string]string, needHost bool) {
	ka := k.dot("address")
	if addr == "" {
		ck.addf(ka, "required")
		return
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		ck.addf(ka, "%v", err)
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		ck.addf(ka, "invalid port %q (want 1-65535)", port)
	}
	if needHost && host == "" {
		ck.addf(ka, "missing host in %q", addr)
	}
	if first, ok := seen[addr]; ok {
		ck.addf(ka, "%s is already used by %s", addr, first)
		return
	}
	seen[addr] = k.name
}
