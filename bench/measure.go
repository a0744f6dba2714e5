package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// imapbench's -timeout (per dial, and per command with its reply). A
// connection left in a full accept queue never gets its greeting and
// fails after it, so it also bounds how long such a stall can hold a run.
const (
	cycleTimeout  = 10 * time.Second
	idleOpTimeout = 30 * time.Second
)

// summary is imapbench's JSON line (the fields the bench uses).
type summary struct {
	Workload    string           `json:"workload"`
	Concurrency int              `json:"concurrency"`
	DurationS   float64          `json:"duration_s"`
	Cycles      int64            `json:"cycles"`
	CyclesPerS  float64          `json:"cycles_per_s"`
	Errors      map[string]int64 `json:"errors"`
	CycleMS     latency          `json:"cycle_ms"`
	LoginMS     latency          `json:"login_ms"`
	Logins      int64            `json:"logins"`
	Bytes       int64            `json:"bytes"`
	MBPerS      float64          `json:"mb_per_s"`
	Backends    map[string]int64 `json:"backends"`
	Held        int64            `json:"held"`
	Reused      int64            `json:"reused"`
	Messages    int64            `json:"messages"`
}

type latency struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func (s *summary) errorCount() int64 {
	var n int64
	for _, v := range s.Errors {
		n += v
	}
	return n
}

// workload is one imapbench run's parameters.
type workload struct {
	kind     string // webmail | login | bulk | idle
	conc     int    // workers; idle: parallel dialers
	dur      time.Duration
	count    int64 // 0: no limit
	sessions int   // idle: requested sessions (the bench may cap them)
	hold     time.Duration
}

func (w workload) label() string {
	if w.kind == "idle" {
		return "idle"
	}
	return fmt.Sprintf("%s c%d", w.kind, w.conc)
}

// row is one (target, workload) measurement.
type row struct {
	target   string
	workload string
	kind     string
	conc     int
	sessions int // idle: sessions opened (after caps)
	skipped  string
	err      error

	sum           *summary
	backendLogins int
	proxyCPU      time.Duration // the target's process tree, during the run
	dovecotCPU    time.Duration // every backend's process tree, during the run
	overflows     int64
	hasProxy      bool
	memBase       int64 // bytes, idle only
	memHeld       int64
	memKind       memKind
}

// counters are read before and after each run.
type counters struct {
	logins     int
	dovecotCPU time.Duration
	proxyCPU   time.Duration
	overflows  int64
}

func (b *bench) readCounters(proxyPid int) (counters, error) {
	var c counters
	var errs []error
	n, err := b.settledLogins()
	errs = append(errs, err)
	c.logins = n
	s, err := takeSnapshot()
	if err != nil {
		return c, err
	}
	for _, be := range b.backends {
		c.dovecotCPU += s.treeCPU(be.master)
	}
	if proxyPid > 0 {
		c.proxyCPU = s.treeCPU(proxyPid)
	}
	c.overflows, err = listenOverflows()
	errs = append(errs, err)
	return c, errors.Join(errs...)
}

// settledLogins sums the backends' successful logins once the count has
// stopped moving: Dovecot logs through a log process, a moment late.
func (b *bench) settledLogins() (int, error) {
	sum := func() (int, error) {
		n := 0
		for _, be := range b.backends {
			k, err := be.srv.Logins()
			if err != nil {
				return 0, err
			}
			n += k
		}
		return n, nil
	}
	last, err := sum()
	if err != nil {
		return 0, err
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(150 * time.Millisecond)
		n, err := sum()
		if err != nil {
			return 0, err
		}
		if n == last {
			return n, nil
		}
		last = n
	}
	return last, nil
}

