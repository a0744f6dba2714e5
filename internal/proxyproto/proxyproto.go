// Package proxyproto reads the PROXY protocol header (versions 1 and 2)
// that a load balancer such as HAProxy sends ahead of a client's bytes, so
// that the proxy sees the client's address rather than the balancer's.
//
// Anyone can send a header and claim any address, so a server should read
// one only from peers it trusts (see Trusted), and from those it should
// require one.
//
// The format is specified in
// https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.
package proxyproto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var (
	// ErrNoHeader means the connection does not start with a PROXY
	// signature: the peer is not speaking the PROXY protocol at all.
	ErrNoHeader = errors.New("proxyproto: no PROXY header")
	// ErrMalformed is wrapped by the errors for a header that starts with
	// a signature but breaks the spec; their text names what was wrong.
	ErrMalformed = errors.New("proxyproto: malformed header")
)

// Header is what a PROXY header says about the connection.
type Header struct {
	Version int // 1 or 2
	// Local means the header carries no client address (a v2 LOCAL
	// command, a v2 AF_UNSPEC or AF_UNIX block, or a v1 UNKNOWN line):
	// the connection's own addresses are the ones to use.
	Local        bool
	Source, Dest netip.AddrPort // zero if Local
	// TLVs are the v2 type-length-value extensions, kept raw because
	// nothing here needs them yet. Nil for v1 and for LOCAL.
	TLVs []TLV
}

// TLV is one v2 extension. Value aliases the header's buffer.
type TLV struct {
	Type  byte
	Value []byte
}

const (
	sigV1 = "PROXY "
	sigV2 = "\r\n\r\n\x00\r\nQUIT\n"
	// maxV1 is the spec's bound on a v1 line, CRLF included.
	maxV1 = 107
	// maxV2 caps the v2 block: room for the largest addresses (AF_UNIX,
	// 216 bytes) and far more TLVs than HAProxy or the cloud balancers
	// send, while a peer cannot make us buffer the 64 KiB the length
	// field allows.
	maxV2 = 216 + 2048
)

// Read reads one PROXY header from r. It reads v1 a byte at a time and v2
// by its announced length, never past the header, so that the client's
// first bytes stay in r for whoever reads next. On error an unknown part
// of r has been consumed and the connection is of no further use.
func Read(r io.Reader) (*Header, error) {
	var b [16]byte
	if _, err := io.ReadFull(r, b[:1]); err != nil {
		return nil, fmt.Errorf("proxyproto: read header: %w", err)
	}
	switch b[0] {
	case sigV1[0]:
		return readV1(r)
	case sigV2[0]:
		if err := readMore(r, b[1:]); err != nil {
			return nil, err
		}
		if string(b[:len(sigV2)]) != sigV2 {
			return nil, ErrNoHeader
		}
		return readV2(r, b)
	}
	return nil, ErrNoHeader
}

// readMore reads the rest of a header whose first byte is in: running
// out of input there is a truncated header, never a clean EOF.
func readMore(r io.Reader, b []byte) error {
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("proxyproto: read header: %w", err)
	}
	return nil
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

func readV1(r io.Reader) (*Header, error) {
	var buf [maxV1]byte
	buf[0] = sigV1[0]
	n := 1
	for buf[n-1] != '\n' {
		if n == len(buf) {
			return nil, malformed("v1: no LF within %d bytes", maxV1)
		}
		if err := readMore(r, buf[n:n+1]); err != nil {
			return nil, err
		}
		n++
		// Checked as it arrives, so that a peer sending something else
		// is told ErrNoHeader rather than made to fill 107 bytes.
		if n <= len(sigV1) && buf[n-1] != sigV1[n-1] {
			return nil, ErrNoHeader
		}
	}
	if buf[n-2] != '\r' {
		return nil, malformed("v1: LF without CR")
	}
	return parseV1(string(buf[len(sigV1) : n-2]))
}

