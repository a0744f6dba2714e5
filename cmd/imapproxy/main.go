// Command imapproxy is a caching IMAP proxy for mail clusters.
//
//	imapproxy -config config.hcl
//	imapproxy -check-config -config config.hcl
//	imapproxy status [-admin 127.0.0.1:9143] [-once]   (or top: a live view)
//	imapproxy map [-admin 127.0.0.1:9143] USER
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/config"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
	"github.com/imapproxy/imapproxy/upstream"
)

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "status", "top", "map":
			os.Exit(runCLI(os.Args[1], os.Args[2:]))
		}
	}
	var (
		cfgPath     = flag.String("config", "config.hcl", "configuration file")
		checkConfig = flag.Bool("check-config", false, "check the configuration file, print every problem and exit")
		version     = flag.Bool("version", false, "print version and build information")
	)
	flag.Parse()
	if *version {
		printVersion()
		return
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if *checkConfig {
		fmt.Printf("%s: ok\n", *cfgPath)
		return
	}
	if err := run(*cfgPath, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "imapproxy:", err)
		os.Exit(1)
	}
}

func printVersion() {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Println("imapproxy (no build info)")
		return
	}
	fmt.Printf("imapproxy %s %s\n", bi.Main.Version, bi.GoVersion)
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision", "vcs.time", "vcs.modified":
			fmt.Printf("  %s=%s\n", s.Key, s.Value)
		}
	}
}

func newLogger(cfg *config.Config) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       "imapproxy",
		Level:      hclog.LevelFromString(cfg.LogLevel),
		JSONFormat: cfg.LogFormat == "json",
		Output:     os.Stderr,
	})
}

// run serves cfg until a signal or a listener failure ends the process:
// discovery first, so that the listeners open onto a backend set, then the
// admin listener, then the client listeners, then the drain.
func run(path string, cfg *config.Config) error {
	log := newLogger(cfg)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	d, err := newDaemon(ctx, path, cfg, log)
	if err != nil {
		return err
	}

	first := make(chan struct{})
	if err := d.startDiscovery(cfg, first); err != nil {
		return err
	}
	waitFirstSet(first, log)

	reg := prometheus.NewRegistry()
	admin.RegisterMetrics(reg, d.srv, d.sourceStatus)
	registerReloadMetrics(reg, d)
	reg.MustRegister(d.metrics.Collectors()...)
	var listening atomic.Bool
	adminSrv, err := d.startAdmin(cfg, reg, listening.Load)
	if err != nil {
		return err
	}

	if err := d.start(); err != nil {
		d.srv.Close()
		return err
	}

	listening.Store(true)
	runErr := d.waitSignals()
	listening.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), d.cfg.Timeouts.Drain)
	defer cancel()
	if err := d.shutdown(sctx); err != nil {
		log.Warn("drain deadline passed; remaining sessions were closed", "error", err)
	}
	if adminSrv != nil {
		adminSrv.Shutdown(sctx)
	}
	stop()
	d.wg.Wait()
	log.Info("stopped")
	return runErr
}

// waitFirstSet waits a little for the first backend set, so that the first
// logins after a restart do not fail for want of one; without it the proxy
// still starts and answers NO [UNAVAILABLE] until a set arrives.
func waitFirstSet(first <-chan struct{}, log hclog.Logger) {
	waitFirst := time.NewTimer(10 * time.Second)
	select {
	case <-first:
	case <-waitFirst.C:
		log.Warn("no backend set yet; logins fail with UNAVAILABLE until discovery delivers one")
	}
	waitFirst.Stop()
}

// startAdmin opens and serves the admin listener, if cfg has one; the
// server it returns is nil without.
func (d *daemon) startAdmin(cfg *config.Config, reg *prometheus.Registry, listening func() bool) (*http.Server, error) {
	if cfg.Admin.Address == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", cfg.Admin.Address)
	if err != nil {
		return nil, fmt.Errorf("admin listener: %w", err)
	}
	// The token is read once: a changed one needs a restart, as the
	// rest of the admin block does.
	opts := admin.Options{TraceDir: cfg.Admin.TraceDir, Source: d.sourceStatus, Listening: listening,
		Metrics: reg, Logger: d.log.Named("admin")}
	if cfg.Admin.TokenFile != "" {
		tok, err := config.ReadToken(cfg.Admin.TokenFile)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("admin token_file: %w", err)
		}
		opts.Token = tok
	}
	adminSrv := admin.NewServer(admin.New(d.srv, opts))
	clear(opts.Token)
	d.adminAddr = ln.Addr().String()
	d.log.Info("admin listening", "address", ln.Addr().String())
	d.wg.Go(func() {
		if err := adminSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("admin listener failed", "error", err)
		}
	})
	return adminSrv, nil
}

// waitSignals reloads on SIGHUP until SIGINT or SIGTERM, which return nil,
// or a listener failure, which is returned.
func (d *daemon) waitSignals() error {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				d.log.Info("SIGHUP: reloading the configuration", "file", d.path)
				d.reload() // logs its outcome
				continue
			}
			d.log.Info("shutting down", "signal", s.String(), "drain", d.cfg.Timeouts.Drain)
			return nil
		case err := <-d.errc:
			d.log.Error("listener failed", "error", err)
			return err
		}
	}
}

