// Command imapbench is an IMAP load generator for imapproxy and the
// servers behind it. It is itself a complete IMAP client for what it
// sends: literals in responses, untagged data, tagged completion; one
// write per command, TCP_NODELAY.
//
//	imapbench -addr 127.0.0.1:1143 -workload webmail -c 8 -users user0001-user0050 -password secret -duration 10s -id
//
// Workloads:
//
//	webmail  connect, LOGIN, SELECT INBOX, UID FETCH 1:20 (FLAGS INTERNALDATE
//	         RFC822.SIZE ENVELOPE), LOGOUT, close; users round-robin per worker
//	login    connect, LOGIN, LOGOUT, close
//	bulk     one long session per worker (worker i is user i): SELECT the big
//	         mailbox, then UID FETCH 1:* BODY.PEEK[] per cycle; relayed MB/s
//	idle     open -sessions sessions (-c dialers): LOGIN, SELECT, IDLE; hold
//	         them all for -idle-hold ("holding N sessions" on stderr, and the
//	         -idle-signal file exists meanwhile); then DONE and LOGOUT
//
// It prints a table and, last, one JSON line (only that with -json):
// workload, target, concurrency, duration_s, cycles, cycles_per_s, errors
// by kind (dial, greeting, login_no, login_bad, id, select, fetch, idle,
// logout, timeout, protocol, bye), cycle_ms and login_ms percentiles,
// logins, bytes (literal octets received), mb_per_s (10^6 bytes/s),
// backends (sessions per backend name: the ID reply's "name" with -id,
// else "NAME" from a greeting ending "(NAME)."), held, reused (logins
// answered with [XPROXYREUSE]), messages (FETCH responses) and the tool's
// own CPU time (cpu_s, cpu_us_per_cycle, from getrusage). The exit
// status is 0 when the run completed, whatever its errors; 2 for bad
// flags. SIGINT ends the run early and still reports.
//
// The tool's own cost: a webmail cycle allocates about 25 objects (all in
// net.Dial; the IMAP conversation itself allocates nothing once warm) and
// makes about 25 system calls. Most of its CPU time is kernel time spent
// on loopback TCP (connect, close, and delivering each write to the peer),
// which any client pays. bulk splices big literals to /dev/null
// (-no-splice reads them instead). -cpuprofile profiles the tool itself.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

// Hard caps.
const (
	maxDuration = 10 * time.Minute
	maxCount    = 10_000_000
	maxConc     = 100_000
	maxSessions = 1_000_000
	maxUsers    = 1_000_000
)

type config struct {
	addr       string
	workload   string
	conc       int
	usersSpec  string
	users      []string
	password   string
	pwPattern  string // "%s" is the user name; wins over password
	duration   time.Duration
	count      int64
	mailbox    string
	fetch      string
	bigMailbox string
	idleHold   time.Duration
	idleSignal string
	sessions   int
	json       bool
	timeout    time.Duration
	id         bool
	cpuProfile string
	noSplice   bool
}

func (c *config) passwordOf(user string) string {
	if c.pwPattern != "" {
		return strings.ReplaceAll(c.pwPattern, "%s", user)
	}
	return c.password
}

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

