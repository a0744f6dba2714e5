package config

import (
	"fmt"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"

	"github.com/imapproxy/imapproxy/backend"
)

// The hcl* types mirror the file. Every attribute is a pointer so that an
// absent one leaves the default in place, while an explicit zero is kept and
// validated.

type hclFile struct {
	LogLevel  *string       `hcl:"log_level,optional"`
	LogFormat *string       `hcl:"log_format,optional"`
	Listeners []hclListener `hcl:"listener,block"`
	ClientTLS *hclClientTLS `hcl:"client_tls,block"`
	Upstream  *hclUpstream  `hcl:"upstream,block"`
	Backends  []hclBackend  `hcl:"backend,block"`
	Cache     *hclCache     `hcl:"cache,block"`
	Timeouts  *hclTimeouts  `hcl:"timeouts,block"`
	Limits    *hclLimits    `hcl:"limits,block"`
	Cluster   *hclCluster   `hcl:"cluster,block"`
	Consul    *hclConsul    `hcl:"consul,block"`
	Admin     *hclAdmin     `hcl:"admin,block"`
	Register  *hclRegister  `hcl:"register,block"`
}

type hclRegister struct {
	Service         *string  `hcl:"service,optional"`
	ID              *string  `hcl:"id,optional"`
	Listener        *string  `hcl:"listener,optional"`
	Address         *string  `hcl:"address,optional"`
	Tags            []string `hcl:"tags,optional"`
	Check           *string  `hcl:"check,optional"`
	CheckInterval   *string  `hcl:"check_interval,optional"`
	DeregisterAfter *string  `hcl:"deregister_after,optional"`
	ConsulAddress   *string  `hcl:"consul_address,optional"`
}

type hclAdmin struct {
	Address   *string `hcl:"address,optional"`
	TokenFile *string `hcl:"token_file,optional"`
	TraceDir  *string `hcl:"trace_dir,optional"`
}

type hclCluster struct {
	HashKey      *string `hcl:"hash_key,optional"`
	BackendDrain *string `hcl:"backend_drain,optional"`
	DownTime     *string `hcl:"down_time,optional"`
	RejoinHold   *string `hcl:"rejoin_hold,optional"`
}

type hclConsul struct {
	Address            *string `hcl:"address,optional"`
	Scheme             *string `hcl:"scheme,optional"`
	Token              *string `hcl:"token,optional"`
	TokenFile          *string `hcl:"token_file,optional"`
	Datacenter         *string `hcl:"datacenter,optional"`
	Namespace          *string `hcl:"namespace,optional"`
	Partition          *string `hcl:"partition,optional"`
	CAFile             *string `hcl:"ca_file,optional"`
	CertFile           *string `hcl:"cert_file,optional"`
	KeyFile            *string `hcl:"key_file,optional"`
	InsecureSkipVerify *bool   `hcl:"insecure_skip_verify,optional"`
	Service            *string `hcl:"service,optional"`
	Tag                *string `hcl:"tag,optional"`
	WaitTime           *string `hcl:"wait_time,optional"`
}

type hclListener struct {
	Name    string  `hcl:"name,label"`
	Address *string `hcl:"address,optional"` // required, but checked by Validate to report it once
	TLS     *string `hcl:"tls,optional"`
	// A list: pointer-free, nil when absent.
	ProxyProtocolFrom    []string `hcl:"proxy_protocol_from,optional"`
	CacheByClientAddress *bool    `hcl:"cache_by_client_address,optional"`
}

type hclClientTLS struct {
	CertFile           *string `hcl:"cert_file,optional"`
	KeyFile            *string `hcl:"key_file,optional"`
	RequireTLSForLogin *bool   `hcl:"require_tls_for_login,optional"`
	MinVersion         *string `hcl:"min_version,optional"`
}

type hclUpstream struct {
	TLS                *string `hcl:"tls,optional"`
	CAFile             *string `hcl:"ca_file,optional"`
	ServerName         *string `hcl:"server_name,optional"`
	InsecureSkipVerify *bool   `hcl:"insecure_skip_verify,optional"`
	LoginMethod        *string `hcl:"login_method,optional"`
	DialTimeout        *string `hcl:"dial_timeout,optional"`
	DialRetries        *int    `hcl:"dial_retries,optional"`
	RetryDelay         *string `hcl:"retry_delay,optional"`
	KeepAlive          *string `hcl:"tcp_keepalive,optional"`
	ForwardID          *bool   `hcl:"forward_id,optional"`
}

