// Package consultest starts a real Consul agent in -dev mode on 127.0.0.1
// for integration tests: a single server that elects itself leader, with
// its HTTP API on a free port and no DNS, gRPC or gRPC-TLS listener. The
// agent keeps nothing across a restart (see Agent.Restart).
//
// The binary is github.com/hashicorp/consul v1.14.0, built once per
// machine by tools/consul/build.sh (see Binary). The core API does not
// import package testing; StartT in testing.go is the thin wrapper for
// tests.
package consultest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// Version is the Consul release that tools/consul/build.sh builds.
const Version = "v1.14.0"

// Environment variables read by Binary.
const (
	// BinaryEnv names a consul binary to use instead of the cached build.
	BinaryEnv = "IMAPPROXY_CONSUL"
	// CacheEnv is the cache directory of tools/consul/build.sh (default
	// /var/cache/imapproxy); the binary is CACHE/consul-VERSION/consul.
	CacheEnv = "IMAPPROXY_CACHE"
)

const (
	defaultCacheDir = "/var/cache/imapproxy"

	readyTimeout = 30 * time.Second // from exec to leader and catalog
	stopTimeout  = 10 * time.Second // from SIGTERM to exit, before SIGKILL
	killTimeout  = 5 * time.Second  // from SIGKILL to exit
	apiTimeout   = 10 * time.Second // one agent API call
	pollInterval = 50 * time.Millisecond

	// checkInterval is the TCP check interval of registered services:
	// Consul's minimum. A new check is critical until its first run, some
	// random time within one interval.
	checkInterval = "1s"
	checkTimeout  = "1s"
)

// ErrNoConsul means that no consul binary was found.
var ErrNoConsul = errors.New("consultest: no consul binary (run tools/consul/build.sh, or set " + BinaryEnv + ")")

// Binary finds the consul binary: $IMAPPROXY_CONSUL if set (it must then
// be executable), else ${IMAPPROXY_CACHE:-/var/cache/imapproxy}/consul-v1.14.0/consul
// as built by tools/consul/build.sh, else "consul" in PATH. Without any
// the error is ErrNoConsul.
func Binary() (string, error) {
	if p := os.Getenv(BinaryEnv); p != "" {
		if !executable(p) {
			return "", fmt.Errorf("%w: %s=%s is not an executable file", ErrNoConsul, BinaryEnv, p)
		}
		return p, nil
	}
	cache := os.Getenv(CacheEnv)
	if cache == "" {
		cache = defaultCacheDir
	}
	if p := filepath.Join(cache, "consul-"+Version, "consul"); executable(p) {
		return p, nil
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", ErrNoConsul
}

func executable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// Agent is a running dev agent. Its methods may be called from any
// goroutine, but Stop and Restart not concurrently with each other.
type Agent struct {
	// Addr is the HTTP API address, 127.0.0.1:PORT. It stays the same
	// across Restart.
	Addr string

	bin     string
	dir     string // temp dir: consul.log and data/
	node    string
	ports   ports
	httpc   *http.Client
	logPath string

	mu   sync.Mutex
	proc *process // nil when stopped
}

// ports are the agent's listeners, all on 127.0.0.1. The serf ports are
// both TCP and UDP.
type ports struct {
	http, server, serfLAN, serfWAN int
}

// process is one run of the consul binary.
type process struct {
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{} // closed once cmd.Wait has returned
	err  error         // from cmd.Wait, readable after done
}

// Start starts a dev agent on free ports in a new temp dir and waits
// (bounded) until it has elected itself leader and serves catalog
// queries. Stop it with Stop.
func Start() (*Agent, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "consultest-")
	if err != nil {
		return nil, fmt.Errorf("consultest: %w", err)
	}
	ps, err := freePorts()
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("consultest: pick ports: %w", err)
	}
	a := &Agent{
		Addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(ps.http)),
		bin:     bin,
		dir:     dir,
		node:    "consultest-" + strconv.Itoa(ps.http),
		ports:   ps,
		httpc:   &http.Client{Timeout: apiTimeout},
		logPath: filepath.Join(dir, "consul.log"),
	}
	if err := a.start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return a, nil
}