func runMain(args []string, stdout, stderr io.Writer) int {
	cfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "imapbench:", err)
		return 2
	}
	// The first SIGINT or SIGTERM ends the run early, with a report; a
	// second one has the default effect.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, stop)
	if cfg.cpuProfile != "" {
		f, err := os.Create(cfg.cpuProfile)
		if err != nil {
			fmt.Fprintln(stderr, "imapbench:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, "imapbench:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	sum, err := run(ctx, cfg, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "imapbench:", err)
		return 1
	}
	if !cfg.json {
		writeReport(stdout, cfg, sum)
		if cfg.workload == "idle" {
			fmt.Fprintf(stdout, "held %d\n", sum.Held)
		}
	}
	line, err := json.Marshal(sum)
	if err != nil {
		fmt.Fprintln(stderr, "imapbench:", err)
		return 1
	}
	fmt.Fprintf(stdout, "%s\n", line)
	return 0
}

func parseFlags(args []string, output io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("imapbench", flag.ContinueOnError)
	fs.SetOutput(output)
	fs.StringVar(&cfg.addr, "addr", "127.0.0.1:1143", "target host:port")
	fs.StringVar(&cfg.workload, "workload", "webmail", "webmail | login | bulk | idle")
	fs.IntVar(&cfg.conc, "c", 8, "concurrency: workers (idle: parallel dialers)")
	fs.StringVar(&cfg.usersSpec, "users", "user0001-user0050", "user range PREFIXlo-PREFIXhi (zero-padded like lo), or one user")
	fs.StringVar(&cfg.password, "password", "secret", "password of every user")
	fs.StringVar(&cfg.pwPattern, "password-pattern", "", `password per user, "%s" replaced by the user name (overrides -password)`)
	fs.DurationVar(&cfg.duration, "duration", 10*time.Second, "run time, at most 10m (with -count alone: 10m)")
	fs.Int64Var(&cfg.count, "count", 0, "cycles to run in all, at most 10,000,000; the run stops at -count or -duration, whichever is first")
	fs.StringVar(&cfg.mailbox, "mailbox", "INBOX", "mailbox for webmail and idle")
	fs.StringVar(&cfg.fetch, "fetch", "1:20", "UID set fetched by webmail")
	fs.StringVar(&cfg.bigMailbox, "big-mailbox", "Big", "mailbox of big messages for bulk")
	fs.DurationVar(&cfg.idleHold, "idle-hold", 30*time.Second, "idle: how long all sessions are held, at most 10m")
	fs.StringVar(&cfg.idleSignal, "idle-signal", "", `idle: file written ("held N") once all sessions are held, removed when the hold ends`)
	fs.IntVar(&cfg.sessions, "sessions", 0, "idle: sessions to open (default -c)")
	fs.BoolVar(&cfg.json, "json", false, "print only the JSON summary line")
	fs.DurationVar(&cfg.timeout, "timeout", 30*time.Second, "per operation: dial, and each command with its reply")
	fs.StringVar(&cfg.cpuProfile, "cpuprofile", "", "write the tool's own CPU profile to this file")
	fs.BoolVar(&cfg.noSplice, "no-splice", false, "bulk: read big literals into memory instead of splicing them to /dev/null")
	fs.BoolVar(&cfg.id, "id", false, "send ID NIL after LOGIN and count backends by the reply's name (through a proxy)")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["count"] && !set["duration"] {
		cfg.duration = maxDuration
	}
	if cfg.sessions == 0 {
		cfg.sessions = cfg.conc
	}
	return cfg, cfg.validate()
}

// validate checks every flag and reports all problems at once.
func (c *config) validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch c.workload {
	case "webmail", "login", "bulk", "idle":
	default:
		bad("-workload %q: want webmail, login, bulk or idle", c.workload)
	}
	if c.conc < 1 || c.conc > maxConc {
		bad("-c %d: want 1..%d", c.conc, maxConc)
	}
	users, err := parseUsers(c.usersSpec)
	if err != nil {
		bad("-users: %v", err)
	}
	c.users = users
	for _, u := range users {
		if !quotable(u) || !quotable(c.passwordOf(u)) {
			bad("user %q or its password is not 7-bit text without CR/LF (imapbench sends quoted strings)", u)
			break
		}
	}
	if c.duration <= 0 || c.duration > maxDuration {
		bad("-duration %v: want more than 0 and at most %v", c.duration, maxDuration)
	}
	if c.count < 0 || c.count > maxCount {
		bad("-count %d: want 0 (no limit) to %d", c.count, maxCount)
	}
	if !quotable(c.mailbox) || c.mailbox == "" {
		bad("-mailbox %q: want 7-bit text", c.mailbox)
	}
	if !quotable(c.bigMailbox) || c.bigMailbox == "" {
		bad("-big-mailbox %q: want 7-bit text", c.bigMailbox)
	}
	if !isSequenceSet(c.fetch) {
		bad("-fetch %q: want a UID set such as 1:20 or 1,5:*", c.fetch)
	}
	if c.idleHold < 0 || c.idleHold > maxDuration {
		bad("-idle-hold %v: want 0 to %v", c.idleHold, maxDuration)
	}
	if c.sessions < 1 || c.sessions > maxSessions {
		bad("-sessions %d: want 1..%d", c.sessions, maxSessions)
	}
	if c.timeout <= 0 {
		bad("-timeout %v: want more than 0", c.timeout)
	}
	return errors.Join(errs...)
}

func isSequenceSet(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if (r < '0' || r > '9') && r != ':' && r != ',' && r != '*' {
			return false
		}
	}
	return true
}

