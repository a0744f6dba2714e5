package proxy

import "github.com/imapproxy/imapproxy/backend"

// The tests predate the backend package and name its types as this
// package once did.
type Backend = backend.Backend

const (
	TLSNone     = backend.TLSNone
	TLSStartTLS = backend.TLSStartTLS
	TLSImplicit = backend.TLSImplicit
)
