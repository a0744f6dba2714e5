package proxy

import (
	"context"
	"testing"
	"time"
)

// settle waits until the pool has finished closing connections in the
// background (they log out off the caller's path).
func (p *testProxy) settle(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.srv.Pool().WaitCloses(ctx); err != nil {
		t.Fatalf("pool still closing connections: %v", err)
	}
}
