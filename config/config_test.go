package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// base is the smallest valid file; test cases append to it, so their first
// line is line 3.
const base = `listener "imap" { address = "127.0.0.1:1143" }
backend "b1" { address = "127.0.0.1:10143" }
`

func TestParseDefaults(t *testing.T) {
	got, err := Parse([]byte(base), "test.hcl")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	got.pos = nil
	want := &Config{
		LogLevel:  "info",
		LogFormat: "text",
		Listeners: []Listener{{Name: "imap", Address: "127.0.0.1:1143", TLS: "none"}},
		ClientTLS: ClientTLS{MinVersion: "1.2"},
		Upstream: Upstream{
			TLS: "none", LoginMethod: "auto",
			DialTimeout: 5 * time.Second, DialRetries: 2, RetryDelay: 200 * time.Millisecond,
			KeepAlive: 30 * time.Second, ForwardID: true,
		},
		Backends: []backend.Backend{{ID: "b1", Addr: "127.0.0.1:10143", Weight: 1}},
		Cache: Cache{
			Enabled: true, Expiration: 5 * time.Minute, SweepInterval: time.Minute,
			ReuseMaxAge: time.Hour, MaxCachedPerUser: 4, MaxConnections: 1000,
		},
		Timeouts: Timeouts{
			PreAuth: time.Minute, AuthIdle: 30 * time.Minute, Idle: time.Hour, Literal: time.Minute,
			BackendLogin: 30 * time.Second, Check: 5 * time.Second, Response: 2 * time.Minute, Write: time.Minute, Drain: 30 * time.Second,
		},
		Limits: Limits{MaxLineLength: 65536, MaxLiteralPreAuth: 8192, MaxLiteral: 64 << 20, MaxBadCommands: 3,
			MaxCommandPreAuth: 40960, MaxUserLength: 256, MaxPasswordLength: 4096, MaxLoginFailures: 3, LoginFailureDelay: time.Second,
			MaxClients: 5000, MaxPreAuth: 1000, MaxPreAuthPerIP: 100, MaxSessionsPerUser: 50},
		Cluster: Cluster{HashKey: "lowercase", BackendDrain: 30 * time.Second, DownTime: 10 * time.Second, RejoinHold: 30 * time.Second},
		Admin:   Admin{Address: "127.0.0.1:9143"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Parse(minimal) =\n%+v\nwant\n%+v", got, want)
	}
}

func TestLoadExample(t *testing.T) {
	c, err := Load("../config.hcl")
	if err != nil {
		t.Fatalf("Load(../config.hcl): %v", err)
	}
	wantListeners := []Listener{{Name: "imap", Address: "127.0.0.1:1143", TLS: "none"}}
	if !reflect.DeepEqual(c.Listeners, wantListeners) {
		t.Errorf("Listeners = %+v, want %+v", c.Listeners, wantListeners)
	}
	wantBackends := []backend.Backend{
		{ID: "backend-1", Addr: "127.0.0.1:10143", Weight: 1},
		{ID: "backend-2", Addr: "127.0.0.1:10144", Weight: 1},
		{ID: "backend-3", Addr: "127.0.0.1:10145", Weight: 1},
	}
	if !reflect.DeepEqual(c.Backends, wantBackends) {
		t.Errorf("Backends = %+v, want %+v", c.Backends, wantBackends)
	}
	// The example writes the defaults out; it must not drift from them.
	d := defaults()
	if c.LogLevel != "info" || c.Upstream != d.Upstream || c.Cache != d.Cache || c.Timeouts != d.Timeouts || c.Limits != d.Limits {
		t.Errorf("example settings differ from the defaults:\n%+v", c)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "absent.hcl"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(absent) error = %v, want os.ErrNotExist", err)
	}
}

func TestParseTLS(t *testing.T) {
	_, cert, key, err := testkit.NewCertT(t, "localhost").WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	src := base + `listener "imaps" {
  address = "127.0.0.1:1993"
  tls     = "implicit"
}
client_tls {
  cert_file             = "` + cert + `"
  key_file              = "` + key + `"
  require_tls_for_login = true
  min_version           = "1.3"
}
upstream {
  tls     = "starttls"
  ca_file = "` + cert + `"
}
`
	c, err := Parse([]byte(src), "test.hcl")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	want := ClientTLS{CertFile: cert, KeyFile: key, RequireTLSForLogin: true, MinVersion: "1.3"}
	if c.ClientTLS != want {
		t.Errorf("ClientTLS = %+v, want %+v", c.ClientTLS, want)
	}
	if c.Upstream.TLS != "starttls" || c.Upstream.CAFile != cert {
		t.Errorf("Upstream = %+v, want tls starttls and ca_file %s", c.Upstream, cert)
	}
}

func TestParseErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	absent := filepath.Join(dir, "absent.pem")

	tests := []struct {
		name string
		src  string
		want string
	}{
		{"unknown top-level key", base + "bogus = 1\n",
			`test.hcl:3: Unsupported argument; An argument named "bogus" is not expected here.`},
		{"unknown key in block", base + "cache {\n  expire = \"5s\"\n}\n",
			`test.hcl:4: Unsupported argument; An argument named "expire" is not expected here.`},
		{"unknown block", base + "discovery {\n}\n",
			`test.hcl:3: Unsupported block type`},
		{"duplicate block", base + "cache {\n}\ncache {\n}\n",
			`test.hcl:5: Duplicate cache block`},
		{"listener without name", base + "listener {\n  address = \"127.0.0.1:1144\"\n}\n",
			`test.hcl:3: Missing name for listener`},
		{"wrong type", base + "limits {\n  max_literal = \"big\"\n}\n",
			`test.hcl:4: Unsuitable value type`},
		{"syntax error", base + "cache {\n  expiration = \n}\n",
			`test.hcl:4: `},
		{"invalid duration", base + "cache {\n  expiration = \"5x\"\n}\n",
			`test.hcl:4: cache.expiration: invalid duration "5x"`},
		{"zero duration", base + "timeouts {\n  check = \"0s\"\n}\n",
			`test.hcl:4: timeouts.check: must be positive, got 0s`},
		{"negative keepalive", base + "upstream {\n  tcp_keepalive = \"-1s\"\n}\n",
			`test.hcl:4: upstream.tcp_keepalive: must not be negative`},
		{"negative login failure delay", base + "limits {\n  login_failure_delay = \"-1s\"\n}\n",
			`test.hcl:4: limits.login_failure_delay: must not be negative`},
		{"negative pre-login limit per address", base + "limits {\n  max_preauth_per_ip = -1\n}\n",
			`test.hcl:4: limits.max_preauth_per_ip: must be at least 0`},
		{"pre-login command bound too small", base + "limits {\n  max_command_preauth = 100\n}\n",
			`test.hcl:4: limits.max_command_preauth: must be at least 1024`},
		{"log level", base + "log_level = \"loud\"\n",
			`test.hcl:3: log_level: invalid value "loud" (want trace, debug, info, warn, error)`},
		{"log format", base + "log_format = \"xml\"\n",
			`test.hcl:3: log_format: invalid value "xml"`},
		{"listener tls", base + "listener \"x\" {\n  address = \"127.0.0.1:1144\"\n  tls = \"ssl\"\n}\n",
			`test.hcl:5: listener.x.tls: invalid value "ssl"`},
		{"backend tls", base + "backend \"b2\" {\n  address = \"127.0.0.1:10144\"\n  tls = \"ssl\"\n}\n",
			`test.hcl:5: backend.b2.tls: invalid value "ssl"`},
		{"upstream tls", base + "upstream {\n  tls = \"yes\"\n}\n",
			`test.hcl:4: upstream.tls: invalid value "yes"`},
		{"login method", base + "upstream {\n  login_method = \"digest\"\n}\n",
			`test.hcl:4: upstream.login_method: invalid value "digest"`},
		{"min version", base + "client_tls {\n  min_version = \"1.1\"\n}\n",
			`test.hcl:4: client_tls.min_version: invalid value "1.1"`},
		{"missing port", base + "backend \"b2\" {\n  address = \"127.0.0.1\"\n}\n",
			`test.hcl:4: backend.b2.address: address 127.0.0.1: missing port in address`},
		{"port out of range", base + "backend \"b2\" {\n  address = \"127.0.0.1:70000\"\n}\n",
			`test.hcl:4: backend.b2.address: invalid port "70000" (want 1-65535)`},
		{"backend without host", base + "backend \"b2\" {\n  address = \":10144\"\n}\n",
			`test.hcl:4: backend.b2.address: missing host in ":10144"`},
		{"address missing", base + "backend \"b2\" {\n}\n",
			`test.hcl:3: backend.b2.address: required`},
		{"duplicate listener name", base + "listener \"imap\" {\n  address = \"127.0.0.1:1144\"\n}\n",
			`test.hcl:3: listener.imap: duplicate listener name "imap"`},
		{"duplicate backend name", base + "backend \"b1\" {\n  address = \"127.0.0.1:10144\"\n}\n",
			`test.hcl:3: backend.b1: duplicate backend name "b1"`},
		{"duplicate backend address", base + "backend \"b2\" {\n  address = \"127.0.0.1:10143\"\n}\n",
			`test.hcl:4: backend.b2.address: 127.0.0.1:10143 is already used by backend.b1`},
		{"backend is a listener", base + "backend \"b2\" {\n  address = \"127.0.0.1:1143\"\n}\n",
			`test.hcl:4: backend.b2.address: 127.0.0.1:1143 is already used by listener.imap`},
		{"weight", base + "backend \"b2\" {\n  address = \"127.0.0.1:10144\"\n  weight = 0\n}\n",
			`test.hcl:5: backend.b2.weight: must be at least 1, got 0`},
		{"dial retries", base + "upstream {\n  dial_retries = -1\n}\n",
			`test.hcl:4: upstream.dial_retries: must be at least 0, got -1`},
		{"max connections", base + "cache {\n  max_connections = 0\n}\n",
			`test.hcl:4: cache.max_connections: must be at least 1, got 0`},
		{"max line length", base + "limits {\n  max_line_length = 100\n}\n",
			`test.hcl:4: limits.max_line_length: must be at least 1024, got 100`},
		{"max literal", base + "limits {\n  max_literal = 0\n}\n",
			`test.hcl:4: limits.max_literal: must be at least 1, got 0`},
		{"tls listener without certificate", base + "listener \"imaps\" {\n  address = \"127.0.0.1:1993\"\n  tls = \"implicit\"\n}\n",
			`test.hcl:5: client_tls.key_file: required because listener.imaps uses tls "implicit"`},
		{"key without certificate", base + "client_tls {\n  key_file = \"k.pem\"\n}\n",
			`test.hcl:3: client_tls.cert_file: cert_file and key_file must be set together`},
		{"certificate files absent", base + "client_tls {\n  cert_file = \"" + absent + "\"\n  key_file = \"" + absent + "\"\n}\n",
			`test.hcl:4: client_tls.cert_file: open ` + absent + `: no such file or directory`},
		{"tls for login without tls listener", base + "client_tls {\n  require_tls_for_login = true\n}\n",
			`test.hcl:4: client_tls.require_tls_for_login: no listener offers TLS`},
		{"ca file absent", base + "upstream {\n  ca_file = \"" + absent + "\"\n}\n",
			`test.hcl:4: upstream.ca_file: open ` + absent + `: no such file or directory`},
		{"ca file not PEM", base + "upstream {\n  ca_file = \"" + notPEM + "\"\n}\n",
			`test.hcl:4: upstream.ca_file: no PEM certificates in ` + notPEM},
		{"no listener", "backend \"b1\" { address = \"127.0.0.1:10143\" }\n",
			`test.hcl:1: listener: at least one listener block is required`},
		{"no backend", "listener \"imap\" { address = \"127.0.0.1:1143\" }\n",
			`test.hcl:1: backend: at least one backend block (or a consul block) is required`},
	}
	positioned := regexp.MustCompile(`^test\.hcl:\d+: `)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.src), "test.hcl")
			if err == nil {
				t.Fatalf("Parse = %+v, want error %q", c, tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse error =\n%v\nwant it to contain\n%s", err, tt.want)
			}
			for _, e := range unwrap(err) {
				if !positioned.MatchString(e.Error()) {
					t.Errorf("error %q does not start with test.hcl:LINE:", e)
				}
			}
		})
	}
}

