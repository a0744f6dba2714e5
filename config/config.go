// Package config reads the imapproxy HCL configuration file into structs.
//
// Parse fills in every default, so a Config from a minimal file (one listener,
// one backend) is complete. Every problem found is reported at once, each
// prefixed with the file and line it comes from.
package config

import (
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclsyntax"

	"github.com/imapproxy/imapproxy/backend"
)

// Config is the whole configuration file.
type Config struct {
	LogLevel  string // trace|debug|info|warn|error
	LogFormat string // text|json
	Listeners []Listener
	ClientTLS ClientTLS
	Upstream  Upstream
	Backends  []backend.Backend // the static backend set
	Cache     Cache
	Timeouts  Timeouts
	Limits    Limits
	Cluster   Cluster
	Consul    *Consul // nil: the static backend blocks are the backend set
	Admin     Admin
	Register  *Register // nil: the proxy does not register itself

	// pos maps keys such as "cache.expiration" or "listener[0].address" to
	// where they were written; nil for a Config built in code.
	pos map[string]hcl.Range
}

// Listener is a client-facing address.
type Listener struct {
	Name    string
	Address string          // host:port
	TLS     backend.TLSMode // none|starttls|implicit
	// ProxyProtocolFrom lists the addresses and prefixes whose
	// connections start with a PROXY protocol header; empty: none do.
	ProxyProtocolFrom []string
	// CacheByClientAddress makes the client address part of the cache
	// key, so that the backend checks each new address.
	CacheByClientAddress bool
}

// ClientTLS is the certificate that listeners present to clients.
type ClientTLS struct {
	CertFile           string
	KeyFile            string
	RequireTLSForLogin bool   // advertise LOGINDISABLED on cleartext connections
	MinVersion         string // "1.2" or "1.3"
}

// Upstream is how the proxy connects and logs in to backends.
type Upstream struct {
	TLS                backend.TLSMode // none|starttls|implicit, unless a backend overrides it
	CAFile             string          // "" means the system roots
	ServerName         string          // "" means the host part of the backend address
	InsecureSkipVerify bool
	LoginMethod        string // auto|login|plain
	DialTimeout        time.Duration
	DialRetries        int
	RetryDelay         time.Duration
	KeepAlive          time.Duration // 0 leaves the dialer's default
	ForwardID          bool          // send the client's ID and x-originating-ip before LOGIN
}

// Cache controls the pool of idle authenticated upstream connections.
type Cache struct {
	Enabled          bool
	Expiration       time.Duration // how long an idle connection is kept
	SweepInterval    time.Duration
	ReuseMaxAge      time.Duration // connections older than this are not handed out again
	MaxCachedPerUser int
	MaxConnections   int // all upstream connections, active and cached
}

// Timeouts are named by the state of the session they bound.
type Timeouts struct {
	PreAuth      time.Duration // the whole time allowed before login completes
	AuthIdle     time.Duration // client silence between commands after login
	Idle         time.Duration // client silence while in IDLE
	Literal      time.Duration // to transfer one literal
	BackendLogin time.Duration // greeting, ID and LOGIN on a new upstream connection
	Check        time.Duration // the round trip that proves a cached connection alive
	Response     time.Duration // a backend's silence while it owes an answer
	Write        time.Duration // one write to a client or server
	Drain        time.Duration // shutdown grace
}

// Limits bound what a client may send.
type Limits struct {
	MaxLineLength     int
	MaxLiteralPreAuth int
	MaxLiteral        int64
	MaxBadCommands    int // pre-auth BAD responses before BYE
	MaxCommandPreAuth int // one whole command before login, lines and literals

	MaxUserLength     int           // bytes of a login name (and authorization identity)
	MaxPasswordLength int           // bytes of a password
	MaxLoginFailures  int           // failed logins per connection, then BYE; 0 = no limit
	LoginFailureDelay time.Duration // before a failed login is answered; 0 = none

	MaxClients         int // client connections in all; 0 = no limit
	MaxClientsPerIP    int // client connections from one address; 0 = no limit
	MaxPreAuth         int // connections not yet logged in; 0 = no limit
	MaxPreAuthPerIP    int // of those, from one address (IPv6: one /64); 0 = no limit
	MaxSessionsPerUser int // logged-in sessions of one user; 0 = no limit
}

// Cluster controls how users are pinned to backends and what happens when
// a backend leaves.
type Cluster struct {
	HashKey      string        // lowercase|exact|domain: what of the username is hashed
	BackendDrain time.Duration // sessions on a backend that left are ended after this
	DownTime     time.Duration // a backend that failed a dial or login is skipped this long
	RejoinHold   time.Duration // a backend back within this of leaving waits this long; 0 disables
}

