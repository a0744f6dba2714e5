// Command imapproxy-demo starts Dovecot backends on 127.0.0.1 for trying
// the proxy by hand, and optionally the proxy itself:
//
//	go run ./cmd/imapproxy-demo -proxy ./imapproxy -config config.hcl
//
// Backends backend-1..N listen on base-port, base-port+1, ... (10143,
// 10144, 10145 by default) with users user0001..user0050, password
// "secret". Dovecot must be installed and the command run as root. On
// SIGINT or SIGTERM it stops the proxy (SIGTERM, bounded wait), then the
// backends, and exits 0.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/imapproxy/imapproxy/internal/consultest"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

const (
	password      = "secret"
	messages      = 20
	bigMessages   = 2
	proxyStopWait = 10 * time.Second
)

func main() {
	log.SetFlags(0)
	log.SetPrefix("imapproxy-demo: ")
	os.Exit(run())
}

func run() int {
	proxyBin := flag.String("proxy", "", "run this proxy binary as a child process (with -config)")
	config := flag.String("config", "config.hcl", "config file passed to the proxy as -config")
	backends := flag.Int("backends", 3, "number of Dovecot backends")
	users := flag.Int("users", 50, "users per backend: user0001..")
	basePort := flag.Int("base-port", 10143, "port of backend-1; backend-N listens on base-port+N-1")
	useConsul := flag.Bool("consul", false, "cluster mode: register the backends in a local Consul dev agent and point the proxy at it (needs the agent from tools/consul/build.sh)")
	flag.Parse()
	if *backends < 1 || *users < 1 || *basePort < 1 || *basePort+*backends-1 > 65535 {
		log.Print("-backends, -users and -base-port must be positive and the ports valid")
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	base, err := os.MkdirTemp("", "imapproxy-demo-")
	if err != nil {
		log.Print(err)
		return 1
	}
	defer os.RemoveAll(base)
	// Dovecot's unprivileged processes must reach the maildirs below.
	if err := os.Chmod(base, 0o755); err != nil {
		log.Print(err)
		return 1
	}

	servers, err := startBackends(base, *backends, *users, *basePort)
	defer stopBackends(servers)
	if err != nil {
		log.Print(err)
		return 1
	}
	banner(servers, *users)

	if *useConsul {
		agent, cfgPath, err := startConsul(base, servers, *config)
		if err != nil {
			log.Print(err)
			return 1
		}
		defer agent.Stop()
		*config = cfgPath
	}

	if *proxyBin == "" {
		<-ctx.Done()
		log.Print("stopping")
		return 0
	}
	return runProxy(ctx, *proxyBin, *config)
}

// startConsul starts a Consul dev agent, registers every backend as an
// instance of service "imap" with a TCP check, and writes a proxy config
// that takes its backends from there: the demo's config.hcl with the
// backend blocks replaced by a consul block.
func startConsul(base string, servers []*dovecottest.Server, config string) (*consultest.Agent, string, error) {
	agent, err := consultest.Start()
	if err != nil {
		return nil, "", fmt.Errorf("consul: %w", err)
	}
	for _, s := range servers {
		host, port, _ := net.SplitHostPort(s.Addr)
		p, _ := strconv.Atoi(port)
		if err := agent.Register(consultest.Service{Name: "imap", ID: s.Name, Address: host, Port: p, Weight: 1}); err != nil {
			agent.Stop()
			return nil, "", err
		}
	}
	src, err := os.ReadFile(config)
	if err != nil {
		agent.Stop()
		return nil, "", err
	}
	cfg := backendBlock.ReplaceAllString(string(src), "")
	cfg += fmt.Sprintf("\nconsul {\n  address = %q\n  service = \"imap\"\n}\n", agent.Addr)
	path := filepath.Join(base, "config-consul.hcl")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		agent.Stop()
		return nil, "", err
	}
	fmt.Printf("Consul agent on http://%s, service \"imap\" with %d instances; proxy config %s\n\n", agent.Addr, len(servers), path)
	return agent, path, nil
}

// backendBlock matches an uncommented backend "NAME" { ... } block.
var backendBlock = regexp.MustCompile(`(?m)^backend "[^"]*" \{[^}]*\}\n?`)

// startBackends starts the backends in parallel (seeding big messages
// takes a moment) and returns those that started.
func startBackends(base string, n, users, basePort int) ([]*dovecottest.Server, error) {
	opts := make([]dovecottest.Options, n)
	for i := range opts {
		name := fmt.Sprintf("backend-%d", i+1)
		opts[i] = dovecottest.Options{
			Name:        name,
			Port:        basePort + i,
			Users:       users,
			Password:    func(string) string { return password },
			Messages:    messages,
			BigMessages: bigMessages,
			Dir:         filepath.Join(base, name),
		}
	}
	servers, err := dovecottest.StartAll(opts)
	var started []*dovecottest.Server
	for _, s := range servers {
		if s != nil {
			started = append(started, s)
		}
	}
	return started, err
}

func stopBackends(servers []*dovecottest.Server) {
	if err := dovecottest.StopAll(servers); err != nil {
		log.Printf("stop backends: %v", err)
	}
}

func banner(servers []*dovecottest.Server, users int) {
	fmt.Printf("\n%d Dovecot backends are up:\n", len(servers))
	for _, s := range servers {
		fmt.Printf("  %-10s %s   (log %s)\n", s.Name, s.Addr, filepath.Join(s.Dir, "dovecot.log"))
	}
	fmt.Printf("users %s..%s, password %q; %d messages in INBOX, %d x 1 MiB in \"Big\"\n\n",
		dovecottest.UserName(1), dovecottest.UserName(users), password, messages, bigMessages)
	fmt.Printf("a backend directly:  nc -C %s   then   a LOGIN %s %s\n", hostPort(servers[0].Addr), dovecottest.UserName(1), password)
	fmt.Printf("through the proxy:   telnet 127.0.0.1 1143\n")
	fmt.Printf("Ctrl-C stops everything.\n\n")
}

// hostPort turns "127.0.0.1:10143" into "127.0.0.1 10143" for nc.
func hostPort(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host + " " + port
}

// runProxy runs the proxy until it exits or ctx ends; then it gets
// SIGTERM and proxyStopWait to exit before SIGKILL. It returns the exit
// code for the demo: 0 after a signal or a clean proxy exit.
func runProxy(ctx context.Context, bin, config string) int {
	cmd := exec.Command(bin, "-config", config)
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stderr
	// Its own process group, so only this command signals it; and it
	// ends if the demo dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}

	started := make(chan error, 1)
	done := make(chan error, 1)
	go func() {
		// Pdeathsig follows the thread that forked: keep it alive for
		// the child's lifetime.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			runtime.UnlockOSThread()
			started <- err
			return
		}
		started <- nil
		done <- cmd.Wait()
	}()
	if err := <-started; err != nil {
		log.Printf("start proxy: %v", err)
		return 1
	}
	log.Printf("proxy %s started (pid %d)", bin, cmd.Process.Pid)

	select {
	case err := <-done:
		if err != nil {
			log.Printf("proxy exited: %v", err)
			return 1
		}
		log.Print("proxy exited")
		return 0
	case <-ctx.Done():
	}
	log.Print("stopping proxy")
	_ = cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(proxyStopWait)
	defer timer.Stop()
	select {
	case err := <-done:
		if err != nil {
			log.Printf("proxy exited: %v", err)
		}
	case <-timer.C:
		log.Printf("proxy still running %v after SIGTERM, killing it", proxyStopWait)
		_ = cmd.Process.Kill()
		<-done
	}
	return 0
}
