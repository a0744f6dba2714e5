package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

const (
	childStopWait = 10 * time.Second // SIGTERM to exit, then SIGKILL
	childKillWait = 30 * time.Second
	readyTimeout  = 20 * time.Second // a target's first greeting
)

// child is a long-running process the bench started (socat, imapproxyd,
// imapproxy). It runs in its own process group, so a terminal's ^C
// reaches only the bench, which stops its children in order, and so that
// stop also ends whatever the child forked (socat's per-connection
// processes). If the bench dies, the child gets SIGKILL.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once reaped
	waitErr error         // readable after done

	stopOnce sync.Once
	stopErr  error
}

// startChild starts argv with stdout and stderr to logPath.
func startChild(name, logPath string, argv ...string) (*child, error) {
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	c := &child{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	started := make(chan error, 1)
	go c.run(started)
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return c, nil
}

// run starts and reaps the child. Its OS thread stays locked for the
// child's lifetime: Pdeathsig fires when the thread that forked exits.
// It is unlocked again at the end rather than left to exit with the
// goroutine: the thread may have forked other children with Pdeathsig
// before it was locked here (the Consul agent does not lock its thread),
// and they must not die with it.
func (c *child) run(started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := c.cmd.Start(); err != nil {
		started <- err
		return
	}
	started <- nil
	c.waitErr = c.cmd.Wait()
	close(c.done)
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the child's process group, waits, then SIGKILLs
// the group. Safe to call more than once.
func (c *child) stop() error {
	c.stopOnce.Do(func() { c.stopErr = c.stopNow() })
	return c.stopErr
}

func (c *child) stopNow() error {
	pgid := c.pid() // Setpgid: the group is named by the child's pid
	if !c.exited() {
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		t := time.NewTimer(childStopWait)
		select {
		case <-c.done:
			t.Stop()
		case <-t.C:
		}
	}
	// Whatever the child forked and left behind goes too.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	t := time.NewTimer(childKillWait)
	defer t.Stop()
	select {
	case <-c.done:
	case <-t.C:
		return fmt.Errorf("%s (pid %d) not reaped %v after SIGKILL", c.name, pgid, childKillWait)
	}
	// Group members are reparented to init, not to us: wait for them.
	deadline := time.Now().Add(childKillWait)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: processes of group %d still alive", c.name, pgid)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// groupAlive: does any process of group pgid still exist (kill 0)?
func groupAlive(pgid int) bool {
	err := syscall.Kill(-pgid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// logTail is the end of the child's output, for error messages.
func (c *child) logTail() string {
	b, _ := os.ReadFile(c.logPath)
	return lastLines(string(b), 20)
}

// waitGreeting polls addr until it answers "* OK", c (if any) exits, or
// timeout passes.
func waitGreeting(addr string, c *child, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if c != nil && c.exited() {
			return fmt.Errorf("%s exited (%v):\n%s", c.name, c.waitErr, c.logTail())
		}
		if last = dovecottest.Greet(addr); last == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: no greeting after %v: %w", addr, timeout, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freePort picks a port on 127.0.0.1 that is free now. Someone may take
// it before the target binds it; starting a target therefore retries with
// fresh ports.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
