// Package backend names an upstream IMAP server and how connections to it
// are secured. It is the one vocabulary that the configuration, discovery,
// the balancer, the backend set and the IMAP client toward backends share,
// so that a backend travels from the file or Consul to a dial without
// conversions. It imports nothing of ours.
package backend

import (
	"cmp"
	"fmt"
	"slices"
)

// TLSMode is how an IMAP connection is secured. The same three modes name
// how a listener meets its clients and how the proxy reaches a backend.
type TLSMode string

const (
	// TLSDefault, on a backend, defers to the proxy's upstream default.
	TLSDefault  TLSMode = ""
	TLSNone     TLSMode = "none"
	TLSStartTLS TLSMode = "starttls" // STARTTLS after the greeting
	TLSImplicit TLSMode = "implicit" // TLS from the first byte (port 993)
)

// Modes lists the modes a configuration may name, in the order documented.
var Modes = []TLSMode{TLSNone, TLSStartTLS, TLSImplicit}

// ParseTLSMode returns the mode s names; "" is TLSDefault.
func ParseTLSMode(s string) (TLSMode, error) {
	switch m := TLSMode(s); m {
	case TLSDefault, TLSNone, TLSStartTLS, TLSImplicit:
		return m, nil
	}
	return "", fmt.Errorf("unknown TLS mode %q (want none, starttls or implicit)", s)
}

// Or returns m, or def when m is TLSDefault.
func (m TLSMode) Or(def TLSMode) TLSMode { return cmp.Or(m, def) }

// Backend is one upstream IMAP server.
type Backend struct {
	// ID is the stable identity: the hash input that places users, and
	// the name of the backend's cache table. A Consul service ID or the
	// name of a static backend block.
	ID     string
	Addr   string  // host:port, IPv6 bracketed
	Weight int     // >= 1; the share of users relative to the others
	TLS    TLSMode // TLSDefault: the proxy's upstream default
}

// Same reports whether b and o are one server: the same ID, address and
// TLS mode. The weight only ranks users; a change of it is no reason to
// drop a connection.
func (b Backend) Same(o Backend) bool {
	return b.ID == o.ID && b.Addr == o.Addr && b.TLS == o.TLS
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
func Equal(a, b []Backend) bool { return slices.Equal(a, b) }
