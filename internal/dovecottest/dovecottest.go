// Package dovecottest starts a real, private Dovecot 2.3 on 127.0.0.1 for
// integration tests and the local demo.
//
// Each instance lives in its own directory: config, passwd-file, maildirs,
// log, base_dir (sockets, pid file) and state_dir, with a unique
// instance_name, so several instances and a system Dovecot run side by
// side. Dovecot runs as root (the harness must too); mail belongs to the
// numeric uid 5000, which needs no /etc/passwd entry.
//
// For tests of what goes wrong with real backends: Options.Large adds a
// user whose mailboxes are at the scale of real ones (tens of thousands
// of messages, a message to thousands of recipients, a deep MIME tree),
// each making response lines of 100 KB and more; Pause and Resume freeze
// and thaw the whole instance with its sockets open (a hung backend);
// Kill ends it as a crash; Kick ends one user's sessions.
//
// The core API does not import package testing; StartT in testing.go is
// the thin wrapper for tests.
package dovecottest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// Options configures an instance. The zero value works.
type Options struct {
	// Name identifies the backend: the greeting is "Dovecot ready (NAME)."
	// and the ID reply carries "name" "NAME". Default "backend-1". Letters,
	// digits, '.', '_' and '-' only.
	Name string
	// Port is the plain IMAP port on 127.0.0.1 (STARTTLS there when TLS);
	// 0 picks a free one.
	Port int
	// Users is the number of users user0001..userNNNN. Default 10.
	Users int
	// Password gives each user's password. Default "pw-" + user. A
	// password may not contain ':', CR or LF (passwd-file syntax).
	Password func(user string) string
	// Messages is the number of small messages in each INBOX. Default 20;
	// a negative value seeds none. Message N has Subject "msg N for USER".
	Messages int
	// BigMessages is the number of ~1 MiB messages in each user's mailbox
	// "Big" (Subject "big N for USER"). Default 0: no "Big" mailbox.
	BigMessages int
	// TLS enables ssl = yes with a certificate for 127.0.0.1, ::1 and
	// "localhost" signed by a CA made at start (Server.CertPEM); STARTTLS
	// then works on Port.
	TLS bool
	// ImplicitTLSPort, with TLS, also listens for imaps: >0 is the port,
	// -1 picks a free one, 0 disables it.
	ImplicitTLSPort int
	// Dir is the working directory, created if missing and kept on Stop.
	// "" makes a temporary one that Stop removes. Dir and every parent
	// must be searchable by others (mode o+x): Dovecot's unprivileged
	// processes read the passwd-file and the maildirs in it.
	Dir string
	// Large, if not zero, adds the user LargeUser with mailboxes at the
	// scale of real ones (see Large). Start then also has Dovecot index
	// its INBOX.
	Large Large
	// ProcessLimit is `service imap { process_limit }`: Dovecot runs one
	// process per IMAP session, so it caps the sessions the instance
	// holds at once. Default 2000. The client limit of the shared
	// services (auth, anvil) follows it.
	ProcessLimit int
}

func (o Options) processLimit() int {
	if o.ProcessLimit <= 0 {
		return 2000
	}
	return o.ProcessLimit
}

func (o Options) name() string {
	if o.Name == "" {
		return "backend-1"
	}
	return o.Name
}

func (o Options) users() int {
	if o.Users <= 0 {
		return 10
	}
	return o.Users
}

func (o Options) messages() int {
	switch {
	case o.Messages < 0:
		return 0
	case o.Messages == 0:
		return 20
	}
	return o.Messages
}

func (o Options) password(user string) string {
	if o.Password == nil {
		return "pw-" + user
	}
	return o.Password(user)
}

// Errors returned by Start.
var (
	ErrNoDovecot = errors.New("dovecottest: dovecot binary not found")
	ErrNotRoot   = errors.New("dovecottest: must run as root to start dovecot")
)

const (
	startTimeout = 20 * time.Second // until the port answers "* OK"
	stopTimeout  = 10 * time.Second // SIGTERM to exit
	killTimeout  = 5 * time.Second  // SIGKILL until every process is gone
	pauseTimeout = 5 * time.Second  // SIGSTOP/SIGCONT until every process obeys
	pollInterval = 10 * time.Millisecond
)