func TestParseReportsEveryProblemInFileOrder(t *testing.T) {
	src := `log_level = "loud"
listener "imap" {
  address = "127.0.0.1"
  colour  = "blue"
}
cache {
  expiration = "5x"
}
timeouts {
  drain = "0s"
}
limits {
  max_literal = 0
}
backend "b1" {
  address = "127.0.0.1:10143"
  weight  = "heavy"
}
`
	_, err := Parse([]byte(src), "test.hcl")
	want := []string{
		`test.hcl:1: log_level: invalid value "loud"`,
		`test.hcl:3: listener.imap.address: address 127.0.0.1: missing port in address`,
		`test.hcl:4: Unsupported argument; An argument named "colour" is not expected here.`,
		`test.hcl:7: cache.expiration: invalid duration "5x"`,
		`test.hcl:10: timeouts.drain: must be positive, got 0s`,
		`test.hcl:13: limits.max_literal: must be at least 1, got 0`,
		`test.hcl:17: Unsuitable value type`, // and not also "weight: must be at least 1"
	}
	got := unwrap(err)
	if len(got) != len(want) {
		t.Fatalf("Parse reported %d problems, want %d:\n%v", len(got), len(want), err)
	}
	for i := range want {
		if !strings.Contains(got[i].Error(), want[i]) {
			t.Errorf("problem %d = %q, want it to contain %q", i, got[i], want[i])
		}
	}
}

