// Command imapproxy is a caching IMAP proxy for mail clusters.
//
//	imapproxy -config config.hcl
//	imapproxy -check-config -config config.hcl
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
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/imapproxy/imapproxy/config"
	"github.com/imapproxy/imapproxy/discovery"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/proxy"
)

func main() {
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
	if err := run(cfg); err != nil {
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

func run(cfg *config.Config) error {
	log := newLogger(cfg)
	opts, err := serverOptions(cfg, log)
	if err != nil {
		return err
	}
	srv := proxy.New(opts)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); srv.Pool().Run(ctx) }()

	src, status, err := newSource(cfg, log)
	if err != nil {
		return err
	}
	first := make(chan struct{})
	var once sync.Once
	wg.Add(1)
	go func() {
		defer wg.Done()
		probed := false
		err := src.Run(ctx, func(bs []discovery.Backend) {
			srv.SetBackends(toProxy(bs))
			once.Do(func() { close(first) })
			// The greeting shows the backends' capabilities: read them
			// as soon as there is a backend to ask (later logins keep
			// them fresh).
			if !probed && len(bs) > 0 {
				if err := srv.ProbeCapabilities(ctx); err != nil {
					log.Warn("could not read backend capabilities; greeting uses defaults until a login succeeds", "error", err)
				} else {
					probed = true
				}
			}
		})
		if err != nil {
			log.Error("backend discovery stopped", "error", err)
		}
	}()
	// Wait a little for the first backend set, so that the first logins
	// after a restart do not fail for want of one; without it the proxy
	// still starts and answers NO [UNAVAILABLE] until a set arrives.
	waitFirst := time.NewTimer(10 * time.Second)
	select {
	case <-first:
	case <-waitFirst.C:
		log.Warn("no backend set yet; logins fail with UNAVAILABLE until discovery delivers one")
	}
	waitFirst.Stop()

	reg := prometheus.NewRegistry()
	registerMetrics(reg, srv, status)
	var listening atomic.Bool
	var admin *http.Server
	if cfg.Admin.Address != "" {
		ln, err := net.Listen("tcp", cfg.Admin.Address)
		if err != nil {
			return fmt.Errorf("admin listener: %w", err)
		}
		admin = &http.Server{Handler: adminHandler(reg, srv, &listening), ReadHeaderTimeout: 10 * time.Second}
		log.Info("admin listening", "address", ln.Addr().String())
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := admin.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin listener failed", "error", err)
			}
		}()
	}

	errc := make(chan error, len(cfg.Listeners))
	for _, l := range cfg.Listeners {
		ln, err := listen(l.Address)
		if err != nil {
			srv.Close()
			return fmt.Errorf("listener %s: %w", l.Name, err)
		}
		log.Info("listening", "listener", l.Name, "address", ln.Addr().String(), "tls", l.TLS)
		wg.Add(1)
		go func(l config.Listener) {
			defer wg.Done()
			if err := srv.Serve(ln, l.TLS); err != nil && !errors.Is(err, proxy.ErrServerClosed) {
				errc <- fmt.Errorf("listener %s: %w", l.Name, err)
			}
		}(l)
	}

	listening.Store(true)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	var runErr error
loop:
	for {
		select {
		case s := <-sigs:
			if s == syscall.SIGHUP {
				log.Warn("SIGHUP: configuration reload is not supported yet; restart to apply changes")
				continue
			}
			log.Info("shutting down", "signal", s.String(), "drain", cfg.Timeouts.Drain)
			break loop
		case runErr = <-errc:
			log.Error("listener failed", "error", runErr)
			break loop
		}
	}
	listening.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Timeouts.Drain)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("drain deadline passed; remaining sessions were closed", "error", err)
	}
	if admin != nil {
		admin.Shutdown(sctx)
	}
	stop()
	wg.Wait()
	log.Info("stopped")
	return runErr
}

// listen opens a TCP listener. Go asks the kernel for the largest backlog
// it allows (somaxconn), unlike up-imapproxy's backlog of 5, which stalls
// bursts of webmail logins.
func listen(addr string) (net.Listener, error) {
	return net.Listen("tcp", addr)
}

func serverOptions(cfg *config.Config, log hclog.Logger) (proxy.Options, error) {
	upTLS, err := upstreamTLS(cfg)
	if err != nil {
		return proxy.Options{}, err
	}
	var clientTLS *tls.Config
	if cfg.ClientTLS.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.ClientTLS.CertFile, cfg.ClientTLS.KeyFile)
		if err != nil {
			return proxy.Options{}, fmt.Errorf("client tls: %w", err)
		}
		clientTLS = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		if cfg.ClientTLS.MinVersion == "1.3" {
			clientTLS.MinVersion = tls.VersionTLS13
		}
	}
	p := pool.New(pool.Options{
		Expiration:    cfg.Cache.Expiration,
		SweepInterval: cfg.Cache.SweepInterval,
		MaxAge:        cfg.Cache.ReuseMaxAge,
		MaxPerUser:    cfg.Cache.MaxCachedPerUser,
		MaxConns:      cfg.Cache.MaxConnections,
		Disabled:      !cfg.Cache.Enabled,
		Logger:        log.Named("pool"),
	})
	t := cfg.Timeouts
	return proxy.Options{
		Logger: log.Named("proxy"),
		Pool:   p,
		Dialer: &proxy.Dialer{
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
		LogoutWait:         t.Drain,
		MaxLineLength:      cfg.Limits.MaxLineLength,
		MaxLiteralPreAuth:  cfg.Limits.MaxLiteralPreAuth,
		MaxLiteral:         cfg.Limits.MaxLiteral,
		MaxBadCommands:     cfg.Limits.MaxBadCommands,
		MaxClients:         cfg.Limits.MaxClients,
		MaxClientsPerIP:    cfg.Limits.MaxClientsPerIP,
		MaxPreAuth:         cfg.Limits.MaxPreAuth,
		MaxSessionsPerUser: cfg.Limits.MaxSessionsPerUser,
	}, nil
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
