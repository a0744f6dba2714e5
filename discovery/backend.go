// Package discovery finds the upstream IMAP servers: a Consul watcher that
// follows a service's healthy instances with blocking queries, and a static
// list. Both emit sorted, de-duplicated backend sets through an update
// callback, which a Damper may stand between to hold back flapping
// backends; the package knows nothing of pools or balancers. A Registrar
// keeps the proxy's own service registered with the local Consul agent.
package discovery

import (
	"cmp"
	"slices"
)

// TLS modes a backend may ask for (Backend.TLS, Consul meta "imap_tls").
const (
	TLSNone     = "none"
	TLSStartTLS = "starttls"
	TLSImplicit = "implicit"
)

// validTLS reports whether s is a TLS mode: "" (the proxy default) or one
// of the TLS* constants.
func validTLS(s string) bool {
	switch s {
	case "", TLSNone, TLSStartTLS, TLSImplicit:
		return true
	}
	return false
}

// Backend is one upstream IMAP server as discovered.
type Backend struct {
	ID     string // stable identity: Consul service ID (or static name)
	Addr   string // host:port (IPv6 bracketed via net.JoinHostPort)
	Weight int    // >= 1
	TLS    string // "" (use the proxy default) | "none" | "starttls" | "implicit"
}

// Normalize returns bs sorted by ID with later duplicates of an ID dropped
// (the first one in bs is kept). It does not modify bs; the result is
// never nil, so an empty set and "no set yet" stay distinguishable.
func Normalize(bs []Backend) []Backend {
	out := make([]Backend, len(bs))
	copy(out, bs)
	// A stable sort keeps the first of equal IDs in front.
	slices.SortStableFunc(out, func(a, b Backend) int { return cmp.Compare(a.ID, b.ID) })
	return slices.CompactFunc(out, func(a, b Backend) bool { return a.ID == b.ID })
}

// Equal reports whether a and b hold the same backends in the same order.
// Compare normalized sets; nil and empty are equal.
func Equal(a, b []Backend) bool {
	return slices.Equal(a, b)
}