func TestValidateWithoutPositions(t *testing.T) {
	c := defaults()
	c.Listeners = []Listener{{Name: "imap", Address: "127.0.0.1:1143", TLS: "none"}}
	c.Backends = []backend.Backend{{ID: "b1", Addr: "127.0.0.1:10143", Weight: 1}}
	if err := c.Validate(); err != nil {
		t.Fatalf("Validate(valid) = %v, want nil", err)
	}

	c.Cache.MaxConnections = 0
	c.Backends[0].TLS = "ssl"
	got := unwrap(c.Validate())
	want := []string{
		`backend.b1.tls: invalid value "ssl" (want none, starttls, implicit)`,
		`cache.max_connections: must be at least 1, got 0`,
	}
	if len(got) != len(want) {
		t.Fatalf("Validate = %v, want %q", got, want)
	}
	for i := range want {
		if got[i].Error() != want[i] {
			t.Errorf("problem %d = %q, want %q", i, got[i], want[i])
		}
	}
}

func unwrap(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	if err != nil {
		return []error{err}
	}
	return nil
}

func TestConsulBlock(t *testing.T) {
	tests := []struct {
		name string
		src  string
		err  string // "" = valid
	}{
		{"consul only", `listener "imap" { address = "127.0.0.1:1143" }
consul { service = "imap" }`, ""},
		{"consul without service", `listener "imap" { address = "127.0.0.1:1143" }
consul { tag = "x" }`, "test.hcl:2: consul: service is required"},
		{"consul and backends", `listener "imap" { address = "127.0.0.1:1143" }
backend "b" { address = "127.0.0.1:143" }
consul { service = "imap" }`, "test.hcl:2: backend: backend blocks and a consul block exclude each other"},
		{"bad hash key", `listener "imap" { address = "127.0.0.1:1143" }
backend "b" { address = "127.0.0.1:143" }
cluster { hash_key = "upper" }`, "test.hcl:3: cluster.hash_key"},
		{"bad scheme", `listener "imap" { address = "127.0.0.1:1143" }
consul {
  service = "imap"
  scheme = "ftp"
}`, "test.hcl:4: consul.scheme"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.src), "test.hcl")
			if tt.err == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if c.Consul == nil || c.Consul.Service != "imap" || c.Consul.WaitTime != 5*time.Minute {
					t.Fatalf("Consul = %+v, want service imap with the default wait", c.Consul)
				}
				if c.Cluster.HashKey != "lowercase" || c.Cluster.BackendDrain != 30*time.Second {
					t.Fatalf("Cluster defaults = %+v", c.Cluster)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Fatalf("Parse error = %v, want it to contain %q", err, tt.err)
			}
		})
	}
}