// parseV1 parses a v1 line after "PROXY " and before CRLF.
func parseV1(s string) (*Header, error) {
	proto, rest, _ := strings.Cut(s, " ")
	switch proto {
	case "UNKNOWN":
		// The spec has the receiver ignore whatever follows UNKNOWN.
		return &Header{Version: 1, Local: true}, nil
	case "TCP4", "TCP6":
	default:
		return nil, malformed("v1: protocol %q", proto)
	}
	f := strings.Split(rest, " ")
	if len(f) != 4 {
		return nil, malformed("v1: %d fields after %s, want 4 single-spaced", len(f), proto)
	}
	v6 := proto == "TCP6"
	src, err := parseV1Addr(f[0], f[2], v6, "source")
	if err != nil {
		return nil, err
	}
	dst, err := parseV1Addr(f[1], f[3], v6, "destination")
	if err != nil {
		return nil, err
	}
	return &Header{Version: 1, Source: src, Dest: dst}, nil
}

func parseV1Addr(addr, port string, v6 bool, which string) (netip.AddrPort, error) {
	a, err := netip.ParseAddr(addr)
	// Is6 is also true of "::ffff:1.2.3.4", which a TCP6 line may carry.
	if err != nil || a.Is4() == v6 || a.Zone() != "" {
		return netip.AddrPort{}, malformed("v1: %s address %q", which, addr)
	}
	// The spec forbids leading zeros, lest a port be read as octal;
	// ParseUint already refuses signs and anything over 65535.
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || len(port) > 1 && port[0] == '0' {
		return netip.AddrPort{}, malformed("v1: %s port %q", which, port)
	}
	return netip.AddrPortFrom(a, uint16(p)), nil
}

// v2 fields, from the spec.
const (
	cmdLocal  = 0
	cmdProxy  = 1
	famUnspec = 0
	famInet   = 1
	famInet6  = 2
	famUnix   = 3
	stream    = 1
)

// readV2 reads the block after the 16 fixed bytes in hdr.
func readV2(r io.Reader, hdr [16]byte) (*Header, error) {
	if v := hdr[12] >> 4; v != 2 {
		return nil, malformed("v2: version %d", v)
	}
	cmd := hdr[12] & 0xf
	if cmd != cmdLocal && cmd != cmdProxy {
		return nil, malformed("v2: command %d", cmd)
	}
	n := int(binary.BigEndian.Uint16(hdr[14:]))
	if n > maxV2 {
		return nil, malformed("v2: length %d over %d", n, maxV2)
	}
	b := make([]byte, n)
	if err := readMore(r, b); err != nil {
		return nil, err
	}
	h := &Header{Version: 2}
	if cmd == cmdLocal {
		// The spec has the receiver discard a LOCAL block, family and
		// all: it is the balancer's own connection, a health check.
		h.Local = true
		return h, nil
	}
	fam, transport := hdr[13]>>4, hdr[13]&0xf
	var alen int
	switch fam {
	case famUnspec:
		h.Local = true
	case famInet, famInet6:
		// An IMAP client can only have come over a stream.
		if transport != stream {
			return nil, malformed("v2: transport %d, want STREAM", transport)
		}
		alen = 12
		if fam == famInet6 {
			alen = 36
		}
	case famUnix:
		// A socket path is no address to log or limit by.
		h.Local = true
		alen = 216
	default:
		return nil, malformed("v2: address family %d", fam)
	}
	if len(b) < alen {
		return nil, malformed("v2: %d-byte block, addresses need %d", len(b), alen)
	}
	port := func(i int) uint16 { return binary.BigEndian.Uint16(b[i:]) }
	switch fam {
	case famInet:
		h.Source = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[0:4])), port(8))
		h.Dest = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port(10))
	case famInet6:
		h.Source = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[0:16])), port(32))
		h.Dest = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[16:32])), port(34))
	}
	var err error
	h.TLVs, err = parseTLVs(b[alen:])
	if err != nil {
		return nil, err
	}
	return h, nil
}