// measure runs one workload against a running instance.
func (b *bench) measure(ctx context.Context, t *target, rowName string, in *instance, w workload) *row {
	r := &row{target: rowName, workload: w.label(), kind: w.kind, conc: w.conc, hasProxy: in.proc != nil, memKind: t.mem}
	b.logf("%s: %s", rowName, w.label())
	pid := 0
	if in.proc != nil {
		pid = in.proc.pid()
	}
	before, err := b.readCounters(pid)
	if err != nil {
		r.err = err
		return r
	}
	args := []string{"-workload", w.kind, "-c", strconv.Itoa(w.conc)}
	if w.kind == "idle" {
		r.sessions = w.sessions
		signal := filepath.Join(b.work, fmt.Sprintf("idle-%d.signal", time.Now().UnixNano()))
		args = append(args, "-sessions", strconv.Itoa(w.sessions), "-idle-hold", w.hold.String(),
			"-idle-signal", signal, "-id")
		if pid > 0 {
			r.memBase, err = b.memOf(t.mem, pid)
			if err != nil {
				r.err = err
				return r
			}
		}
		r.sum, r.memHeld, r.err = b.runIdle(ctx, in.addr, w, args, signal, t.mem, pid)
	} else {
		r.sum, r.err = b.imapbench(ctx, in.addr, w, args)
	}
	if r.err != nil {
		return r
	}
	b.logf("%s: %s: %d cycles, %d held, errors %v", rowName, w.label(), r.sum.Cycles, r.sum.Held, r.sum.Errors)
	after, err := b.readCounters(pid)
	if err != nil {
		r.err = err
		return r
	}
	r.backendLogins = after.logins - before.logins
	r.dovecotCPU = after.dovecotCPU - before.dovecotCPU
	r.proxyCPU = after.proxyCPU - before.proxyCPU
	r.overflows = after.overflows - before.overflows
	if in.proc != nil && in.proc.exited() {
		r.err = fmt.Errorf("%s exited during the run (%v):\n%s", in.proc.name, in.proc.waitErr, in.proc.logTail())
	}
	return r
}

func (b *bench) memOf(k memKind, pid int) (int64, error) {
	switch k {
	case memRSS:
		return vmRSS(pid)
	case memPss:
		return treePss(pid)
	}
	return 0, nil
}

// runIdle runs the idle workload and samples the target's memory while
// every session is held (the -idle-signal file exists).
func (b *bench) runIdle(ctx context.Context, addr string, w workload, args []string, signal string, mk memKind, pid int) (*summary, int64, error) {
	type result struct {
		sum *summary
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := b.imapbench(ctx, addr, w, args)
		done <- result{s, err}
	}()
	var held int64
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	sampled := false
	for {
		select {
		case res := <-done:
			if res.err == nil && !sampled && pid > 0 {
				res.err = errors.New("imapbench ended before the bench saw all sessions held (-idle-signal)")
			}
			return res.sum, held, res.err
		case <-tick.C:
		}
		if sampled || pid == 0 {
			continue
		}
		if _, err := os.Stat(signal); err != nil {
			continue
		}
		// All sessions are held; let the proxy settle, then take the
		// largest of a few samples.
		for i := range 4 {
			if i > 0 {
				time.Sleep(250 * time.Millisecond)
			}
			if v, err := b.memOf(mk, pid); err == nil {
				held = max(held, v)
			}
		}
		sampled = true
	}
}

