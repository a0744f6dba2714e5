package discovery

import (
	"context"

	"github.com/imapproxy/imapproxy/backend"
)

// Static is a fixed backend set, for configs without Consul. The zero
// value is an empty set.
type Static struct {
	Backends []backend.Backend
}

// Run calls update once with the normalized set, then blocks until ctx is
// done and returns nil.
func (s *Static) Run(ctx context.Context, update func([]backend.Backend)) error {
	update(backend.Normalize(s.Backends))
	<-ctx.Done()
	return nil
}
