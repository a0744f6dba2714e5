package main

import (
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/config"
)

// TestServerOptionsNone: a 0 in the file ("none") reaches proxy.Options as
// -1, since 0 there means the default; other values pass as they are.
func TestServerOptionsNone(t *testing.T) {
	const base = "listener \"imap\" {\n  address = \"127.0.0.1:1143\"\n}\nbackend \"b1\" {\n  address = \"127.0.0.1:10143\"\n}\n"
	tests := []struct {
		name                    string
		limits                  string
		failures, perIP         int
		delay                   time.Duration
		userLen, passLen, cmdSz int
	}{
		{"defaults", "", 3, 100, time.Second, 256, 4096, 40960},
		{"none", "max_login_failures = 0\nmax_preauth_per_ip = 0\nlogin_failure_delay = \"0s\"\n", -1, -1, -1, 256, 4096, 40960},
		{"set", "max_login_failures = 5\nmax_preauth_per_ip = 7\nlogin_failure_delay = \"2s\"\nmax_user_length = 100\nmax_password_length = 200\nmax_command_preauth = 2048\n",
			5, 7, 2 * time.Second, 100, 200, 2048},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := config.Parse([]byte(base+"limits {\n"+tt.limits+"}\n"), "test.hcl")
			if err != nil {
				t.Fatal(err)
			}
			o, err := serverOptions(cfg, hclog.NewNullLogger(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if o.MaxLoginFailures != tt.failures || o.MaxPreAuthPerIP != tt.perIP || o.LoginFailureDelay != tt.delay ||
				o.MaxUserLength != tt.userLen || o.MaxPasswordLength != tt.passLen || o.MaxCommandPreAuth != tt.cmdSz {
				t.Errorf("options = failures %d, per ip %d, delay %v, user %d, password %d, command %d; want %d, %d, %v, %d, %d, %d",
					o.MaxLoginFailures, o.MaxPreAuthPerIP, o.LoginFailureDelay, o.MaxUserLength, o.MaxPasswordLength, o.MaxCommandPreAuth,
					tt.failures, tt.perIP, tt.delay, tt.userLen, tt.passLen, tt.cmdSz)
			}
		})
	}
}
