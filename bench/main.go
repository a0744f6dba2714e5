// Command bench runs imapproxy's side-by-side benchmark on 127.0.0.1, in
// one run: real Dovecot backends, and the same imapbench workloads against
// Dovecot directly, a socat relay, SquirrelMail's up-imapproxy and
// imapproxy (cold and warm cache, one backend; three static backends;
// three backends from Consul). It prints one markdown table.
//
//	go run ./bench                     # full run, about 8-9 minutes on 2 cores
//	go run ./bench -quick              # every target and workload once, tiny counts (CI)
//	go run ./bench -out /tmp/bench.md  # the table to a file instead of stdout
//
// It must run as root on Debian (Dovecot runs as root with its own
// config; up-imapproxy drops to nobody). It installs the Debian packages
// imapproxy, socat and dovecot-imapd with apt-get when they are missing
// and stops the Debian imapproxy service if it runs. The Consul target
// needs the agent built by tools/consul/build.sh; without it that target
// is reported as skipped (IMAPPROXY_REQUIRE_CONSUL=1 makes it an error).
//
// Every process it starts is stopped when it ends, also on failure and
// on SIGINT/SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/imapproxy/imapproxy/internal/consultest"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

// The mail setup of every backend.
const (
	numBackends = 3
	numUsers    = 50
	userRange   = "user0001-user0050"
	password    = "secret"
	messages    = 200
)

// options are the command line.
type options struct {
	quick       bool
	out         string
	keep        bool
	webmailDur  time.Duration
	loginDur    time.Duration
	bulkDur     time.Duration
	idleCluster int // idle sessions requested through imapproxy with 3 backends
	idleOther   int // idle sessions requested on the other targets (up-imapproxy: as many as it can)
	idleHold    time.Duration
	targets     set    // only these targets (by name); empty: all
	workloads   set    // only these workloads (by label); empty: all
	baseline    string // a git revision to compare with, side by side; only that is measured
	command     string
	log         io.Writer // progress
}

func main() {
	os.Exit(mainErr())
}

func mainErr() int {
	o := options{log: os.Stderr}
	flag.BoolVar(&o.quick, "quick", false, "CI mode: every target and workload once with tiny counts; checks that the benchmark runs")
	flag.StringVar(&o.out, "out", "", "write the report to this file (default stdout)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (configs, logs, imapbench output)")
	flag.DurationVar(&o.webmailDur, "webmail-duration", 12*time.Second, "duration of each webmail run (full mode)")
	flag.DurationVar(&o.loginDur, "login-duration", 6*time.Second, "duration of each login run (full mode)")
	flag.DurationVar(&o.bulkDur, "bulk-duration", 6*time.Second, "duration of each bulk run (full mode)")
	flag.IntVar(&o.idleCluster, "idle-sessions", 10000, "idle sessions through imapproxy with three static backends (full mode; capped by what the backends and fd limit allow)")
	flag.IntVar(&o.idleOther, "idle-sessions-other", 400, "idle sessions on the other targets (full mode); up-imapproxy gets as many as one backend allows")
	flag.DurationVar(&o.idleHold, "idle-hold", 3*time.Second, "how long the idle workload holds its sessions once all are open (full mode); longer leaves time to profile the proxy")
	flag.Var(&o.targets, "targets", "comma-separated targets to run, of: "+strings.Join(planNames(), ", ")+" (default all)")
	flag.Var(&o.workloads, "workloads", "comma-separated workloads to run, of: "+strings.Join(workloadLabels(false), ", ")+" (default all)")
	flag.StringVar(&o.baseline, "baseline", "", "measure only this code against imapproxy built at this git revision (e.g. main~3), side by side: webmail c8 warm and bulk c4 in alternating rounds; for a change on the hot path")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bench: unexpected arguments %q\n", flag.Args())
		return 2
	}
	if err := o.targets.check("-targets", planNames()); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	if err := o.workloads.check("-workloads", workloadLabels(o.quick)); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	o.command = "go run ./bench"
	if len(os.Args) > 1 {
		o.command += " " + strings.Join(os.Args[1:], " ")
	}

	// A closed stdout or stderr (| head) must not kill the bench before
	// it has stopped its processes: with SIGPIPE caught, such writes
	// return EPIPE instead. (Caught, not ignored: children get the
	// default disposition back on exec.)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, o)
	if rep != nil {
		if werr := rep.write(o.out); werr != nil {
			fmt.Fprintln(os.Stderr, "bench:", werr)
			return 1
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	return 0
}

// bench is one run: its work dir, binaries, backends, and every process
// it started.
type bench struct {
	o        options
	start    time.Time
	work     string
	bins     binaries
	backends []*backend

	mu       sync.Mutex
	children []*child
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.o.log, "bench: %5.1fs "+format+"\n", append([]any{time.Since(b.start).Seconds()}, args...)...)
}