type hclBackend struct {
	Name    string  `hcl:"name,label"`
	Address *string `hcl:"address,optional"`
	Weight  *int    `hcl:"weight,optional"`
	TLS     *string `hcl:"tls,optional"`
}

type hclCache struct {
	Enabled          *bool   `hcl:"enabled,optional"`
	Expiration       *string `hcl:"expiration,optional"`
	SweepInterval    *string `hcl:"sweep_interval,optional"`
	ReuseMaxAge      *string `hcl:"reuse_max_age,optional"`
	MaxCachedPerUser *int    `hcl:"max_cached_per_user,optional"`
	MaxConnections   *int    `hcl:"max_connections,optional"`
}

type hclTimeouts struct {
	PreAuth      *string `hcl:"preauth,optional"`
	AuthIdle     *string `hcl:"auth_idle,optional"`
	Idle         *string `hcl:"idle,optional"`
	Literal      *string `hcl:"literal,optional"`
	BackendLogin *string `hcl:"backend_login,optional"`
	Check        *string `hcl:"check,optional"`
	Response     *string `hcl:"response,optional"`
	Write        *string `hcl:"write,optional"`
	Drain        *string `hcl:"drain,optional"`
}

type hclLimits struct {
	MaxLineLength     *int   `hcl:"max_line_length,optional"`
	MaxLiteralPreAuth *int   `hcl:"max_literal_preauth,optional"`
	MaxLiteral        *int64 `hcl:"max_literal,optional"`
	MaxBadCommands    *int   `hcl:"max_bad_commands,optional"`
	MaxCommandPreAuth *int   `hcl:"max_command_preauth,optional"`

	MaxUserLength     *int    `hcl:"max_user_length,optional"`
	MaxPasswordLength *int    `hcl:"max_password_length,optional"`
	MaxLoginFailures  *int    `hcl:"max_login_failures,optional"`
	LoginFailureDelay *string `hcl:"login_failure_delay,optional"`

	MaxClients         *int `hcl:"max_clients,optional"`
	MaxClientsPerIP    *int `hcl:"max_clients_per_ip,optional"`
	MaxPreAuth         *int `hcl:"max_preauth,optional"`
	MaxPreAuthPerIP    *int `hcl:"max_preauth_per_ip,optional"`
	MaxSessionsPerUser *int `hcl:"max_sessions_per_user,optional"`
}

// apply copies what the file sets over the defaults in c. A duration that
// does not parse is reported and leaves the default, so that Validate does
// not report the same key again. Blocks are applied in file-struct order, which
// is the order their errors are reported in.
func (c *Config) apply(f *hclFile, ck *checker) {
	set(&c.LogLevel, f.LogLevel)
	set(&c.LogFormat, f.LogFormat)
	for _, h := range f.Listeners {
		c.Listeners = append(c.Listeners, h.listener())
	}
	if h := f.ClientTLS; h != nil {
		h.apply(&c.ClientTLS)
	}
	if h := f.Upstream; h != nil {
		h.apply(&c.Upstream, ck)
	}
	for _, h := range f.Backends {
		c.Backends = append(c.Backends, h.backend())
	}
	if h := f.Cache; h != nil {
		h.apply(&c.Cache, ck)
	}
	if h := f.Timeouts; h != nil {
		h.apply(&c.Timeouts, ck)
	}
	if h := f.Limits; h != nil {
		h.apply(&c.Limits, ck)
	}
	if h := f.Cluster; h != nil {
		h.apply(&c.Cluster, ck)
	}
	if h := f.Admin; h != nil {
		h.apply(&c.Admin)
	}
	if h := f.Consul; h != nil {
		c.Consul = h.consul(ck)
	}
	if h := f.Register; h != nil {
		c.Register = h.register(ck)
	}
}