// listen opens a TCP listener. Go asks the kernel for the largest backlog
// it allows (somaxconn), unlike up-imapproxy's backlog of 5, which stalls
// bursts of webmail logins.
func listen(addr string) (net.Listener, error) {
	return net.Listen("tcp", addr)
}

func poolOptions(cfg *config.Config, log hclog.Logger) pool.Options {
	return pool.Options{
		Expiration:    cfg.Cache.Expiration,
		SweepInterval: cfg.Cache.SweepInterval,
		MaxAge:        cfg.Cache.ReuseMaxAge,
		MaxPerUser:    cfg.Cache.MaxCachedPerUser,
		MaxConns:      cfg.Cache.MaxConnections,
		Disabled:      !cfg.Cache.Enabled,
		Logger:        log.Named("pool"),
	}
}

// serverOptions builds the server's options from cfg, reading the
// certificate and CA files, so that a reload picks up renewed ones.
func serverOptions(cfg *config.Config, log hclog.Logger, p *pool.Pool) (proxy.Options, error) {
	upTLS, err := upstreamTLS(cfg)
	if err != nil {
		return proxy.Options{}, err
	}
	clientTLS, err := clientTLSConfig(cfg)
	if err != nil {
		return proxy.Options{}, err
	}
	t := cfg.Timeouts
	return proxy.Options{
		Logger: log.Named("proxy"),
		Pool:   p,
		Dialer: &upstream.Dialer{
			Timeout:      cfg.Upstream.DialTimeout,
			Retries:      cfg.Upstream.DialRetries,
			RetryDelay:   cfg.Upstream.RetryDelay,
			KeepAlive:    cfg.Upstream.KeepAlive,
			TLS:          cfg.Upstream.TLS,
			TLSConfig:    upTLS,
			LoginTimeout: t.BackendLogin,
			LoginMethod:  cfg.Upstream.LoginMethod,
			ForwardID:    cfg.Upstream.ForwardID,
			CheckTimeout: t.Check,
		},
		TLSConfig:          clientTLS,
		HashKey:            hashKey(cfg.Cluster.HashKey),
		BackendDrain:       cfg.Cluster.BackendDrain,
		DownTime:           cfg.Cluster.DownTime,
		RequireTLSForLogin: cfg.ClientTLS.RequireTLSForLogin,
		PreAuthTimeout:     t.PreAuth,
		AuthIdleTimeout:    t.AuthIdle,
		IdleTimeout:        t.Idle,
		LiteralTimeout:     t.Literal,
		WriteTimeout:       t.Write,
		ResponseTimeout:    t.Response,
		LogoutWait:         t.Drain,
		MaxLineLength:      cfg.Limits.MaxLineLength,
		MaxLiteralPreAuth:  cfg.Limits.MaxLiteralPreAuth,
		MaxLiteral:         cfg.Limits.MaxLiteral,
		MaxBadCommands:     cfg.Limits.MaxBadCommands,
		MaxCommandPreAuth:  cfg.Limits.MaxCommandPreAuth,
		MaxUserLength:      cfg.Limits.MaxUserLength,
		MaxPasswordLength:  cfg.Limits.MaxPasswordLength,
		// In the file 0 means none; in Options, the default.
		MaxLoginFailures:   noneIfZero(cfg.Limits.MaxLoginFailures),
		LoginFailureDelay:  noneIfZero(cfg.Limits.LoginFailureDelay),
		MaxPreAuthPerIP:    noneIfZero(cfg.Limits.MaxPreAuthPerIP),
		MaxClients:         cfg.Limits.MaxClients,
		MaxClientsPerIP:    cfg.Limits.MaxClientsPerIP,
		MaxPreAuth:         cfg.Limits.MaxPreAuth,
		MaxSessionsPerUser: cfg.Limits.MaxSessionsPerUser,
	}, nil
}

// noneIfZero turns a file's 0, "none", into the -1 that says so to
// proxy.Options, where 0 means the default.
func noneIfZero[T int | time.Duration](v T) T {
	if v == 0 {
		return -1
	}
	return v
}

// clientTLSConfig is nil without a certificate, which Validate allows only
// when no listener offers TLS.
func clientTLSConfig(cfg *config.Config) (*tls.Config, error) {
	if cfg.ClientTLS.CertFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.ClientTLS.CertFile, cfg.ClientTLS.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("client tls: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if cfg.ClientTLS.MinVersion == "1.3" {
		tc.MinVersion = tls.VersionTLS13
	}
	return tc, nil
}

func upstreamTLS(cfg *config.Config) (*tls.Config, error) {
	u := cfg.Upstream
	tc := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         u.ServerName,
		InsecureSkipVerify: u.InsecureSkipVerify,
	}
	if u.CAFile != "" {
		pem, err := os.ReadFile(u.CAFile)
		if err != nil {
			return nil, fmt.Errorf("upstream ca_file: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("upstream ca_file %s: no certificates", u.CAFile)
		}
		tc.RootCAs = roots
	}
	return tc, nil
}
