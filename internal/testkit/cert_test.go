package testkit

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"testing"
)

func TestNewCertVerifies(t *testing.T) {
	c, err := NewCert("localhost", "127.0.0.1", "::1")
	if err != nil {
		t.Fatal(err)
	}
	leaf := c.KeyPair.Leaf
	if leaf.IsCA {
		t.Error("the leaf is a CA, want a CA apart from it")
	}
	for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
		_, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: c.Roots})
		if err != nil {
			t.Errorf("Verify(%s) with Roots: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "other.test", Roots: c.Roots}); err == nil {
		t.Error("Verify(other.test) succeeded, want a name mismatch")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "localhost", Roots: x509.NewCertPool()}); err == nil {
		t.Error("Verify without the CA succeeded, want an unknown authority")
	}
	other, err := NewCert("localhost")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "localhost", Roots: other.Roots}); err == nil {
		t.Error("Verify with another Cert's Roots succeeded, want each CA to sign its own leaf alone")
	}
	if _, err := NewCert(); err == nil {
		t.Error("NewCert() without names: nil error, want one")
	}
}

// The files are what a daemon's configuration points at: a key pair that
// loads and a CA file a client can trust, over a real handshake.
func TestCertWriteFiles(t *testing.T) {
	c, err := NewCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	caFile, certFile, keyFile, err := c.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v; want mode 0600", fi.Mode(), err)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatalf("LoadX509KeyPair: %v", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("%s holds no certificate", caFile)
	}

	cli, srv := net.Pipe()
	defer cli.Close()
	errc := make(chan error, 1)
	go func() {
		defer srv.Close()
		errc <- tls.Server(srv, &tls.Config{Certificates: []tls.Certificate{pair}}).Handshake()
	}()
	if err := tls.Client(cli, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}).Handshake(); err != nil {
		t.Errorf("client handshake trusting the CA file: %v", err)
	}
	if err := <-errc; err != nil {
		t.Errorf("server handshake with the files: %v", err)
	}
}