// track remembers a child so that cleanup stops it whatever happens.
func (b *bench) track(c *child) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.children = append(b.children, c)
}

func (b *bench) stopChildren() error {
	b.mu.Lock()
	cs := b.children
	b.children = nil
	b.mu.Unlock()
	var errs []error
	for _, c := range cs {
		if err := c.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// run does the whole benchmark and returns the report (partial on error).
func run(ctx context.Context, o options) (rep *report, err error) {
	if o.log == nil {
		o.log = io.Discard
	}
	start := time.Now()
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (Dovecot runs as root with its own config)")
	}
	if err := ensurePackages(ctx, o.log); err != nil {
		return nil, err
	}
	lim, err := raiseNofile(1 << 17)
	if err != nil {
		return nil, fmt.Errorf("raise RLIMIT_NOFILE: %w", err)
	}

	work, err := os.MkdirTemp("", "imapproxy-bench-")
	if err != nil {
		return nil, err
	}
	// Dovecot's unprivileged processes must reach the maildirs below.
	if err := os.Chmod(work, 0o755); err != nil {
		return nil, err
	}
	b := &bench{o: o, work: work, start: start}
	rep = &report{command: o.command, quick: o.quick, started: start}
	defer func() {
		b.logf("stopping everything")
		if cerr := b.cleanup(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		rep.elapsed = time.Since(start)
		b.logf("done")
		if o.keep {
			fmt.Fprintf(o.log, "bench: work directory kept: %s\n", work)
		} else {
			os.RemoveAll(work)
		}
	}()
	rep.facts = machineFacts(ctx)
	if lim.Max < 1<<17 {
		rep.notes = append(rep.notes, fmt.Sprintf("RLIMIT_NOFILE: the hard limit is %d and could not be raised; "+
			"a proxy holds two descriptors per session, so no proxy here can hold more than about %d sessions", lim.Max, (lim.Max-200)/2))
	}

	root, err := moduleRoot(ctx)
	if err != nil {
		return rep, err
	}
	rep.facts = append(rep.facts, "imapproxy source: "+sourceVersion(ctx, root))
	b.logf("building imapproxy and imapbench")
	if b.bins, err = buildBinaries(ctx, root, work, o.log); err != nil {
		return rep, err
	}
	if o.baseline != "" {
		b.logf("building imapproxy at %s", o.baseline)
		if b.bins.baseline, err = buildBaseline(ctx, root, work, o.baseline); err != nil {
			return rep, err
		}
		rep.facts = append(rep.facts, "baseline: imapproxy at "+o.baseline)
	}
	bigN := 4
	if o.quick {
		bigN = 1
	}
	b.logf("starting %d Dovecot backends (%d users, %d messages each, %d x 1 MiB in Big)", numBackends, numUsers, messages, bigN)
	if err := b.startBackends(bigN); err != nil {
		return rep, err
	}
	rep.setup = fmt.Sprintf("%d Dovecot backends on 127.0.0.1, users %s (password %q), %d small messages in INBOX and %d x ~1 MiB in \"Big\" per user",
		numBackends, userRange, password, messages, bigN)

	if o.baseline != "" {
		err = b.compareBaseline(ctx, rep)
	} else {
		err = b.runAll(ctx, rep)
	}
	if ctx.Err() != nil {
		err = errors.Join(err, fmt.Errorf("interrupted: %w", ctx.Err()))
	}
	return rep, err
}

// cleanup stops children, then the backends.
func (b *bench) cleanup() error {
	err := b.stopChildren()
	servers := make([]*dovecottest.Server, len(b.backends))
	for i, be := range b.backends {
		servers[i] = be.srv
	}
	return errors.Join(err, dovecottest.StopAll(servers))
}

// startBackends starts the Dovecots in parallel (seeding takes a moment)
// and finds each master process.
func (b *bench) startBackends(bigN int) error {
	opts := make([]dovecottest.Options, numBackends)
	for i := range opts {
		name := fmt.Sprintf("backend-%d", i+1)
		opts[i] = dovecottest.Options{
			Name:         name,
			Users:        numUsers,
			Password:     func(string) string { return password },
			Messages:     messages,
			BigMessages:  bigN,
			Dir:          filepath.Join(b.work, name),
			ProcessLimit: dovecotProcessLimit,
		}
	}
	servers, err := dovecottest.StartAll(opts)
	for _, s := range servers {
		if s != nil {
			b.backends = append(b.backends, &backend{srv: s})
		}
	}
	if err != nil {
		return err
	}
	snap, err := takeSnapshot()
	if err != nil {
		return err
	}
	for _, be := range b.backends {
		pid, ok := snap.findChild(os.Getpid(), filepath.Join(be.srv.Dir, "dovecot.conf"))
		if !ok {
			return fmt.Errorf("cannot find the Dovecot master of %s", be.srv.Name)
		}
		be.master = pid
	}
	return nil
}

// workloads are the timed workloads of one pass, in order.
func (b *bench) workloads() []workload {
	var out []workload
	for _, w := range b.allWorkloads() {
		if b.o.workloads.has(w.label()) {
			out = append(out, w)
		}
	}
	return out
}

func (b *bench) allWorkloads() []workload {
	if b.o.quick {
		const bound = 30 * time.Second
		return []workload{
			{kind: "webmail", conc: 8, dur: bound, count: 16},
			{kind: "webmail", conc: 32, dur: bound, count: 32},
			{kind: "login", conc: 8, dur: bound, count: 16},
			{kind: "bulk", conc: 2, dur: bound, count: 2},
		}
	}
	return []workload{
		{kind: "webmail", conc: 8, dur: b.o.webmailDur},
		{kind: "webmail", conc: 32, dur: b.o.webmailDur},
		{kind: "login", conc: 8, dur: b.o.loginDur},
		{kind: "bulk", conc: 4, dur: b.o.bulkDur},
	}
}

// hasBulk reports whether the run measures the bulk workload.
func (b *bench) hasBulk() bool {
	for _, w := range b.workloads() {
		if w.kind == "bulk" {
			return true
		}
	}
	return false
}

// idleWorkload is the idle workload with n sessions requested.
func (b *bench) idleWorkload(n int) workload {
	if b.o.quick {
		return workload{kind: "idle", conc: 8, dur: time.Minute, sessions: 50, hold: time.Second}
	}
	return workload{kind: "idle", conc: 16, dur: 5 * time.Minute, sessions: n, hold: b.o.idleHold}
}

// targetNames lists every (target, workload) row the report has, in order.
func targetNames() []string {
	return []string{"direct", "socat", "up-imapproxy", "imapproxy cold", "imapproxy warm", "imapproxy 3 static", "imapproxy 3 consul"}
}

// planNames lists the targets as -targets names them: one per process
// measured (imapproxy 1 backend is the cold and the warm rows).
func planNames() []string {
	return []string{"direct", "socat", "up-imapproxy", "imapproxy 1 backend", "imapproxy 3 static", "imapproxy 3 consul"}
}

func workloadLabels(quick bool) []string {
	b := &bench{o: options{quick: quick}}
	var out []string
	for _, w := range b.allWorkloads() {
		out = append(out, w.label())
	}
	return append(out, "idle")
}

// runAll measures every target.
func (b *bench) runAll(ctx context.Context, rep *report) error {
	be1 := b.backends[0]
	one := []*backend{be1}
	direct := &target{name: "direct", backends: one, mem: memNone,
		launch: func(context.Context) (*instance, error) {
			return &instance{addr: be1.srv.Addr, stop: func() error { return nil }}, nil
		}}
	socat := &target{name: "socat", backends: one, mem: memPss,
		launch: func(ctx context.Context) (*instance, error) { return b.startSocat(ctx, be1) }}
	up := &target{name: "up-imapproxy", backends: one, mem: memRSS,
		launch: func(ctx context.Context) (*instance, error) { return b.startUpImapproxy(ctx, be1) }}
	proxy1 := &target{name: "imapproxy 1 backend", backends: one, mem: memRSS,
		launch: func(ctx context.Context) (*instance, error) { return b.startImapproxy(ctx, "1 backend", one, nil) }}
	static3 := &target{name: "imapproxy 3 static", backends: b.backends, mem: memRSS,
		launch: func(ctx context.Context) (*instance, error) {
			return b.startImapproxy(ctx, "3 static", b.backends, nil)
		}}
	var agent *consultest.Agent
	consul := &target{name: "imapproxy 3 consul", backends: b.backends, mem: memRSS,
		launch: func(ctx context.Context) (*instance, error) {
			return b.startImapproxy(ctx, "3 consul", b.backends, agent)
		}}
	if _, err := consultest.Binary(); err != nil {
		if os.Getenv(consultest.RequireEnv) == "1" {
			return fmt.Errorf("%w (%s=1)", err, consultest.RequireEnv)
		}
		consul.skip = err.Error()
	}

	idleOther := b.o.idleOther
	plans := []struct {
		t     *target
		rows  []string // one pass per name: cold, warm
		idleN int      // requested
	}{
		{direct, []string{"direct"}, idleOther},
		{socat, []string{"socat"}, idleOther},
		{up, []string{"up-imapproxy"}, 1 << 30}, // as many as it can
		{proxy1, []string{"imapproxy cold", "imapproxy warm"}, idleOther},
		{static3, []string{"imapproxy 3 static"}, b.o.idleCluster},
		{consul, []string{"imapproxy 3 consul"}, idleOther},
	}
	for _, p := range plans {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !b.o.targets.has(p.t.name) {
			continue
		}
		if p.t == consul && consul.skip == "" {
			b.logf("starting a Consul agent and registering %d backends", len(b.backends))
			a, err := b.startConsul()
			if err != nil {
				return fmt.Errorf("consul: %w", err)
			}
			agent = a
		}
		err := b.runPlan(ctx, rep, p.t, p.rows, p.idleN)
		if err == nil && p.t == proxy1 && b.hasBulk() {
			err = b.compareBulk(ctx, rep, direct, socat, proxy1)
		}
		if err == nil && agent != nil && b.o.workloads.has("webmail c8") {
			err = b.compareCluster(ctx, rep, proxy1, consul)
		}
		if agent != nil {
			if serr := agent.Stop(); serr != nil {
				err = errors.Join(err, serr)
			}
			agent = nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// runPlan measures one target: every timed workload per pass on one
// instance, then the idle workload on a fresh instance (so that the
// memory baseline is a fresh process), one idle run per pass.
func (b *bench) runPlan(ctx context.Context, rep *report, t *target, passes []string, idleReq int) error {
	if t.skip != "" {
		for _, name := range passes {
			for _, l := range workloadLabels(b.o.quick) {
				rep.rows = append(rep.rows, &row{target: name, workload: l, skipped: t.skip})
			}
		}
		rep.notes = append(rep.notes, fmt.Sprintf("%s: skipped: %s", t.name, t.skip))
		return nil
	}
	in, err := t.launch(ctx)
	if err != nil {
		return err
	}
	defer in.stop()
	for _, name := range passes {
		for _, w := range b.workloads() {
			r := b.measure(ctx, t, name, in, w)
			rep.rows = append(rep.rows, r)
			if r.err != nil {
				return fmt.Errorf("%s %s: %w", name, w.label(), r.err)
			}
		}
	}
	var shares map[string]int64
	if len(t.backends) > 1 {
		if shares, err = b.probeShares(ctx, in); err != nil {
			return fmt.Errorf("%s: %w", t.name, err)
		}
	}
	if err := in.stop(); err != nil {
		return err
	}

	if !b.o.workloads.has("idle") {
		return nil
	}
	// Idle, on a fresh instance.
	baseline := b.liveIMAP()
	in, err = t.launch(ctx)
	if err != nil {
		return err
	}
	defer in.stop()
	for i, name := range passes {
		w := b.idleWorkload(idleReq)
		if !b.o.quick {
			capN, why := b.idleCapacity(t, shares)
			if capN < w.sessions {
				if idleReq < 1<<30 {
					rep.notes = append(rep.notes, fmt.Sprintf("%s idle: %d sessions instead of the %d asked for, capped by %s", name, capN, idleReq, why))
				} else {
					rep.notes = append(rep.notes, fmt.Sprintf("%s idle: as many sessions as one backend allows, %d: %s", name, capN, why))
				}
				w.sessions = capN
			}
		}
		r := b.measure(ctx, t, name, in, w)
		rep.rows = append(rep.rows, r)
		if r.err != nil {
			return fmt.Errorf("%s idle: %w", name, r.err)
		}
		if len(r.sum.Backends) > 1 || (len(t.backends) > 1 && len(r.sum.Backends) > 0) {
			rep.notes = append(rep.notes, fmt.Sprintf("%s idle: sessions per backend %s", name, formatCounts(r.sum.Backends)))
		}
		if i < len(passes)-1 {
			// The next pass starts once the sessions have ended, but
			// up to max_cached_per_user cached connections stay.
			b.waitDrained(ctx, baseline+numUsers*4+50, 30*time.Second)
		}
	}
	if err := in.stop(); err != nil {
		return err
	}
	b.waitDrained(ctx, baseline, 30*time.Second)
	return nil
}

// set is a comma-separated flag value; the empty set selects everything.
type set map[string]bool

func (s *set) String() string { return strings.Join(slices.Sorted(maps.Keys(*s)), ",") }

func (s *set) Set(v string) error {
	if *s == nil {
		*s = set{}
	}
	for _, n := range strings.Split(v, ",") {
		if n = strings.TrimSpace(n); n != "" {
			(*s)[n] = true
		}
	}
	return nil
}

func (s set) has(name string) bool { return len(s) == 0 || s[name] }

func (s set) check(flagName string, valid []string) error {
	for n := range s {
		if !slices.Contains(valid, n) {
			return fmt.Errorf("%s: unknown name %q (valid: %s)", flagName, n, strings.Join(valid, ", "))
		}
	}
	return nil
}