// parseUsers expands "user0001-user0050" (or "user0001-0050") into the
// names, numbers zero-padded to the width of the first; a spec without
// such a range is one user.
func parseUsers(spec string) ([]string, error) {
	if spec == "" {
		return nil, errors.New("empty")
	}
	for i := 0; i < len(spec); i++ {
		if spec[i] != '-' {
			continue
		}
		lp, ld := splitDigits(spec[:i])
		rp, rd := splitDigits(spec[i+1:])
		if ld == "" || rd == "" || (rp != "" && rp != lp) {
			continue
		}
		lo, err1 := strconv.Atoi(ld)
		hi, err2 := strconv.Atoi(rd)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%q: bad number", spec)
		}
		if lo > hi {
			return nil, fmt.Errorf("%q: %d > %d", spec, lo, hi)
		}
		if hi-lo+1 > maxUsers {
			return nil, fmt.Errorf("%q: more than %d users", spec, maxUsers)
		}
		users := make([]string, 0, hi-lo+1)
		for n := lo; n <= hi; n++ {
			users = append(users, fmt.Sprintf("%s%0*d", lp, len(ld), n))
		}
		return users, nil
	}
	return []string{spec}, nil
}

// splitDigits splits s into a prefix and its trailing digits.
func splitDigits(s string) (prefix, digits string) {
	i := len(s)
	for i > 0 && s[i-1] >= '0' && s[i-1] <= '9' {
		i--
	}
	return s[:i], s[i:]
}

func (b *bench) summarize(st *stats, elapsed, cpu time.Duration) *summary {
	secs := elapsed.Seconds()
	s := &summary{
		Workload:    b.cfg.workload,
		Target:      b.cfg.addr,
		Concurrency: b.cfg.conc,
		DurationS:   round3(secs),
		Cycles:      st.cycles,
		Errors:      map[string]int64{},
		CycleMS:     st.cycle.latency(),
		LoginMS:     st.login.latency(),
		Logins:      int64(st.login.n),
		Bytes:       st.bytes,
		Backends:    map[string]int64{},
		Held:        st.held,
		Reused:      st.reused,
		Messages:    st.messages,
		CPUS:        round3(cpu.Seconds()),
		firstErr:    map[string]string{},
	}
	var failed int64
	for k, n := range st.errs {
		if n > 0 {
			s.Errors[kindNames[k]] = n
			s.firstErr[kindNames[k]] = st.firstErr[k]
			failed += n
		}
	}
	for _, be := range st.backends {
		s.Backends[be.name] = be.n
	}
	if secs > 0 {
		s.CyclesPerS = round3(float64(st.cycles) / secs)
		s.MBPerS = round3(float64(st.bytes) / 1e6 / secs)
	}
	if attempts := st.cycles + failed; attempts > 0 {
		s.CPUUsPerCycle = round3(float64(cpu.Microseconds()) / float64(attempts))
	}
	return s
}

// writeReport prints the human-readable table.
func writeReport(out io.Writer, cfg config, s *summary) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	users := cfg.usersSpec
	fmt.Fprintf(tw, "workload\t%s -> %s\tconcurrency %d, users %s (%d)\n", s.Workload, s.Target, s.Concurrency, users, len(cfg.users))
	fmt.Fprintf(tw, "duration\t%.2f s\n", s.DurationS)
	fmt.Fprintf(tw, "cycles\t%d\t%.1f /s\n", s.Cycles, s.CyclesPerS)
	if s.Workload == "idle" {
		fmt.Fprintf(tw, "held\t%d of %d sessions\n", s.Held, cfg.sessions)
	}
	var failed int64
	for _, n := range s.Errors {
		failed += n
	}
	fmt.Fprintf(tw, "errors\t%d\n", failed)
	for _, k := range sortedKeys(s.Errors) {
		fmt.Fprintf(tw, "  %s\t%d\tfirst: %s\n", k, s.Errors[k], s.firstErr[k])
	}
	fmt.Fprintf(tw, "latency ms\tp50\tp90\tp99\tmax\n")
	for _, row := range []struct {
		name string
		l    latency
	}{{"cycle", s.CycleMS}, {"login", s.LoginMS}} {
		fmt.Fprintf(tw, "  %s\t%.3f\t%.3f\t%.3f\t%.3f\n", row.name, row.l.P50, row.l.P90, row.l.P99, row.l.Max)
	}
	fmt.Fprintf(tw, "logins\t%d\t%d reused (XPROXYREUSE)\n", s.Logins, s.Reused)
	fmt.Fprintf(tw, "messages\t%d\n", s.Messages)
	fmt.Fprintf(tw, "bytes\t%d\t%.2f MB/s\n", s.Bytes, s.MBPerS)
	var bs []string
	for _, k := range sortedKeys(s.Backends) {
		bs = append(bs, fmt.Sprintf("%s=%d", k, s.Backends[k]))
	}
	fmt.Fprintf(tw, "backends\t%s\n", strings.Join(bs, " "))
	fmt.Fprintf(tw, "client cpu\t%.3f s\t%.1f µs/cycle\n", s.CPUS, s.CPUUsPerCycle)
	tw.Flush()
}

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