// command is a dev-mode agent on a.ports, keeping its state in data and
// writing its output to logf.
func (a *Agent) command(data string, logf *os.File) *exec.Cmd {
	itoa := strconv.Itoa
	cmd := exec.Command(a.bin, "agent", "-dev",
		"-node", a.node,
		"-bind", "127.0.0.1",
		"-client", "127.0.0.1",
		"-http-port", itoa(a.ports.http),
		"-dns-port", "-1",
		"-grpc-port", "-1",
		// A server's gRPC-TLS port defaults to 8503 in 1.14, which two
		// agents (or a system Consul) would fight over.
		"-grpc-tls-port", "-1",
		"-serf-lan-port", itoa(a.ports.serfLAN),
		"-serf-wan-port", itoa(a.ports.serfWAN),
		"-server-port", itoa(a.ports.server),
		"-data-dir", data,
		"-hcl", "disable_update_check = true",
	)
	cmd.Dir = a.dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// If the test binary dies without Stop, the agent dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// start runs the binary with a fresh data dir and waits until it is ready.
// On failure the process is gone.
func (a *Agent) start() error {
	data := filepath.Join(a.dir, "data")
	if err := os.RemoveAll(data); err != nil {
		return fmt.Errorf("consultest: %w", err)
	}
	if err := os.MkdirAll(data, 0o700); err != nil {
		return fmt.Errorf("consultest: %w", err)
	}
	logf, err := os.OpenFile(a.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("consultest: %w", err)
	}
	cmd := a.command(data, logf)
	fmt.Fprintf(logf, "==> consultest: starting %s %q\n", a.bin, cmd.Args[1:])
	p := &process{cmd: cmd, log: logf, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked exits, not the
		// process: keep this thread for the agent's whole life, or a
		// goroutine elsewhere that exits locked could kill the agent.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	if err := <-started; err != nil {
		logf.Close()
		return fmt.Errorf("consultest: start %s: %w", a.bin, err)
	}
	a.mu.Lock()
	a.proc = p
	a.mu.Unlock()

	if err := a.waitReady(p); err != nil {
		a.stopProcess()
		return fmt.Errorf("%w\n%s", err, a.tail())
	}
	return nil
}

// waitReady polls until the agent knows a leader and its node is in the
// catalog, or fails when the process exits or readyTimeout passes.
func (a *Agent) waitReady(p *process) error {
	deadline := time.Now().Add(readyTimeout)
	var last error
	for {
		last = a.ready()
		if last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("consultest: agent exited during start: %v", p.err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("consultest: agent not ready after %v: %w", readyTimeout, last)
		}
		time.Sleep(pollInterval)
	}
}

func (a *Agent) ready() error {
	var leader string
	if err := a.get("/v1/status/leader", &leader); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("no leader yet")
	}
	// The agent's own node appears in the catalog once the leader has
	// reconciled it: then catalog reads work and registrations sync.
	var node *struct{ Node struct{ Node string } }
	if err := a.get("/v1/catalog/node/"+url.PathEscape(a.node), &node); err != nil {
		return err
	}
	if node == nil || node.Node.Node != a.node {
		return fmt.Errorf("node %s not in the catalog yet", a.node)
	}
	return nil
}

// Stop ends the agent (SIGTERM, then SIGKILL after a bounded wait) and
// removes its directory, log included. Calling it again does nothing;
// Restart starts the agent again.
func (a *Agent) Stop() error {
	err := a.stopProcess()
	if a.dir != "" {
		if rerr := os.RemoveAll(a.dir); rerr != nil {
			err = errors.Join(err, fmt.Errorf("consultest: %w", rerr))
		}
	}
	return err
}

// Restart stops the agent (if it runs) and starts it again on the same
// ports (Addr is unchanged) with an empty data dir, and waits until it is
// ready. A dev agent keeps nothing across it: services, checks and
// maintenance modes are gone, and the Raft index starts over (lower than
// before), so the test must Register its services again.
func (a *Agent) Restart() error {
	if err := a.stopProcess(); err != nil {
		return err
	}
	return a.start()
}

// stopProcess ends the running process, if any, and forgets it.
func (a *Agent) stopProcess() error {
	a.mu.Lock()
	p := a.proc
	a.proc = nil
	a.mu.Unlock()
	if p == nil {
		return nil
	}
	select {
	case <-p.done:
		return nil // exited by itself
	default:
	}
	// The signal can only fail if the process has just exited.
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(stopTimeout)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
	}
	_ = p.cmd.Process.Kill()
	t.Reset(killTimeout)
	select {
	case <-p.done:
		return fmt.Errorf("consultest: agent ignored SIGTERM for %v; killed", stopTimeout)
	case <-t.C:
		return fmt.Errorf("consultest: agent pid %d still running %v after SIGKILL", p.cmd.Process.Pid, killTimeout)
	}
}

// Log returns everything the agent has logged, across restarts.
func (a *Agent) Log() string {
	b, err := os.ReadFile(a.logPath)
	if err != nil {
		return fmt.Sprintf("(consultest: read log: %v)", err)
	}
	return string(b)
}

// tail is the end of the log, for error messages.
func (a *Agent) tail() string {
	const max = 8 << 10
	l := a.Log()
	if len(l) > max {
		l = "..." + l[len(l)-max:]
	}
	return l
}

