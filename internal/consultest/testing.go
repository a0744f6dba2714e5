package consultest

import (
	"net"
	"os"
	"testing"
)

// RequireEnv, set to "1", turns StartT's skip (no consul binary) into a
// failure, for CI.
const RequireEnv = "IMAPPROXY_REQUIRE_CONSUL"

// StartT starts an agent for a test and stops it in t.Cleanup. Without a
// consul binary the test is skipped, unless IMAPPROXY_REQUIRE_CONSUL=1,
// when it fails. If the test failed, the tail of the agent's log is
// logged before the stop.
func StartT(t testing.TB) *Agent {
	t.Helper()
	if _, err := Binary(); err != nil {
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%v (%s=1)", err, RequireEnv)
		}
		t.Skipf("%v (set %s=1 to fail instead)", err, RequireEnv)
	}
	a, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("consul agent %s log tail:\n%s", a.Addr, a.tail())
		}
		if err := a.Stop(); err != nil {
			t.Errorf("stop consul agent: %v", err)
		}
	})
	return a
}

// CheckTarget opens a listener on 127.0.0.1 that accepts and closes
// connections until the test ends: all a service's TCP check needs to pass.
func CheckTarget(t testing.TB) (host string, port int) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	a := l.Addr().(*net.TCPAddr)
	return a.IP.String(), a.Port
}
