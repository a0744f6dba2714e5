package testkit

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cert is a server certificate for a test, signed by a CA made for it
// alone: a client verifies it by trusting the CA, as it would in
// production, and trusts nothing else.
type Cert struct {
	// KeyPair is the leaf certificate with its key, for a server's
	// tls.Config.Certificates.
	KeyPair tls.Certificate
	// Roots holds the CA alone, for a client's tls.Config.RootCAs.
	Roots *x509.CertPool
	// CAPEM is the CA certificate, PEM-encoded: a ca_file.
	CAPEM []byte
	// CertPEM and KeyPEM are the leaf and its PKCS #8 key, PEM-encoded:
	// a cert_file and a key_file.
	CertPEM, KeyPEM []byte
}

// NewCert makes a CA and a leaf certificate, valid from an hour ago for a
// week, for names: each an IP address or a DNS name. The first name is
// the leaf's common name.
func NewCert(names ...string) (*Cert, error) {
	if len(names) == 0 {
		return nil, errors.New("testkit: a certificate needs a name")
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("testkit: generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "imapproxy test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := createCert(caTmpl, caTmpl, caKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, fmt.Errorf("testkit: parse CA: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("testkit: generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: names[0]},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(7 * 24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := createCert(tmpl, ca, key, caKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("testkit: parse certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("testkit: marshal key: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return &Cert{
		KeyPair: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		Roots:   roots,
		CAPEM:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// NewCertT is NewCert that fails t on an error.
func NewCertT(t testing.TB, names ...string) *Cert {
	t.Helper()
	c, err := NewCert(names...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// createCert signs tmpl with parent's key, under a random serial number
// (a fixed one would make two certificates of a run look alike to a
// client that caches them).
func createCert(tmpl, parent *x509.Certificate, key, parentKey *ecdsa.PrivateKey) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, fmt.Errorf("testkit: serial: %w", err)
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, fmt.Errorf("testkit: create certificate: %w", err)
	}
	return der, nil
}

// WriteFiles writes ca.pem, cert.pem and key.pem to dir, the key readable
// by its owner alone, and returns their paths.
func (c *Cert) WriteFiles(dir string) (caFile, certFile, keyFile string, err error) {
	caFile = filepath.Join(dir, "ca.pem")
	certFile = filepath.Join(dir, "cert.pem")
	keyFile = filepath.Join(dir, "key.pem")
	for _, f := range []struct {
		path string
		data []byte
		perm os.FileMode
	}{
		{caFile, c.CAPEM, 0o644},
		{certFile, c.CertPEM, 0o644},
		{keyFile, c.KeyPEM, 0o600},
	} {
		if err := os.WriteFile(f.path, f.data, f.perm); err != nil {
			return "", "", "", fmt.Errorf("testkit: %w", err)
		}
	}
	return caFile, certFile, keyFile, nil
}