func parseTLVs(b []byte) ([]TLV, error) {
	var tlvs []TLV
	for len(b) > 0 {
		if len(b) < 3 {
			return nil, malformed("v2: %d stray bytes after the last TLV", len(b))
		}
		n := 3 + int(binary.BigEndian.Uint16(b[1:3]))
		if n > len(b) {
			return nil, malformed("v2: TLV %#02x overruns the block by %d bytes", b[0], n-len(b))
		}
		// Capped so that appending to one Value cannot overwrite the next.
		tlvs = append(tlvs, TLV{Type: b[0], Value: b[3:n:n]})
		b = b[n:]
	}
	return tlvs, nil
}

// Conn is a connection that began with a PROXY header. Its RemoteAddr is
// the client the header names, unless the header is Local. LocalAddr is
// left alone: it still tells which of the proxy's listeners was reached.
type Conn struct {
	net.Conn
	h      *Header
	remote net.Addr
}

// Accept reads the PROXY header at the start of c and returns c wrapped.
// The header must arrive within timeout (zero: no limit), since a
// balancer sends it at once and a stalled peer should not hold a
// goroutine; when timeout is set, Accept clears c's read deadline before
// it returns.
//
// On error the caller still owns c and should close it. The error is
// ErrNoHeader, or wraps ErrMalformed, os.ErrDeadlineExceeded or the read
// error.
func Accept(c net.Conn, timeout time.Duration) (*Conn, error) {
	if timeout > 0 {
		if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return nil, fmt.Errorf("proxyproto: set deadline: %w", err)
		}
	}
	h, err := Read(c)
	if err != nil {
		return nil, err
	}
	if timeout > 0 {
		if err := c.SetReadDeadline(time.Time{}); err != nil {
			return nil, fmt.Errorf("proxyproto: clear deadline: %w", err)
		}
	}
	pc := &Conn{Conn: c, h: h, remote: c.RemoteAddr()}
	if !h.Local {
		pc.remote = net.TCPAddrFromAddrPort(h.Source)
	}
	return pc, nil
}

// RemoteAddr returns the client's address from the header, or the
// connection's own peer if the header is Local.
// SyscallConn gives the socket to code that waits for readability without
// a buffer (imapwire does, so an idle session holds none). Read consumed
// exactly the header, so nothing is buffered ahead of the socket.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// Header returns the header the connection began with.
func (c *Conn) Header() *Header { return c.h }

// Trusted lists the networks whose peers may send a PROXY header. The nil
// Trusted contains nothing.
type Trusted []netip.Prefix

// ParseTrusted parses networks ("10.0.0.0/8") and single addresses
// ("127.0.0.1", "::1"). It reports every bad entry, not just the first.
func ParseTrusted(ss []string) (Trusted, error) {
	var t Trusted
	var errs []error
	for _, s := range ss {
		p, err := parsePrefix(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("proxyproto: trusted %q: %w", s, err))
			continue
		}
		t = append(t, p)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return t, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return p, err
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return p, err
		}
		// PrefixFrom would drop the zone and silently widen the entry
		// to that address on every interface.
		if a.Zone() != "" {
			return p, errors.New("zones are not supported")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	// Contains unmaps peers, so a mapped entry must be unmapped too or it
	// would never match.
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return p, errors.New("IPv4-mapped prefix shorter than /96")
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// Contains reports whether addr, a *net.TCPAddr or anything else with an
// AddrPort method, lies in one of t's networks. IPv4 peers are matched as
// IPv4 even when a dual-stack listener reports them as ::ffff:a.b.c.d.
func (t Trusted) Contains(addr net.Addr) bool {
	a, ok := addr.(interface{ AddrPort() netip.AddrPort })
	if !ok {
		return false
	}
	ip := a.AddrPort().Addr().WithZone("").Unmap()
	for _, p := range t {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
