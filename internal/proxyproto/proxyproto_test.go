package proxyproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// v2 builds a v2 header from its command and family bytes and a block,
// with the length filled in.
func v2(verCmd, famTransport byte, block ...[]byte) []byte {
	b := append([]byte(sigV2), verCmd, famTransport, 0, 0)
	for _, p := range block {
		b = append(b, p...)
	}
	binary.BigEndian.PutUint16(b[14:], uint16(len(b)-16))
	return b
}

// addrs is a v2 address block: source and destination addresses, then
// their ports.
func addrs(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	b := append(s.Addr().AsSlice(), d.Addr().AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, s.Port())
	return binary.BigEndian.AppendUint16(b, d.Port())
}

func tlv(typ byte, v string) []byte {
	return append(binary.BigEndian.AppendUint16([]byte{typ}, uint16(len(v))), v...)
}

func join(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// v1Line is what a sender writes for h.
func v1Line(h *Header) string {
	if h.Local {
		return "PROXY UNKNOWN\r\n"
	}
	proto := "TCP4"
	if h.Source.Addr().Is6() {
		proto = "TCP6"
	}
	return fmt.Sprintf("PROXY %s %s %s %d %d\r\n", proto,
		h.Source.Addr(), h.Dest.Addr(), h.Source.Port(), h.Dest.Port())
}

// v2Header is what a sender writes for a non-Local h.
func v2Header(h *Header) []byte {
	fam := byte(famInet6<<4 | stream)
	if h.Source.Addr().Is4() {
		fam = famInet<<4 | stream
	}
	b := addrs(h.Source.String(), h.Dest.String())
	for _, t := range h.TLVs {
		b = append(b, tlv(t.Type, string(t.Value))...)
	}
	return v2(0x21, fam, b)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

var readTests = []struct {
	name string
	in   []byte
	want *Header // nil: an error wrapping err
	err  error
}{
	// v1, valid.
	{"v1 tcp4", []byte("PROXY TCP4 192.0.2.1 198.51.100.2 56324 143\r\n"),
		&Header{Version: 1, Source: ap("192.0.2.1:56324"), Dest: ap("198.51.100.2:143")}, nil},
	{"v1 tcp6", []byte("PROXY TCP6 2001:db8::1 2001:DB8::2 56324 993\r\n"),
		&Header{Version: 1, Source: ap("[2001:db8::1]:56324"), Dest: ap("[2001:db8::2]:993")}, nil},
	{"v1 tcp6 mapped", []byte("PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"),
		&Header{Version: 1, Source: ap("[::ffff:192.0.2.1]:1"), Dest: ap("[::1]:2")}, nil},
	{"v1 port bounds", []byte("PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n"),
		&Header{Version: 1, Source: ap("0.0.0.0:0"), Dest: ap("255.255.255.255:65535")}, nil},
	{"v1 longest tcp6", []byte("PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"),
		&Header{Version: 1, Source: ap("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"), Dest: ap("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535")}, nil},
	{"v1 unknown", []byte("PROXY UNKNOWN\r\n"), &Header{Version: 1, Local: true}, nil},
	{"v1 unknown with junk", []byte("PROXY UNKNOWN whatever 1 2 3\r\n"), &Header{Version: 1, Local: true}, nil},
	{"v1 unknown 107 bytes", []byte("PROXY UNKNOWN " + strings.Repeat("f", 91) + "\r\n"), &Header{Version: 1, Local: true}, nil},

	// v1, invalid.
	{"empty", nil, nil, io.EOF},
	{"imap command", []byte("a1 LOGIN u p\r\n"), nil, ErrNoHeader},
	{"v1 bad signature", []byte("PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), nil, ErrNoHeader},
	{"v1 no space after PROXY", []byte("PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n"), nil, ErrNoHeader},
	{"v1 truncated", []byte("PROXY TCP4 192.0.2.1 "), nil, io.ErrUnexpectedEOF},
	{"v1 108 bytes", []byte("PROXY UNKNOWN " + strings.Repeat("f", 92) + "\r\n"), nil, ErrMalformed},
	{"v1 LF only", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), nil, ErrMalformed},
	{"v1 CR CR LF", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n"), nil, ErrMalformed},
	{"v1 empty line", []byte("PROXY \r\n"), nil, ErrMalformed},
	{"v1 lowercase proto", []byte("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 udp", []byte("PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 unknownx", []byte("PROXY UNKNOWNX\r\n"), nil, ErrMalformed},
	{"v1 no fields", []byte("PROXY TCP4\r\n"), nil, ErrMalformed},
	{"v1 three fields", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), nil, ErrMalformed},
	{"v1 five fields", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"), nil, ErrMalformed},
	{"v1 double space", []byte("PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 trailing space", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"), nil, ErrMalformed},
	{"v1 tcp4 with v6", []byte("PROXY TCP4 ::1 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 tcp6 with v4", []byte("PROXY TCP6 ::1 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 octal-looking address", []byte("PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 short address", []byte("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"), nil, ErrMalformed},
	{"v1 zone", []byte("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"), nil, ErrMalformed},
	{"v1 port leading zero", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 0143 2\r\n"), nil, ErrMalformed},
	{"v1 port too big", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n"), nil, ErrMalformed},
	{"v1 port sign", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n"), nil, ErrMalformed},
	{"v1 port negative", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n"), nil, ErrMalformed},
	{"v1 port hex", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n"), nil, ErrMalformed},
	{"v1 port junk", []byte("PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n"), nil, ErrMalformed},

	// v2, valid.
	{"v2 inet", v2(0x21, 0x11, addrs("192.0.2.1:56324", "198.51.100.2:143")),
		&Header{Version: 2, Source: ap("192.0.2.1:56324"), Dest: ap("198.51.100.2:143")}, nil},
	{"v2 inet6", v2(0x21, 0x21, addrs("[2001:db8::1]:56324", "[2001:db8::2]:993")),
		&Header{Version: 2, Source: ap("[2001:db8::1]:56324"), Dest: ap("[2001:db8::2]:993")}, nil},
	{"v2 tlvs", v2(0x21, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"), tlv(0x01, "imap"), tlv(0x04, ""), tlv(0xea, "\x01vpce-0123")),
		&Header{Version: 2, Source: ap("192.0.2.1:1"), Dest: ap("198.51.100.2:2"), TLVs: []TLV{
			{0x01, []byte("imap")}, {0x04, []byte{}}, {0xea, []byte("\x01vpce-0123")}}}, nil},
	{"v2 local", v2(0x20, 0x00), &Header{Version: 2, Local: true}, nil},
	{"v2 local discards block", v2(0x20, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"), []byte{0xff}),
		&Header{Version: 2, Local: true}, nil},
	{"v2 unspec", v2(0x21, 0x00, tlv(0x04, "x")), &Header{Version: 2, Local: true, TLVs: []TLV{{0x04, []byte("x")}}}, nil},
	{"v2 unix", v2(0x21, 0x31, make([]byte, 216)), &Header{Version: 2, Local: true}, nil},

	// v2, invalid.
	{"v2 bad signature", []byte("\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x00"), nil, ErrNoHeader},
	{"v2 truncated fixed part", []byte(sigV2[:9]), nil, io.ErrUnexpectedEOF},
	{"v2 truncated block", v2(0x21, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"))[:20], nil, io.ErrUnexpectedEOF},
	{"v2 version 1", v2(0x11, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 command 2", v2(0x22, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 family 4", v2(0x21, 0x41, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 dgram", v2(0x21, 0x12, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 unspec transport", v2(0x21, 0x10, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 inet short", v2(0x21, 0x11, make([]byte, 11)), nil, ErrMalformed},
	{"v2 inet6 with inet block", v2(0x21, 0x21, addrs("192.0.2.1:1", "198.51.100.2:2")), nil, ErrMalformed},
	{"v2 unix short", v2(0x21, 0x31, make([]byte, 215)), nil, ErrMalformed},
	{"v2 tlv overrun", v2(0x21, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"), []byte{0x01, 0x00, 0x0a, 'a', 'b'}), nil, ErrMalformed},
	{"v2 tlv header cut", v2(0x21, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"), tlv(0x01, "a"), []byte{0x01, 0x00}), nil, ErrMalformed},
	// Only the fixed part is there: the length must be refused before
	// any attempt to read the block.
	{"v2 too long", func() []byte {
		b := v2(0x21, 0x11)
		binary.BigEndian.PutUint16(b[14:], maxV2+1)
		return b
	}(), nil, ErrMalformed},
}

// TestRead checks each header and that Read consumes exactly the header,
// leaving the client's bytes that follow it.
func TestRead(t *testing.T) {
	const rest = "a1 CAPABILITY\r\n"
	for _, tc := range readTests {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.in
			if tc.want != nil {
				in = append(bytes.Clone(in), rest...)
			}
			r := bytes.NewReader(in)
			h, err := Read(r)
			if tc.want == nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Read(%q) = %+v, %v; want error %v", in, h, err, tc.err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(h, tc.want) {
				t.Fatalf("Read(%q) = %+v, %v; want %+v", in, h, err, tc.want)
			}
			if left, _ := io.ReadAll(r); string(left) != rest {
				t.Errorf("after Read(%q), left %q, want %q", in, left, rest)
			}
		})
	}
}

// TestAccept runs over loopback TCP, where the kernel holds the header and
// the client's command together, so any read-ahead would swallow some of
// the command.
func TestAccept(t *testing.T) {
	tests := []struct {
		name   string
		header []byte
		remote string // "": the socket's own peer
	}{
		{"v1", []byte("PROXY TCP4 192.0.2.1 198.51.100.2 56324 143\r\n"), "192.0.2.1:56324"},
		{"v2", v2(0x21, 0x21, addrs("[2001:db8::1]:56324", "[2001:db8::2]:143"), tlv(0x04, "pad")), "[2001:db8::1]:56324"},
		{"v1 unknown", []byte("PROXY UNKNOWN\r\n"), ""},
		{"v2 local", v2(0x20, 0x00), ""},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const cmd = "a1 LOGIN user pass\r\n"
			client, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			if _, err := client.Write(append(bytes.Clone(tc.header), cmd...)); err != nil {
				t.Fatal(err)
			}
			client.(*net.TCPConn).CloseWrite()
			c, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()

			pc, err := Accept(c, 10*time.Second)
			if err != nil {
				t.Fatalf("Accept: %v", err)
			}
			want := tc.remote
			if want == "" {
				want = client.LocalAddr().String()
			}
			if got := pc.RemoteAddr().String(); got != want {
				t.Errorf("RemoteAddr() = %s, want %s", got, want)
			}
			// A plain socket underneath: the IMAP reader can wait on
			// it without holding a buffer.
			if _, err := pc.SyscallConn(); err != nil {
				t.Errorf("SyscallConn: %v", err)
			}
			if got := pc.LocalAddr(); got != c.LocalAddr() {
				t.Errorf("LocalAddr() = %s, want the socket's %s", got, c.LocalAddr())
			}
			if pc.Header().Local != (tc.remote == "") {
				t.Errorf("Header().Local = %v, want %v", pc.Header().Local, tc.remote == "")
			}
			if got, err := io.ReadAll(pc); string(got) != cmd || err != nil {
				t.Errorf("read after Accept = %q, %v; want %q", got, err, cmd)
			}
		})
	}
}

// TestAcceptTimeout has a client send part of a header and stall; Accept
// must give up exactly when its timeout runs out, by the bubble's clock.
func TestAcceptTimeout(t *testing.T) {
	for _, half := range []string{
		"PROXY TCP4 192.0.2.1 ",
		sigV2[:7],
		string(v2(0x21, 0x11, addrs("192.0.2.1:1", "198.51.100.2:2"))[:20]),
	} {
		t.Run(fmt.Sprintf("%q", half), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				client, server := net.Pipe()
				defer client.Close()
				defer server.Close()
				go func() { client.Write([]byte(half)) }()
				start := time.Now()
				_, err := Accept(server, time.Minute)
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("Accept = %v, want %v", err, os.ErrDeadlineExceeded)
				}
				if d := time.Since(start); d != time.Minute {
					t.Errorf("Accept gave up after %v, want %v", d, time.Minute)
				}
			})
		})
	}
}

// TestAcceptClearsDeadline checks that the header's deadline does not
// outlive Accept and cut off a client that is slow to send its first
// command.
func TestAcceptClearsDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer client.Close()
		defer server.Close()
		const cmd = "a1 NOOP\r\n"
		go func() {
			client.Write([]byte("PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n"))
			// Advances the bubble's fake clock well past Accept's
			// deadline; no real time passes.
			time.Sleep(time.Hour)
			client.Write([]byte(cmd))
		}()
		pc, err := Accept(server, time.Minute)
		if err != nil {
			t.Fatalf("Accept: %v", err)
		}
		buf := make([]byte, 64)
		n, err := pc.Read(buf)
		if string(buf[:n]) != cmd || err != nil {
			t.Errorf("Read = %q, %v; want %q", buf[:n], err, cmd)
		}
	})
}

func TestTrusted(t *testing.T) {
	tr, err := ParseTrusted([]string{"10.1.2.3/8", "127.0.0.1", "::1", "2001:db8::/32", "::ffff:192.168.0.0/112"})
	if err != nil {
		t.Fatal(err)
	}
	want := Trusted{
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("127.0.0.1/32"), netip.MustParsePrefix("::1/128"),
		netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("192.168.0.0/16"),
	}
	if !reflect.DeepEqual(tr, want) {
		t.Errorf("ParseTrusted = %v, want %v", tr, want)
	}

	tcp := func(ip string) *net.TCPAddr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 993} }
	pipe, _ := net.Pipe()
	defer pipe.Close()
	tests := []struct {
		addr net.Addr
		want bool
	}{
		{tcp("10.200.0.1"), true},
		{&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1).To4()}, true},
		{tcp("::ffff:10.0.0.1"), true},
		{tcp("127.0.0.1"), true},
		{tcp("127.0.0.2"), false},
		{tcp("11.0.0.1"), false},
		{tcp("::1"), true},
		{tcp("::2"), false},
		{&net.TCPAddr{IP: net.ParseIP("2001:db8::5"), Zone: "eth0"}, true},
		{tcp("192.168.7.7"), true},
		{tcp("192.169.0.1"), false},
		{&net.UDPAddr{IP: net.ParseIP("10.0.0.1")}, true},
		{&net.UnixAddr{Name: "/run/imap.sock", Net: "unix"}, false},
		{pipe.RemoteAddr(), false},
		{(*net.TCPAddr)(nil), false},
		{nil, false},
	}
	for _, tc := range tests {
		if got := tr.Contains(tc.addr); got != tc.want {
			t.Errorf("Contains(%v) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	if Trusted(nil).Contains(tcp("127.0.0.1")) {
		t.Error("nil Trusted contains 127.0.0.1")
	}
}

func TestParseTrustedErrors(t *testing.T) {
	bad := []string{"", "bogus", "10.0.0.0/33", "10.0.0.0/", "fe80::1%eth0", "::ffff:0.0.0.0/95"}
	tr, err := ParseTrusted(append([]string{"10.0.0.0/8"}, bad...))
	if err == nil || tr != nil {
		t.Fatalf("ParseTrusted = %v, %v; want an error", tr, err)
	}
	// Every bad entry is named, so one config reload shows them all.
	for _, s := range bad {
		if !strings.Contains(err.Error(), strconv.Quote(s)) {
			t.Errorf("error %q does not name %q", err, s)
		}
	}
}

// FuzzRead checks that Read never panics, never reads past a header, and
// that what it accepts means what a sender of the same header would mean.
func FuzzRead(f *testing.F) {
	for _, tc := range readTests {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		h, err := Read(r)
		if err != nil {
			return
		}
		got := data[:len(data)-r.Len()]
		switch h.Version {
		case 1:
			if len(got) > maxV1 || !bytes.HasSuffix(got, []byte("\r\n")) {
				t.Fatalf("v1 header %q: over %d bytes or no CRLF", got, maxV1)
			}
			if h.Local {
				if !bytes.HasPrefix(got, []byte("PROXY UNKNOWN")) {
					t.Fatalf("%q read as UNKNOWN", got)
				}
				return
			}
			line := v1Line(h)
			// IPv4 has one spelling; IPv6 may differ in case and zeros.
			if h.Source.Addr().Is4() && string(got) != line {
				t.Fatalf("%q re-serialises as %q", got, line)
			}
			h2, err := Read(strings.NewReader(line))
			if err != nil || !reflect.DeepEqual(h2, h) {
				t.Fatalf("%q: %+v re-serialises as %q, which reads as %+v, %v", got, h, line, h2, err)
			}
		case 2:
			if len(got) < 16 || len(got) != 16+int(binary.BigEndian.Uint16(got[14:])) {
				t.Fatalf("v2 header %q: consumed length disagrees with its length field", got)
			}
			if !h.Local {
				if b := v2Header(h); !bytes.Equal(got, b) {
					t.Fatalf("%q: %+v re-serialises as %q", got, h, b)
				}
			}
		default:
			t.Fatalf("%q: version %d", got, h.Version)
		}
	})
}