func (h *hclListener) listener() Listener {
	l := Listener{Name: h.Name, TLS: "none"}
	set(&l.Address, h.Address)
	setTLS(&l.TLS, h.TLS)
	l.ProxyProtocolFrom = h.ProxyProtocolFrom
	set(&l.CacheByClientAddress, h.CacheByClientAddress)
	return l
}

func (h *hclClientTLS) apply(t *ClientTLS) {
	set(&t.CertFile, h.CertFile)
	set(&t.KeyFile, h.KeyFile)
	set(&t.RequireTLSForLogin, h.RequireTLSForLogin)
	set(&t.MinVersion, h.MinVersion)
}

func (h *hclUpstream) apply(u *Upstream, ck *checker) {
	k := top("upstream")
	setTLS(&u.TLS, h.TLS)
	set(&u.CAFile, h.CAFile)
	set(&u.ServerName, h.ServerName)
	set(&u.InsecureSkipVerify, h.InsecureSkipVerify)
	set(&u.LoginMethod, h.LoginMethod)
	ck.duration(k.dot("dial_timeout"), &u.DialTimeout, h.DialTimeout)
	set(&u.DialRetries, h.DialRetries)
	ck.duration(k.dot("retry_delay"), &u.RetryDelay, h.RetryDelay)
	ck.duration(k.dot("tcp_keepalive"), &u.KeepAlive, h.KeepAlive)
	set(&u.ForwardID, h.ForwardID)
}

func (h *hclBackend) backend() backend.Backend {
	b := backend.Backend{ID: h.Name, Weight: 1}
	set(&b.Addr, h.Address)
	set(&b.Weight, h.Weight)
	setTLS(&b.TLS, h.TLS)
	return b
}

func (h *hclCache) apply(cc *Cache, ck *checker) {
	k := top("cache")
	set(&cc.Enabled, h.Enabled)
	ck.duration(k.dot("expiration"), &cc.Expiration, h.Expiration)
	ck.duration(k.dot("sweep_interval"), &cc.SweepInterval, h.SweepInterval)
	ck.duration(k.dot("reuse_max_age"), &cc.ReuseMaxAge, h.ReuseMaxAge)
	set(&cc.MaxCachedPerUser, h.MaxCachedPerUser)
	set(&cc.MaxConnections, h.MaxConnections)
}

func (h *hclTimeouts) apply(t *Timeouts, ck *checker) {
	k := top("timeouts")
	ck.duration(k.dot("preauth"), &t.PreAuth, h.PreAuth)
	ck.duration(k.dot("auth_idle"), &t.AuthIdle, h.AuthIdle)
	ck.duration(k.dot("idle"), &t.Idle, h.Idle)
	ck.duration(k.dot("literal"), &t.Literal, h.Literal)
	ck.duration(k.dot("backend_login"), &t.BackendLogin, h.BackendLogin)
	ck.duration(k.dot("check"), &t.Check, h.Check)
	ck.duration(k.dot("response"), &t.Response, h.Response)
	ck.duration(k.dot("write"), &t.Write, h.Write)
	ck.duration(k.dot("drain"), &t.Drain, h.Drain)
}

func (h *hclLimits) apply(l *Limits, ck *checker) {
	k := top("limits")
	set(&l.MaxLineLength, h.MaxLineLength)
	set(&l.MaxLiteralPreAuth, h.MaxLiteralPreAuth)
	set(&l.MaxLiteral, h.MaxLiteral)
	set(&l.MaxBadCommands, h.MaxBadCommands)
	set(&l.MaxCommandPreAuth, h.MaxCommandPreAuth)
	set(&l.MaxUserLength, h.MaxUserLength)
	set(&l.MaxPasswordLength, h.MaxPasswordLength)
	set(&l.MaxLoginFailures, h.MaxLoginFailures)
	ck.duration(k.dot("login_failure_delay"), &l.LoginFailureDelay, h.LoginFailureDelay)
	set(&l.MaxClients, h.MaxClients)
	set(&l.MaxClientsPerIP, h.MaxClientsPerIP)
	set(&l.MaxPreAuth, h.MaxPreAuth)
	set(&l.MaxPreAuthPerIP, h.MaxPreAuthPerIP)
	set(&l.MaxSessionsPerUser, h.MaxSessionsPerUser)
}

