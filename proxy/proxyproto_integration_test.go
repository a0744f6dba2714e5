package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/proxyproto"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

// startProxiedListener adds to p a listener whose connections from
// 127.0.0.1 must start with a PROXY protocol header.
func startProxiedListener(t *testing.T, p *testProxy) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	from, err := proxyproto.ParseTrusted([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.srv.ServeListener(ln, ListenerOptions{TLS: TLSNone, ProxyProtocolFrom: from}) }()
	t.Cleanup(func() {
		// startServer's cleanup shut the server down first (cleanups
		// run last-registered first, and this one is later), or ends
		// it now.
		p.srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("ServeListener: %v", err)
		}
	})
	return ln.Addr().String()
}

// dialProxied connects to addr and sends header before anything else, as
// a load balancer does.
func dialProxied(t *testing.T, addr string, header []byte) *testkit.Client {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(header); err != nil {
		t.Fatal(err)
	}
	tc := testkit.NewClient(t, c)
	tc.Greeting = tc.ReadLine()
	return tc
}

func v1Header(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	fam := "TCP4"
	if s.Addr().Is6() {
		fam = "TCP6"
	}
	return fmt.Appendf(nil, "PROXY %s %s %s %d %d\r\n", fam, s.Addr(), d.Addr(), s.Port(), d.Port())
}

func v2Header(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	b := []byte("\r\n\r\n\x00\r\nQUIT\n")
	b = append(b, 0x21) // version 2, PROXY
	var addrs []byte
	if s.Addr().Is4() {
		b = append(b, 0x11) // AF_INET, STREAM
		addrs = append(append(addrs, s.Addr().AsSlice()...), d.Addr().AsSlice()...)
	} else {
		b = append(b, 0x21) // AF_INET6, STREAM
		addrs = append(append(addrs, s.Addr().AsSlice()...), d.Addr().AsSlice()...)
	}
	addrs = binary.BigEndian.AppendUint16(addrs, s.Port())
	addrs = binary.BigEndian.AppendUint16(addrs, d.Port())
	b = binary.BigEndian.AppendUint16(b, uint16(len(addrs)))
	return append(b, addrs...)
}

