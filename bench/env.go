package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Binaries the bench runs besides its own builds, and the Debian
// packages that provide them.
const (
	upImapproxyBin = "/usr/sbin/imapproxyd"
	dovecotBin     = "/usr/sbin/dovecot"
)

var debPackages = []string{"imapproxy", "socat", "dovecot-imapd"}

// binaries are the paths of everything the bench executes.
type binaries struct {
	imapproxy, imapbench string // built into the work dir
	socat, upImapproxy   string
	baseline             string // imapproxy at -baseline, if given
}

// buildBaseline builds cmd/imapproxy as it was at rev into dir, from a
// temporary detached worktree of the repository at root.
func buildBaseline(ctx context.Context, root, dir, rev string) (string, error) {
	src := filepath.Join(dir, "baseline-src")
	git := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "git", append([]string{"-C", root}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("git %s: %w\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := git("worktree", "add", "--detach", src, rev); err != nil {
		return "", err
	}
	defer git("worktree", "remove", "--force", src)
	out := filepath.Join(dir, "imapproxy-baseline")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/imapproxy")
	cmd.Dir = src
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build at %s: %w\n%s", rev, err, msg)
	}
	return out, nil
}

// ensurePackages installs the Debian packages when one of their binaries
// is missing, then makes sure the imapproxy service that the package
// starts is not running: it would hold port 1143 and compete for CPU.
func ensurePackages(ctx context.Context, log io.Writer) error {
	missing := false
	for _, p := range []string{upImapproxyBin, dovecotBin} {
		if _, err := os.Stat(p); err != nil {
			missing = true
		}
	}
	if _, err := exec.LookPath("socat"); err != nil {
		missing = true
	}
	if missing {
		fmt.Fprintf(log, "bench: installing %s with apt-get\n", strings.Join(debPackages, " "))
		install := func() error {
			return runCmd(ctx, log, []string{"DEBIAN_FRONTEND=noninteractive"},
				"apt-get", append([]string{"install", "-y", "-q"}, debPackages...)...)
		}
		if err := install(); err != nil {
			// Stale package lists are the usual cause; refresh once.
			if uerr := runCmd(ctx, log, nil, "apt-get", "update", "-q"); uerr != nil {
				return fmt.Errorf("apt-get update: %w", uerr)
			}
			if err := install(); err != nil {
				return fmt.Errorf("apt-get install %s: %w", strings.Join(debPackages, " "), err)
			}
		}
	}
	return stopDebianImapproxy(ctx, log)
}

// stopDebianImapproxy stops the package's own imapproxy service if it
// runs: an imapproxyd that is not a child of this process. It uses the
// service's init script, never a signal to processes by name.
func stopDebianImapproxy(ctx context.Context, log io.Writer) error {
	running := func() []int {
		s, err := takeSnapshot()
		if err != nil {
			return nil
		}
		var pids []int
		for pid, p := range s.procs {
			if p.comm != "imapproxyd" || p.ppid == os.Getpid() {
				continue
			}
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			if exe == upImapproxyBin {
				pids = append(pids, pid)
			}
		}
		return pids
	}
	pids := running()
	if len(pids) == 0 {
		return nil
	}
	fmt.Fprintf(log, "bench: the Debian imapproxy service is running (pids %v); stopping it\n", pids)
	var err error
	if _, serr := exec.LookPath("systemctl"); serr == nil && isSystemd() {
		err = runCmd(ctx, log, nil, "systemctl", "stop", "imapproxy")
	} else if _, serr := os.Stat("/etc/init.d/imapproxy"); serr == nil {
		err = runCmd(ctx, log, nil, "/etc/init.d/imapproxy", "stop")
	} else {
		err = runCmd(ctx, log, nil, "service", "imapproxy", "stop")
	}
	if err != nil {
		return fmt.Errorf("stop the Debian imapproxy service: %w", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(running()) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("the Debian imapproxy service still runs (pids %v) after stop", running())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

func isSystemd() bool {
	_, err := os.Stat("/run/systemd/system")
	return err == nil
}

// runCmd runs a command with its output to log.
func runCmd(ctx context.Context, log io.Writer, env []string, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = log
	cmd.Stderr = log
	return cmd.Run()
}

// moduleRoot is the directory of the main module's go.mod.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the imapproxy module (go env GOMOD is empty)")
	}
	return filepath.Dir(gomod), nil
}

// buildBinaries builds imapproxy and imapbench into dir.
func buildBinaries(ctx context.Context, root, dir string, log io.Writer) (binaries, error) {
	var bins binaries
	for _, p := range []struct {
		pkg string
		dst *string
	}{{"./cmd/imapproxy", &bins.imapproxy}, {"./cmd/imapbench", &bins.imapbench}} {
		out := filepath.Join(dir, filepath.Base(p.pkg))
		cmd := exec.CommandContext(ctx, "go", "build", "-o", out, p.pkg)
		cmd.Dir = root
		var stderr bytes.Buffer
		cmd.Stdout = log
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return bins, fmt.Errorf("go build %s: %w\n%s", p.pkg, err, stderr.String())
		}
		*p.dst = out
	}
	socat, err := exec.LookPath("socat")
	if err != nil {
		return bins, err
	}
	bins.socat = socat
	bins.upImapproxy = upImapproxyBin
	return bins, nil
}