// Server is a running Dovecot instance.
type Server struct {
	Name    string
	Addr    string // "127.0.0.1:PORT": plain IMAP, STARTTLS when TLS
	TLSAddr string // implicit TLS, when enabled
	Dir     string
	CertPEM []byte // with TLS: the CA that signed the server's certificate, for a client's RootCAs

	confPath   string
	logPath    string
	outPath    string // the master's own stdout/stderr
	passwdPath string
	mailDir    string
	baseDir    string
	removeDir  bool // Dir was made by Start
	removeBase bool // baseDir was made outside Dir (short socket paths)

	pid    int
	exited chan struct{} // closed once the master has been reaped

	mu        sync.Mutex
	users     []string
	passwords map[string]string
	pwStamp   time.Time // mtime given to the passwd-file by the last write
	stopped   bool
	paused    bool
}

// UserName is the name of user i (1-based): "user0001".
func UserName(i int) string { return fmt.Sprintf("user%04d", i) }

// Binary returns the path of the dovecot binary, or ErrNoDovecot.
func Binary() (string, error) { return lookBinary("dovecot", "/usr/sbin/dovecot") }

func lookBinary(name, fallback string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if _, err := os.Stat(fallback); err == nil {
		return fallback, nil
	}
	if name == "dovecot" {
		return "", ErrNoDovecot
	}
	return "", fmt.Errorf("dovecottest: %s binary not found", name)
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9._-]+$`)

// Start writes the instance's files, starts `dovecot -F -c FILE` and waits
// until the IMAP port answers "* OK". If Dovecot dies or does not answer
// in time the error carries the tail of its log.
func Start(opts Options) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	name := opts.name()
	if !nameRE.MatchString(name) {
		return nil, fmt.Errorf("dovecottest: invalid name %q", name)
	}
	if opts.ImplicitTLSPort != 0 && !opts.TLS {
		return nil, errors.New("dovecottest: ImplicitTLSPort needs TLS")
	}

	s := &Server{Name: name, exited: make(chan struct{}), passwords: make(map[string]string)}
	if err := s.prepare(opts); err != nil {
		s.removeFiles()
		return nil, err
	}
	// A port picked here may be taken by someone else before Dovecot
	// binds it; then try again with fresh ports.
	const attempts = 3
	for i := 1; ; i++ {
		err = s.launch(bin, opts)
		if err == nil {
			if err := s.indexLarge(opts.Large); err != nil {
				return nil, errors.Join(err, s.Stop())
			}
			return s, nil
		}
		retry := i < attempts && (opts.Port == 0 || opts.ImplicitTLSPort == -1) &&
			strings.Contains(err.Error(), "Address already in use")
		if !retry {
			s.removeFiles()
			return nil, err
		}
		s.exited = make(chan struct{})
	}
}

// prepare makes the directories, passwd-file, maildirs and certificate.
func (s *Server) prepare(opts Options) error {
	if err := s.makeDirs(opts.Dir); err != nil {
		return err
	}
	if err := s.addUsers(opts); err != nil {
		return err
	}
	if err := s.seedMail(opts); err != nil {
		return err
	}
	if opts.TLS {
		return s.writeCert()
	}
	return nil
}

// makeDirs makes dir (a temporary one when "") and the directories under
// it that Dovecot needs, and names the files it will hold.
func (s *Server) makeDirs(dir string) error {
	if dir == "" {
		d, err := os.MkdirTemp("", "dovecottest-")
		if err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
		dir, s.removeDir = d, true
	} else {
		d, err := filepath.Abs(dir)
		if err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
		dir = d
	}
	s.Dir = dir
	if err := os.Chmod(dir, 0o755); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	if err := checkSearchable(dir); err != nil {
		return err
	}

	// Unix socket paths are limited to 108 bytes; Dovecot's longest under
	// base_dir is about 30. Keep base_dir short even for a deep Dir.
	s.baseDir = filepath.Join(dir, "run")
	if len(s.baseDir) > 60 {
		b, err := os.MkdirTemp("/tmp", "dct-")
		if err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
		s.baseDir, s.removeBase = b, true
	}
	if err := os.MkdirAll(s.baseDir, 0o755); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	if err := os.Chmod(s.baseDir, 0o755); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "state"), 0o755); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	s.confPath = filepath.Join(dir, "dovecot.conf")
	s.logPath = filepath.Join(dir, "dovecot.log")
	s.outPath = filepath.Join(dir, "master.out")
	s.passwdPath = filepath.Join(dir, "passwd")
	s.mailDir = filepath.Join(dir, "mail")
	return nil
}

// addUsers names the users opts asks for and writes the passwd file.
func (s *Server) addUsers(opts Options) error {
	n := opts.users()
	for i := 1; i <= n; i++ {
		u := UserName(i)
		pw := opts.password(u)
		if err := checkPassword(pw); err != nil {
			return fmt.Errorf("dovecottest: password of %s: %w", u, err)
		}
		s.users = append(s.users, u)
		s.passwords[u] = pw
	}
	if !opts.Large.zero() {
		pw := opts.password(LargeUser)
		if err := checkPassword(pw); err != nil {
			return fmt.Errorf("dovecottest: password of %s: %w", LargeUser, err)
		}
		s.users = append(s.users, LargeUser)
		s.passwords[LargeUser] = pw
	}
	return s.writePasswdLocked()
}

func (s *Server) seedMail(opts Options) error {
	if err := os.MkdirAll(s.mailDir, 0o755); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	for _, u := range s.users {
		if u == LargeUser {
			if err := seedLarge(filepath.Join(s.mailDir, u), opts.Large, mailUID, mailUID); err != nil {
				return fmt.Errorf("dovecottest: seed %s: %w", u, err)
			}
			continue
		}
		if err := seedUser(filepath.Join(s.mailDir, u), u, opts.messages(), opts.BigMessages, mailUID, mailUID); err != nil {
			return fmt.Errorf("dovecottest: seed %s: %w", u, err)
		}
	}
	return nil
}

// writeCert writes a certificate for localhost into s.Dir, where the
// rendered configuration expects it.
func (s *Server) writeCert() error {
	cert, err := testkit.NewCert("localhost", "127.0.0.1", "::1")
	if err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	if _, _, _, err := cert.WriteFiles(s.Dir); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	s.CertPEM = cert.CAPEM
	return nil
}

// checkSearchable fails early, with a clear message, when an unprivileged
// Dovecot process could not reach dir.
func checkSearchable(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("dovecottest: %s is not searchable by others (mode %v); Dovecot's unprivileged processes could not reach %s", d, fi.Mode().Perm(), dir)
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// launch picks ports, writes the config and starts the master.
func (s *Server) launch(bin string, opts Options) error {
	port, tlsPort, err := s.pickPorts(opts)
	if err != nil {
		return err
	}
	if err := s.writeConfig(opts, port, tlsPort); err != nil {
		return err
	}
	if err := s.startMaster(bin); err != nil {
		return err
	}
	if err := s.waitReady(); err != nil {
		_ = s.Kill()
		return fmt.Errorf("dovecottest: %s did not come up on %s: %w\n%s", s.Name, s.Addr, err, s.tail())
	}
	return nil
}

// pickPorts takes the ports opts names or free ones, and sets s.Addr and
// s.TLSAddr to them.
func (s *Server) pickPorts(opts Options) (port, tlsPort int, err error) {
	port = opts.Port
	if port == 0 {
		p, err := freePort()
		if err != nil {
			return 0, 0, err
		}
		port = p
	}
	tlsPort = opts.ImplicitTLSPort
	if tlsPort == -1 {
		p, err := freePort()
		if err != nil {
			return 0, 0, err
		}
		tlsPort = p
	}
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	s.TLSAddr = ""
	if tlsPort > 0 {
		s.TLSAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(tlsPort))
	}
	return port, tlsPort, nil
}

// writeConfig renders dovecot.conf and empties the logs.
func (s *Server) writeConfig(opts Options, port, tlsPort int) error {
	conf, err := renderConfig(configData{
		Name:         s.Name,
		Instance:     "dovecottest-" + s.Name + "-" + strconv.Itoa(port),
		BaseDir:      s.baseDir,
		StateDir:     filepath.Join(s.Dir, "state"),
		LogPath:      s.logPath,
		Passwd:       s.passwdPath,
		Port:         port,
		TLS:          opts.TLS,
		TLSPort:      tlsPort,
		CertPath:     filepath.Join(s.Dir, "cert.pem"),
		KeyPath:      filepath.Join(s.Dir, "key.pem"),
		UID:          mailUID,
		ProcessLimit: opts.processLimit(),
		// auth and anvil each serve every login and IMAP process.
		ClientLimit: max(5000, 2*opts.processLimit()+1000),
	})
	if err != nil {
		return fmt.Errorf("dovecottest: render config: %w", err)
	}
	if err := os.WriteFile(s.confPath, conf, 0o644); err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	// A retry starts from an empty log so the error shows this attempt.
	for _, p := range []string{s.logPath, s.outPath} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return fmt.Errorf("dovecottest: %w", err)
		}
	}
	return nil
}

// startMaster starts the Dovecot master in the foreground, its output in
// master.out, and returns once it runs (not once it listens).
func (s *Server) startMaster(bin string) error {
	out, err := os.OpenFile(s.outPath, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("dovecottest: %w", err)
	}
	defer out.Close() // the child has its own copy

	cmd := exec.Command(bin, "-F", "-c", s.confPath)
	cmd.Dir = s.Dir
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: a terminal's ^C reaches the harness,
		// which stops Dovecot in order. If the harness dies, so does
		// the master, and it takes its children with it.
		Setpgid:   true,
		Pdeathsig: syscall.SIGTERM,
	}
	started := make(chan error, 1)
	go runMaster(cmd, started, s.exited)
	if err := <-started; err != nil {
		return fmt.Errorf("dovecottest: start %s: %w", bin, err)
	}
	s.pid = cmd.Process.Pid
	return nil
}

// runMaster starts the master and reaps it. The goroutine keeps its OS
// thread locked for the master's lifetime: Pdeathsig fires when the
// thread that forked the child exits, and this thread exits only after
// the master has.
func runMaster(cmd *exec.Cmd, started chan<- error, exited chan<- struct{}) {
	runtime.LockOSThread()
	if err := cmd.Start(); err != nil {
		runtime.UnlockOSThread()
		started <- err
		return
	}
	started <- nil
	_ = cmd.Wait() // the exit status says nothing the log does not
	close(exited)
}

// waitReady polls the port until it answers "* OK", the master exits,
// or startTimeout passes.
func (s *Server) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	var last error
	for {
		select {
		case <-s.exited:
			return errors.New("dovecot exited")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no greeting after %v: %w", startTimeout, last)
		}
		last = Greet(s.Addr)
		if last == nil {
			return nil
		}
		time.Sleep(pollInterval)
	}
}

// Greet connects to addr and reports whether an IMAP server greets with
// "* OK"; it then logs out. Used to wait for a server to come up.
func Greet(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(2 * time.Second)); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "* OK") {
		return fmt.Errorf("greeting %q", strings.TrimSpace(line))
	}
	_, _ = c.Write([]byte("a LOGOUT\r\n"))
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("dovecottest: pick port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// tail is the end of the log and of the master's own output, for errors.
func (s *Server) tail() string {
	var b strings.Builder
	for _, p := range []string{s.outPath, s.logPath} {
		data, _ := os.ReadFile(p)
		data = bytes.TrimSpace(data)
		if len(data) == 0 {
			continue
		}
		lines := strings.Split(string(data), "\n")
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		fmt.Fprintf(&b, "--- %s:\n%s\n", filepath.Base(p), strings.Join(lines, "\n"))
	}
	return b.String()
}

// Stop shuts Dovecot down (SIGTERM to the master, which ends its
// children), waits for it, bounded, and then SIGKILLs whatever is left.
// It removes Dir if Start created it. Stop after Kill only cleans up.
func (s *Server) Stop() error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return nil
	}
	s.stopped = true
	var errs []error
	if s.paused {
		// A stopped master would keep SIGTERM pending.
		if err := s.resumeLocked(); err != nil {
			errs = append(errs, err)
		}
	}
	s.mu.Unlock()

	select {
	case <-s.exited:
	default:
		// Children are remembered first: once the master is gone they
		// are no longer found by parent pid.
		kids, _ := descendants(s.pid)
		_ = syscall.Kill(s.pid, syscall.SIGTERM)
		timer := time.NewTimer(stopTimeout)
		select {
		case <-s.exited:
			timer.Stop()
		case <-timer.C:
			errs = append(errs, fmt.Errorf("dovecottest: %s: master did not exit %v after SIGTERM", s.Name, stopTimeout))
			if err := s.Kill(); err != nil {
				errs = append(errs, err)
			}
		}
		for _, p := range kids {
			_ = p.signal(syscall.SIGKILL)
		}
		if err := waitGone(kids, killTimeout); err != nil {
			errs = append(errs, fmt.Errorf("dovecottest: %s: %w", s.Name, err))
		}
	}
	if err := s.removeFiles(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Server) removeFiles() error {
	var errs []error
	if s.removeBase && s.baseDir != "" {
		if err := os.RemoveAll(s.baseDir); err != nil {
			errs = append(errs, fmt.Errorf("dovecottest: %w", err))
		}
	}
	if s.removeDir && s.Dir != "" {
		if err := os.RemoveAll(s.Dir); err != nil {
			errs = append(errs, fmt.Errorf("dovecottest: %w", err))
		}
	}
	return errors.Join(errs...)
}

// Kill ends the instance abruptly, as a crashed backend: the master is
// stopped (so it cannot fork), then it and every process it started get
// SIGKILL. Kill returns once they are all gone, so the port refuses
// connections and clients' connections are reset or closed. Files stay
// until Stop.
func (s *Server) Kill() error {
	select {
	case <-s.exited:
		return nil
	default:
	}
	if err := syscall.Kill(s.pid, syscall.SIGSTOP); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("dovecottest: stop master: %w", err)
	}
	kids, err := descendants(s.pid)
	if err != nil {
		return fmt.Errorf("dovecottest: list processes: %w", err)
	}
	for _, p := range kids {
		if err := p.signal(syscall.SIGKILL); err != nil {
			return fmt.Errorf("dovecottest: kill %d: %w", p.pid, err)
		}
	}
	if err := syscall.Kill(s.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("dovecottest: kill master: %w", err)
	}
	timer := time.NewTimer(killTimeout)
	defer timer.Stop()
	select {
	case <-s.exited:
	case <-timer.C:
		return fmt.Errorf("dovecottest: %s: master not reaped %v after SIGKILL", s.Name, killTimeout)
	}
	if err := waitGone(kids, killTimeout); err != nil {
		return fmt.Errorf("dovecottest: %s: %w", s.Name, err)
	}
	return nil
}

// Pause freezes the whole instance as a hung backend: SIGSTOP to the
// master's process group (and to each of its descendants, in case one
// left the group), so the master and every session stop with their
// sockets open. Connects still complete, up to the listen backlog, but
// nothing is read or answered, not even the greeting. Pause returns once
// every process is stopped. Resume undoes it; Stop and Kill work on a
// paused instance.
func (s *Server) Pause() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.signalAllLocked(syscall.SIGSTOP); err != nil {
		return fmt.Errorf("dovecottest: pause %s: %w", s.Name, err)
	}
	s.paused = true
	if err := s.waitStateLocked(true); err != nil {
		return fmt.Errorf("dovecottest: pause %s: %w", s.Name, err)
	}
	return nil
}

// Resume continues a paused instance (SIGCONT) and returns once every
// process runs again. Resuming an instance that is not paused does no
// harm.
func (s *Server) Resume() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resumeLocked()
}

func (s *Server) resumeLocked() error {
	select {
	case <-s.exited: // killed while paused: nothing left to continue
		s.paused = false
		return nil
	default:
	}
	if err := s.signalAllLocked(syscall.SIGCONT); err != nil {
		return fmt.Errorf("dovecottest: resume %s: %w", s.Name, err)
	}
	s.paused = false
	if err := s.waitStateLocked(false); err != nil {
		return fmt.Errorf("dovecottest: resume %s: %w", s.Name, err)
	}
	return nil
}

// signalAllLocked sends sig to the master's process group and to every
// descendant of the master.
func (s *Server) signalAllLocked(sig syscall.Signal) error {
	select {
	case <-s.exited:
		return errors.New("dovecot is not running")
	default:
	}
	// Setpgid made the master a group leader: its pid is the group id.
	if err := syscall.Kill(-s.pid, sig); err != nil {
		return err
	}
	kids, err := descendants(s.pid)
	if err != nil {
		return err
	}
	for _, p := range kids {
		if err := p.signal(sig); err != nil {
			return err
		}
	}
	return nil
}

// waitStateLocked polls until the master and its descendants are all
// stopped (or all not stopped), or pauseTimeout passes.
func (s *Server) waitStateLocked(stopped bool) error {
	deadline := time.Now().Add(pauseTimeout)
	for {
		kids, err := descendants(s.pid)
		if err != nil {
			return err
		}
		wrong := 0
		for _, p := range append(kids, proc{pid: s.pid}) {
			st, err := readProcStat(p.pid)
			if err != nil || st.state == 'Z' {
				continue // gone
			}
			if (st.state == 'T') != stopped {
				wrong++
			}
		}
		if wrong == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d processes not yet %s after %v", wrong, map[bool]string{true: "stopped", false: "running"}[stopped], pauseTimeout)
		}
		time.Sleep(pollInterval)
	}
}

// Log returns the whole Dovecot log.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// loginRE matches the imap-login line of a successful login:
// "imap-login: Info: Login: user=<user0001>, method=PLAIN, ...".
var loginRE = regexp.MustCompile(`(?m) imap-login: (?:Info: )?Login: user=<([^>]*)>`)

// Logins counts successful IMAP logins so far. Dovecot writes its log
// through a log process, so a login may show up a moment after the client
// saw its OK; use WaitLogins to wait for a count.
func (s *Server) Logins() (int, error) { return s.countLogins("") }

// LoginsFor counts successful IMAP logins of user so far.
func (s *Server) LoginsFor(user string) (int, error) { return s.countLogins(user) }

func (s *Server) countLogins(user string) (int, error) {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return 0, fmt.Errorf("dovecottest: read log: %w", err)
	}
	n := 0
	for _, m := range loginRE.FindAllSubmatch(b, -1) {
		if user == "" || string(m[1]) == user {
			n++
		}
	}
	return n, nil
}

// WaitLogins polls the log until at least n logins are counted or
// timeout passes, and returns the last count seen. It returns an error
// only if the log cannot be read; compare the count with n.
func (s *Server) WaitLogins(n int, timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for {
		got, err := s.Logins()
		if err != nil || got >= n || time.Now().After(deadline) {
			return got, err
		}
		time.Sleep(pollInterval)
	}
}

// Users lists the instance's users.
func (s *Server) Users() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.users...)
}

// PasswordOf returns user's current password ("" for an unknown user).
func (s *Server) PasswordOf(user string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.passwords[user]
}

// StartAll starts one instance per Options in parallel (seeding mail takes
// each a moment). servers[i] is the instance of opts[i], nil if it did not
// start; err joins the failures.
func StartAll(opts []Options) (servers []*Server, err error) {
	servers = make([]*Server, len(opts))
	errs := make([]error, len(opts))
	var wg sync.WaitGroup
	for i := range opts {
		wg.Go(func() { servers[i], errs[i] = Start(opts[i]) })
	}
	wg.Wait()
	return servers, errors.Join(errs...)
}

// StopAll stops the instances in parallel (each stop takes a moment),
// skipping nil ones, and joins the failures.
func StopAll(servers []*Server) error {
	errs := make([]error, len(servers))
	var wg sync.WaitGroup
	for i, s := range servers {
		if s != nil {
			wg.Go(func() { errs[i] = s.Stop() })
		}
	}
	wg.Wait()
	return errors.Join(errs...)
}