// waitLog polls Dovecot's log (written by its log process, a moment
// late) until it contains want.
func waitLog(t *testing.T, dc *dovecottest.Server, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(dc.Log(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("Dovecot's log has no %q:\n%s", want, dc.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestProxyProtocol writes v1 and v2 headers as a load balancer would:
// the address in the header is the client's for the proxy's log, for the
// per-address limit, and for Dovecot, which logs it as rip= from the ID
// the proxy sends (its login_trusted_networks trusts the proxy).
func TestProxyProtocol(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 3, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) { o.MaxClientsPerIP = 1 })
	addr := startProxiedListener(t, p)
	u1, u2 := dc.Users()[0], dc.Users()[1]

	t.Run("v1", func(t *testing.T) {
		c := dialProxied(t, addr, v1Header("203.0.113.7:40000", "192.0.2.1:143"))
		c.MustLogin(u1, dc.PasswordOf(u1))
		waitLog(t, dc, fmt.Sprintf("Login: user=<%s>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.1", u1))
		if !strings.Contains(p.logs.String(), "client=203.0.113.7:40000") {
			t.Errorf("the proxy did not log the client address from the header")
		}
		c.Logout()
	})
	t.Run("v2 IPv6", func(t *testing.T) {
		c := dialProxied(t, addr, v2Header("[2001:db8::7]:40001", "[2001:db8::1]:993"))
		c.MustLogin(u2, dc.PasswordOf(u2))
		waitLog(t, dc, fmt.Sprintf("Login: user=<%s>, method=PLAIN, rip=2001:db8::7, lip=2001:db8::1", u2))
		c.Logout()
	})
	t.Run("reused connection logs the new client", func(t *testing.T) {
		p.waitCached(t, 2)
		c := dialProxied(t, addr, v1Header("198.51.100.9:40002", "192.0.2.1:143"))
		if res := c.MustLogin(u1, dc.PasswordOf(u1)); !res.Has("XPROXYREUSE") {
			t.Fatalf("login not served from the cache: %s", res)
		}
		var found bool
		for _, l := range strings.Split(p.logs.String(), "\n") {
			if strings.Contains(l, "login") && strings.Contains(l, "reused=true") && strings.Contains(l, "client=198.51.100.9:40002") {
				found = true
			}
		}
		if !found {
			t.Errorf("no log line of the reused login with the header's client address")
		}
		c.Logout()
	})
	t.Run("limit per address counts the header's address", func(t *testing.T) {
		a := dialProxied(t, addr, v1Header("203.0.113.20:1000", "192.0.2.1:143"))
		if !strings.HasPrefix(a.Greeting, "* OK") {
			t.Fatalf("first client: %q", a.Greeting)
		}
		b := dialProxied(t, addr, v2Header("203.0.113.20:1001", "192.0.2.1:143"))
		if !strings.HasPrefix(b.Greeting, "* BYE [UNAVAILABLE]") {
			t.Errorf("second client from the same address got %q, want BYE (max_clients_per_ip 1)", b.Greeting)
		}
		c := dialProxied(t, addr, v1Header("203.0.113.21:1002", "192.0.2.1:143"))
		if !strings.HasPrefix(c.Greeting, "* OK") {
			t.Errorf("a client from another address behind the same balancer got %q", c.Greeting)
		}
	})
	t.Run("trusted peer without a header is closed", func(t *testing.T) {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte("a1 LOGIN user pass\r\n"))
		buf := make([]byte, 256)
		n, err := c.Read(buf)
		if n != 0 || err == nil {
			t.Errorf("got %q, %v; want the connection closed without a greeting", buf[:n], err)
		}
		if !strings.Contains(p.logs.String(), "no valid PROXY protocol header") {
			t.Errorf("the refusal was not logged")
		}
	})
	t.Run("header from an untrusted peer is not honoured", func(t *testing.T) {
		// p.addr serves without PROXY protocol: the header is just a
		// line that is not IMAP.
		c := testkit.Dial(t, p.addr)
		c.Send(string(v1Header("203.0.113.66:1", "192.0.2.1:143")))
		if l := c.ReadLine(); !strings.HasPrefix(l, "PROXY BAD") {
			t.Errorf("got %q, want the header refused as a command", l)
		}
		if strings.Contains(p.logs.String(), "203.0.113.66") {
			t.Errorf("the proxy used the address of an untrusted header")
		}
	})
}

// TestHAProxy puts a real HAProxy in front, once with send-proxy (v1) and
// once with send-proxy-v2: the proxy sees the client's own address and
// port (the test's socket), not HAProxy's.
func TestHAProxy(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("IMAPPROXY_REQUIRE_HAPROXY") == "1" {
			t.Fatalf("haproxy not installed (IMAPPROXY_REQUIRE_HAPROXY=1): %v", err)
		}
		t.Skip("haproxy not installed (apt-get install haproxy; IMAPPROXY_REQUIRE_HAPROXY=1 fails instead)")
	}
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 2, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	addr := startProxiedListener(t, p)

	ports := make([]int, 2)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	cfg := fmt.Sprintf(`defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend v1
  bind 127.0.0.1:%d
  default_backend proxy_v1
backend proxy_v1
  server imapproxy %s send-proxy
frontend v2
  bind 127.0.0.1:%d
  default_backend proxy_v2
backend proxy_v2
  server imapproxy %s send-proxy-v2
`, ports[0], addr, ports[1], addr)
	dir := t.TempDir()
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", path)
	out, err := os.Create(filepath.Join(dir, "haproxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})

	for i, port := range ports {
		front := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
		// HAProxy binds a moment after it starts: bounded retries.
		var conn net.Conn
		for try := 0; ; try++ {
			conn, err = net.DialTimeout("tcp", front, time.Second)
			if err == nil || try == 200 {
				break
			}
			select {
			case err := <-exited:
				b, _ := os.ReadFile(out.Name())
				t.Fatalf("haproxy exited: %v\n%s", err, b)
			case <-time.After(25 * time.Millisecond):
			}
		}
		if err != nil {
			t.Fatalf("haproxy frontend %s: %v", front, err)
		}
		c := testkit.NewClient(t, conn)
		c.Greeting = c.ReadLine()
		if !strings.HasPrefix(c.Greeting, "* OK") {
			t.Fatalf("v%d: greeting %q", i+1, c.Greeting)
		}
		u := dc.Users()[i]
		c.MustLogin(u, dc.PasswordOf(u))
		// The client's own socket address, which only the PROXY
		// header can have told the proxy.
		want := "client=" + conn.LocalAddr().String()
		if !strings.Contains(p.logs.String(), want) {
			t.Errorf("v%d: the proxy's log has no %q (the client's address through HAProxy)", i+1, want)
		}
		c.Logout()
	}
}

// TestSetListenerOptions turns PROXY protocol on for a listener that is
// serving, as a reload does: the socket stays, and connections accepted
// from then on must start with a header.
func TestSetListenerOptions(t *testing.T) {
	dc := dovecottest.StartT(t, dovecottest.Options{Name: "backend-1", Users: 1, Messages: 1})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.srv.ServeListener(ln, ListenerOptions{TLS: TLSNone}) }()
	t.Cleanup(func() {
		p.srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("ServeListener: %v", err)
		}
	})
	if c := testkit.Dial(t, ln.Addr().String()); !strings.HasPrefix(c.Greeting, "* OK") {
		t.Fatalf("before: %q", c.Greeting)
	}
	from, _ := proxyproto.ParseTrusted([]string{"127.0.0.1"})
	// Serve registers the listener in its own goroutine: bounded retry.
	for i := 0; ; i++ {
		err := p.srv.SetListenerOptions(ln, ListenerOptions{TLS: TLSNone, ProxyProtocolFrom: from})
		if err == nil {
			break
		}
		if !errors.Is(err, ErrNotServing) || i == 500 {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	c := dialProxied(t, ln.Addr().String(), v1Header("203.0.113.44:4444", "192.0.2.1:143"))
	if !strings.HasPrefix(c.Greeting, "* OK") {
		t.Fatalf("with a header after the change: %q", c.Greeting)
	}
	u := dc.Users()[0]
	c.MustLogin(u, dc.PasswordOf(u))
	if !strings.Contains(p.logs.String(), "client=203.0.113.44:4444") {
		t.Errorf("the header's address was not used after the change")
	}
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := p.srv.SetListenerOptions(other, ListenerOptions{}); !errors.Is(err, ErrNotServing) {
		t.Errorf("SetListenerOptions on a listener not served: %v, want ErrNotServing", err)
	}
}