// imapbench runs bin/imapbench against addr and parses its JSON line. On
// ctx's end it gets SIGINT and still reports.
func (b *bench) imapbench(ctx context.Context, addr string, w workload, args []string) (*summary, error) {
	opTimeout := cycleTimeout
	if w.kind == "idle" {
		opTimeout = idleOpTimeout
	}
	full := append([]string{"-addr", addr, "-users", userRange, "-password", password,
		"-duration", w.dur.String(), "-timeout", opTimeout.String(), "-json"}, args...)
	if w.count > 0 {
		full = append(full, "-count", strconv.FormatInt(w.count, 10))
	}
	// Bounded: the run's own duration (or the idle hold), plus time to
	// open and close sessions, plus imapbench's per-operation timeout.
	bound := w.dur + w.hold + 3*time.Minute
	rctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	cmd := exec.CommandContext(rctx, b.bins.imapbench, full...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	cmd.WaitDelay = 30 * time.Second
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	logf, err := os.OpenFile(filepath.Join(b.work, "imapbench.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "== imapbench %s\n", strings.Join(full, " "))
	cmd.Stderr = logf
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("imapbench %s: %w (see %s)", strings.Join(full, " "), err, logf.Name())
	}
	if rctx.Err() != nil {
		return nil, fmt.Errorf("imapbench %s: not done after %v", strings.Join(full, " "), bound)
	}
	out := bytes.TrimSpace(stdout.Bytes())
	if i := bytes.LastIndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	var s summary
	if err := json.Unmarshal(out, &s); err != nil {
		return nil, fmt.Errorf("imapbench: parse %q: %w", out, err)
	}
	fmt.Fprintf(logf, "%s\n", out)
	return &s, nil
}

// probeShares learns how a multi-backend proxy spreads the users: one
// login per user with ID, counted by the backend that answered.
func (b *bench) probeShares(ctx context.Context, in *instance) (map[string]int64, error) {
	s, err := b.imapbench(ctx, in.addr, workload{kind: "login", conc: 1, dur: time.Minute, count: int64(numUsers)},
		[]string{"-workload", "login", "-c", "1", "-id"})
	if err != nil {
		return nil, err
	}
	if n := s.errorCount(); n > 0 {
		return nil, fmt.Errorf("share probe: %d errors: %v", n, s.Errors)
	}
	return s.Backends, nil
}

// idleCapacity is how many idle sessions the target can hold within the
// backends' process limit (less the IMAP processes already running and a
// margin) and the file descriptor limit. shares maps backend name to the
// number of users (of numUsers) it serves; nil means one backend.
func (b *bench) idleCapacity(t *target, shares map[string]int64) (int, string) {
	const margin = 100
	s, err := takeSnapshot()
	if err != nil {
		return 0, err.Error()
	}
	var why []string
	limit := 1 << 30
	if len(t.backends) == 1 {
		be := t.backends[0]
		live := s.countComm(be.master, "imap")
		limit = dovecotProcessLimit - live - margin
		why = append(why, fmt.Sprintf("Dovecot process_limit %d on %s (%d IMAP processes already running, margin %d)",
			dovecotProcessLimit, be.srv.Name, live, margin))
	} else {
		perUser := 1 << 30
		var parts []string
		names := make([]string, 0, len(shares))
		for name := range shares {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			k := shares[name]
			be := b.backendNamed(name)
			if be == nil || k <= 0 {
				continue
			}
			live := s.countComm(be.master, "imap")
			perUser = min(perUser, (dovecotProcessLimit-live-margin)/int(k))
			parts = append(parts, fmt.Sprintf("%s: %d users, %d running", name, k, live))
		}
		limit = perUser * numUsers
		why = append(why, fmt.Sprintf("Dovecot process_limit %d per backend with users spread %s (margin %d)",
			dovecotProcessLimit, strings.Join(parts, "; "), margin))
	}
	// imapbench holds one descriptor per session, a proxy two.
	fdLimit := nofileHard() - 200
	if t.mem != memNone {
		fdLimit = fdLimit / 2
	}
	if fdLimit < limit {
		limit = fdLimit
		why = append(why, fmt.Sprintf("RLIMIT_NOFILE %d (a proxy holds two descriptors per session)", nofileHard()))
	}
	return max(limit, 0), strings.Join(why, "; ")
}

func (b *bench) backendNamed(name string) *backend {
	for _, be := range b.backends {
		if be.srv.Name == name {
			return be
		}
	}
	return nil
}

// waitDrained waits (bounded) until the backends run no more IMAP
// processes than before a run, so that a run's exiting sessions do not
// cost the next one CPU.
func (b *bench) waitDrained(ctx context.Context, baseline int, timeout time.Duration) {
	t0 := time.Now()
	deadline := t0.Add(timeout)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		if b.liveIMAP() <= baseline {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.logf("backends still run %d IMAP processes after %v (waited for %d)", b.liveIMAP(), time.Since(t0).Round(time.Millisecond), baseline)
}

func (b *bench) liveIMAP() int {
	s, err := takeSnapshot()
	if err != nil {
		return 0
	}
	n := 0
	for _, be := range b.backends {
		n += s.countComm(be.master, "imap")
	}
	return n
}