// raiseNofile raises RLIMIT_NOFILE as far as it goes: the hard limit,
// raised first when the process may (CAP_SYS_RESOURCE). Children (Dovecot,
// the proxies, imapbench) inherit it; the explicit Setrlimit also stops
// os/exec from restoring the original soft limit in them.
func raiseNofile(want uint64) (syscall.Rlimit, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return lim, err
	}
	if lim.Max < want {
		up := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up); err == nil {
			return up, nil
		}
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return lim, err
	}
	return lim, nil
}

func nofileHard() int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	return int(min(lim.Max, 1<<30))
}

// machineFacts describes where the run happened.
func machineFacts(ctx context.Context) []string {
	out := func(name string, args ...string) string {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		b, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		if err != nil {
			return "unknown (" + err.Error() + ")"
		}
		s := strings.TrimSpace(string(b))
		s, _, _ = strings.Cut(s, "\n")
		return s
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	facts := []string{
		"nproc: " + strconv.Itoa(runtime.NumCPU()),
		"cpu: " + cpuModel(),
		"memory: " + memTotal(),
		"kernel: " + strings.TrimSpace(string(kernel)),
		"go: " + out("go", "version"),
		"dovecot --version: " + out(dovecotBin, "--version"),
		"imapproxy (up-imapproxy) package: " + out("dpkg-query", "-W", "-f", "${Version}", "imapproxy"),
		"socat package: " + out("dpkg-query", "-W", "-f", "${Version}", "socat"),
	}
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		facts = append(facts, fmt.Sprintf("RLIMIT_NOFILE: %d (hard %d)", lim.Cur, lim.Max))
	}
	if la, err := os.ReadFile("/proc/loadavg"); err == nil {
		facts = append(facts, "load average at start: "+strings.Join(strings.Fields(string(la))[:3], " "))
	}
	return facts
}

// sourceVersion names the tree the binaries were built from.
func sourceVersion(ctx context.Context, root string) string {
	cmd := exec.CommandContext(ctx, "git", "describe", "--always", "--dirty", "--abbrev=12")
	cmd.Dir = root
	b, err := cmd.Output()
	if err != nil {
		return "unknown (not a git checkout?)"
	}
	v := strings.TrimSpace(string(b))
	if s, ok := strings.CutSuffix(v, "-dirty"); ok {
		return "commit " + s + " with uncommitted changes"
	}
	return "commit " + v
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func memTotal() string {
	v, err := statusField("/proc/meminfo", "MemTotal:")
	if err != nil {
		return "unknown"
	}
	return fmt.Sprintf("%.1f GiB", float64(v)/(1<<30))
}