// Admin is the HTTP listener for metrics, health and the admin API.
type Admin struct {
	Address string // host:port; "" disables it
	// TokenFile holds the bearer token the admin API requires; "" leaves
	// the API open to whoever reaches the listener.
	TokenFile string
	// TraceDir is where per-user protocol traces started through the
	// admin API are written; "" disables tracing.
	TraceDir string
}

// Register makes the proxy register itself as a Consul service, so that
// a fleet of proxies is discoverable (by a load balancer, by DNS).
type Register struct {
	Service         string        // service name
	ID              string        // "" = SERVICE-HOSTNAME-PORT
	Listener        string        // the listener whose address is registered; "" = the first
	Address         string        // host:port advertised; "" = the listener's
	Tags            []string      // service tags
	Check           string        // tcp|http: Consul connects to the address, or GETs /readyz on the admin listener
	CheckInterval   time.Duration // how often Consul checks
	DeregisterAfter time.Duration // a proxy critical this long is removed by Consul
	ConsulAddress   string        // the agent, when there is no consul block; "" = CONSUL_HTTP_ADDR or 127.0.0.1:8500
}

// Consul makes a Consul service the backend set.
type Consul struct {
	Address            string // host:port or URL; "" = CONSUL_HTTP_ADDR or 127.0.0.1:8500
	Scheme             string // http|https; "" = from address
	Token              string // "" = CONSUL_HTTP_TOKEN
	TokenFile          string
	Datacenter         string
	Namespace          string
	Partition          string
	CAFile             string
	CertFile           string
	KeyFile            string
	InsecureSkipVerify bool
	Service            string // required
	Tag                string
	WaitTime           time.Duration // blocking query wait
}

// Load reads the file at path and parses it with Parse.
func Load(path string) (*Config, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(src, path)
}

// Parse decodes HCL native syntax, applies defaults and validates the result.
// filename is used in error messages only. The error joins every problem
// found, each as "filename:line: key: problem".
func Parse(src []byte, filename string) (*Config, error) {
	f, diags := hclsyntax.ParseConfig(src, filename, hcl.InitialPos)
	if diags.HasErrors() {
		// After a syntax error the body is a guess; report only what the parser saw.
		var ck checker
		ck.diags(diags)
		return nil, ck.err()
	}
	body := f.Body.(*hclsyntax.Body) // always, from hclsyntax.ParseConfig

	c := defaults()
	c.pos = positions(body)
	ck := checker{pos: c.pos}
	var raw hclFile
	ck.diags(gohcl.DecodeBody(body, nil, &raw))
	c.apply(&raw, &ck)
	c.check(&ck)
	if err := ck.err(); err != nil {
		return nil, err
	}
	return c, nil
}

func defaults() *Config {
	return &Config{
		LogLevel:  "info",
		LogFormat: "text",
		ClientTLS: ClientTLS{MinVersion: "1.2"},
		Upstream: Upstream{
			TLS:         "none",
			LoginMethod: "auto",
			DialTimeout: 5 * time.Second,
			DialRetries: 2,
			RetryDelay:  200 * time.Millisecond,
			KeepAlive:   30 * time.Second,
			ForwardID:   true,
		},
		Cache: Cache{
			Enabled:          true,
			Expiration:       300 * time.Second,
			SweepInterval:    60 * time.Second,
			ReuseMaxAge:      time.Hour,
			MaxCachedPerUser: 4,
			MaxConnections:   1000,
		},
		Timeouts: Timeouts{
			PreAuth:      60 * time.Second,
			AuthIdle:     30 * time.Minute,
			Idle:         60 * time.Minute,
			Literal:      60 * time.Second,
			BackendLogin: 30 * time.Second,
			Check:        5 * time.Second,
			Response:     120 * time.Second,
			Write:        60 * time.Second,
			Drain:        30 * time.Second,
		},
		Limits: Limits{
			MaxLineLength:     65536,
			MaxLiteralPreAuth: 8192,
			MaxLiteral:        64 << 20,
			MaxBadCommands:    3,
			MaxCommandPreAuth: 40960,
			MaxUserLength:     256,
			MaxPasswordLength: 4096,
			MaxLoginFailures:  3,
			LoginFailureDelay: time.Second,

			MaxClients:         5000,
			MaxPreAuth:         1000,
			MaxPreAuthPerIP:    100,
			MaxSessionsPerUser: 50,
		},
		Admin: Admin{Address: "127.0.0.1:9143"},
		Cluster: Cluster{
			HashKey:      "lowercase",
			BackendDrain: 30 * time.Second,
			DownTime:     10 * time.Second,
			RejoinHold:   30 * time.Second,
		},
	}
}
