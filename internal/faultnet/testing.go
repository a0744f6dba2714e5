package faultnet

import "testing"

// ListenT starts a Proxy to target for a test and closes it in t.Cleanup,
// failing the test if Close fails.
func ListenT(t testing.TB, target string) *Proxy {
	t.Helper()
	p, err := Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("faultnet: close proxy to %s: %v", target, err)
		}
	})
	return p
}