func (h *hclCluster) apply(cl *Cluster, ck *checker) {
	k := top("cluster")
	set(&cl.HashKey, h.HashKey)
	ck.duration(k.dot("backend_drain"), &cl.BackendDrain, h.BackendDrain)
	ck.duration(k.dot("down_time"), &cl.DownTime, h.DownTime)
	ck.duration(k.dot("rejoin_hold"), &cl.RejoinHold, h.RejoinHold)
}

func (h *hclAdmin) apply(a *Admin) {
	set(&a.Address, h.Address)
	set(&a.TokenFile, h.TokenFile)
	set(&a.TraceDir, h.TraceDir)
}

// consul builds the block from its own defaults: Config holds none, since a
// nil Consul means the static backend blocks are the backend set.
func (h *hclConsul) consul(ck *checker) *Consul {
	cs, k := &Consul{WaitTime: 5 * time.Minute}, top("consul")
	set(&cs.Address, h.Address)
	set(&cs.Scheme, h.Scheme)
	set(&cs.Token, h.Token)
	set(&cs.TokenFile, h.TokenFile)
	set(&cs.Datacenter, h.Datacenter)
	set(&cs.Namespace, h.Namespace)
	set(&cs.Partition, h.Partition)
	set(&cs.CAFile, h.CAFile)
	set(&cs.CertFile, h.CertFile)
	set(&cs.KeyFile, h.KeyFile)
	set(&cs.InsecureSkipVerify, h.InsecureSkipVerify)
	set(&cs.Service, h.Service)
	set(&cs.Tag, h.Tag)
	ck.duration(k.dot("wait_time"), &cs.WaitTime, h.WaitTime)
	return cs
}

// register builds the block from its own defaults: Config has none, since a
// nil Register means the proxy does not register itself.
func (h *hclRegister) register(ck *checker) *Register {
	r, k := &Register{
		Service:         "imapproxy",
		Check:           "tcp",
		CheckInterval:   10 * time.Second,
		DeregisterAfter: time.Minute,
	}, top("register")
	set(&r.Service, h.Service)
	set(&r.ID, h.ID)
	set(&r.Listener, h.Listener)
	set(&r.Address, h.Address)
	r.Tags = h.Tags
	set(&r.Check, h.Check)
	ck.duration(k.dot("check_interval"), &r.CheckInterval, h.CheckInterval)
	ck.duration(k.dot("deregister_after"), &r.DeregisterAfter, h.DeregisterAfter)
	set(&r.ConsulAddress, h.ConsulAddress)
	return r
}

func set[T any](dst, src *T) {
	if src != nil {
		*dst = *src
	}
}

// setTLS takes the mode as written; Validate refuses what is no mode.
func setTLS(dst *backend.TLSMode, src *string) {
	if src != nil {
		*dst = backend.TLSMode(*src)
	}
}

func (ck *checker) duration(k key, dst *time.Duration, src *string) {
	if src == nil {
		return
	}
	d, err := time.ParseDuration(*src)
	if err != nil {
		ck.addf(k, "invalid duration %q", *src)
		return
	}
	*dst = d
}

// positions records where each attribute and block of body is written, under
// the keys that check uses. Labelled blocks are numbered in file order, as
// gohcl decodes them into a slice; like gohcl, only blocks with exactly one
// label (the only kind this file has) are counted.
func positions(body *hclsyntax.Body) map[string]hcl.Range {
	pos := map[string]hcl.Range{"": body.MissingItemRange()}
	var walk func(b *hclsyntax.Body, prefix string)
	walk = func(b *hclsyntax.Body, prefix string) {
		for name, a := range b.Attributes {
			pos[prefix+name] = a.SrcRange
		}
		seen := map[string]int{}
		for _, blk := range b.Blocks {
			k := prefix + blk.Type
			if len(blk.Labels) == 1 {
				k = fmt.Sprintf("%s[%d]", k, seen[blk.Type])
				seen[blk.Type]++
			}
			pos[k] = blk.DefRange()
			walk(blk.Body, k+".")
		}
	}
	walk(body, "")
	return pos
}
