package balancer

import "github.com/imapproxy/imapproxy/backend"

// The tests predate the backend package and name its type as this package
// once did.
type Backend = backend.Backend