// Service is a service instance to register with the agent.
type Service struct {
	Name    string
	ID      string // "" = Name (Consul's default)
	Address string // the service address and the TCP check's host; "" = the node address (127.0.0.1)
	Port    int
	Tags    []string
	Meta    map[string]string
	Weight  int // Weights.Passing when > 0 (Warning is then 1); 0 = Consul's default {1, 1}
}

// registration is the body of PUT /v1/agent/service/register.
type registration struct {
	Name    string            `json:"Name"`
	ID      string            `json:"ID,omitempty"`
	Address string            `json:"Address,omitempty"`
	Port    int               `json:"Port"`
	Tags    []string          `json:"Tags,omitempty"`
	Meta    map[string]string `json:"Meta,omitempty"`
	Weights *weights          `json:"Weights,omitempty"`
	Check   check             `json:"Check"`
}

type weights struct {
	Passing int `json:"Passing"`
	Warning int `json:"Warning"`
}

type check struct {
	Name     string `json:"Name"`
	TCP      string `json:"TCP"`
	Interval string `json:"Interval"`
	Timeout  string `json:"Timeout"`
}

// Register registers s with a TCP check on Address:Port every second. The
// check, like every new Consul check, is critical until its first run
// (within a second), so s turns up in passing-only health queries only
// then, and only while something accepts connections on Address:Port.
// A critical s is never deregistered automatically.
func (a *Agent) Register(s Service) error {
	host := s.Address
	if host == "" {
		host = "127.0.0.1"
	}
	id := s.ID
	if id == "" {
		id = s.Name
	}
	r := registration{
		Name:    s.Name,
		ID:      s.ID,
		Address: s.Address,
		Port:    s.Port,
		Tags:    s.Tags,
		Meta:    s.Meta,
		Check: check{
			Name:     "tcp " + id,
			TCP:      net.JoinHostPort(host, strconv.Itoa(s.Port)),
			Interval: checkInterval,
			Timeout:  checkTimeout,
		},
	}
	if s.Weight > 0 {
		r.Weights = &weights{Passing: s.Weight, Warning: 1}
	}
	if err := a.put("/v1/agent/service/register", nil, r); err != nil {
		return fmt.Errorf("consultest: register %s: %w", id, err)
	}
	return nil
}

// Deregister removes the service instance id and its check.
func (a *Agent) Deregister(id string) error {
	if err := a.put("/v1/agent/service/deregister/"+url.PathEscape(id), nil, nil); err != nil {
		return fmt.Errorf("consultest: deregister %s: %w", id, err)
	}
	return nil
}

// Maintenance turns maintenance mode of service instance id on (it is
// critical at once) or off.
func (a *Agent) Maintenance(id string, enable bool) error {
	q := url.Values{"enable": {strconv.FormatBool(enable)}, "reason": {"test"}}
	if err := a.put("/v1/agent/service/maintenance/"+url.PathEscape(id), q, nil); err != nil {
		return fmt.Errorf("consultest: maintenance %s %v: %w", id, enable, err)
	}
	return nil
}

// get decodes the JSON answer of GET path into out.
func (a *Agent) get(path string, out any) error {
	resp, err := a.httpc.Get("http://" + a.Addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	return nil
}

// put sends PUT path?q with body as JSON (none if nil) and wants 200.
func (a *Agent) put(path string, q url.Values, body any) error {
	u := "http://" + a.Addr + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequest(http.MethodPut, u, r)
	if err != nil {
		return err
	}
	resp, err := a.httpc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("PUT %s: %s: %s", path, resp.Status, bytes.TrimSpace(msg))
	}
	return nil
}

// freePorts picks the agent's ports: free for TCP, and for UDP too for
// the serf ports. All are held until all are picked, so they differ; the
// agent binds them a moment later (a small race every such harness has).
func freePorts() (ports, error) {
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	pick := func(udp bool) (int, error) {
		for range 20 {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return 0, err
			}
			closers = append(closers, l)
			port := l.Addr().(*net.TCPAddr).Port
			if !udp {
				return port, nil
			}
			pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				continue // UDP port taken: try another
			}
			closers = append(closers, pc)
			return port, nil
		}
		return 0, errors.New("no port free for both tcp and udp")
	}
	var ps ports
	var err error
	if ps.http, err = pick(false); err != nil {
		return ports{}, err
	}
	if ps.server, err = pick(false); err != nil {
		return ports{}, err
	}
	if ps.serfLAN, err = pick(true); err != nil {
		return ports{}, err
	}
	if ps.serfWAN, err = pick(true); err != nil {
		return ports{}, err
	}
	return ps, nil
}
