package main

import (
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// report is everything the bench prints.
type report struct {
	command string
	quick   bool
	started time.Time
	elapsed time.Duration
	facts   []string
	setup   string
	rows    []*row
	notes   []string
}

// columns of the table, in order.
var columns = []string{
	"target", "workload", "cycles", "errors", "cycles/s", "× direct",
	"cycle ms p50 / p99 / max", "LOGIN ms p50 / p99",
	"backend logins per 1k", "MB/s", "MB/s × socat", "MB/s × direct",
	"proxy CPU s per 1k cycles", "Dovecot CPU ms per cycle", "listen overflows",
	"proxy memory MiB base → held", "KiB per session",
}

func (r *report) write(path string) error {
	if path == "" {
		r.print(os.Stdout)
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	r.print(f)
	return f.Close()
}

func (r *report) print(w io.Writer) {
	mode := "full"
	if r.quick {
		mode = "quick (tiny counts: checks that the benchmark runs, the figures mean nothing)"
	}
	fmt.Fprintf(w, "## imapproxy benchmark, %s\n\n", r.started.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(w, "Command: `%s` (mode: %s; took %s)\n\n", r.command, mode, r.elapsed.Round(time.Second))
	for _, f := range r.facts {
		fmt.Fprintf(w, "- %s\n", f)
	}
	if r.setup != "" {
		fmt.Fprintf(w, "- %s\n", r.setup)
	}
	fmt.Fprintln(w)
	r.printTable(w)
	fmt.Fprint(w, legend)
	if len(r.notes) > 0 {
		fmt.Fprintf(w, "\nNotes from this run:\n\n")
		for _, n := range r.notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
}

func (r *report) printTable(w io.Writer) {
	fmt.Fprintf(w, "| %s |\n", strings.Join(columns, " | "))
	seps := make([]string, len(columns))
	for i := range seps {
		seps[i] = "---"
		if i >= 2 {
			seps[i] = "--:"
		}
	}
	fmt.Fprintf(w, "|%s|\n", strings.Join(seps, "|"))
	for _, rw := range r.rows {
		fmt.Fprintf(w, "| %s |\n", strings.Join(r.cells(rw), " | "))
	}
}

// find returns the measured row of target for a workload, if any.
func (r *report) find(target, workload string) *row {
	for _, rw := range r.rows {
		if rw.target == target && rw.workload == workload && rw.sum != nil && rw.err == nil {
			return rw
		}
	}
	return nil
}

const dash = "–"

func (r *report) cells(rw *row) []string {
	c := make([]string, len(columns))
	for i := range c {
		c[i] = dash
	}
	c[0], c[1] = rw.target, rw.workload
	switch {
	case rw.skipped != "":
		c[2] = "skipped"
		return c
	case rw.err != nil:
		c[2] = "failed"
		c[3] = strings.ReplaceAll(firstLine(rw.err.Error()), "|", "/")
		return c
	case rw.sum == nil:
		return c
	}
	s := rw.sum
	idle := rw.kind == "idle"
	if idle {
		c[2] = fmt.Sprintf("%d/%d held", s.Held, rw.sessions)
	} else {
		c[2] = fmt.Sprintf("%d", s.Cycles)
	}
	c[3] = fmt.Sprintf("%d", s.errorCount())
	if s.errorCount() > 0 {
		c[3] += " (" + formatCounts(s.Errors) + ")"
	}
	if !idle {
		c[4] = fmt.Sprintf("%.1f", s.CyclesPerS)
		if d := r.find("direct", rw.workload); d != nil && d.sum.CyclesPerS > 0 {
			c[5] = fmt.Sprintf("%.2f", s.CyclesPerS/d.sum.CyclesPerS)
		}
	}
	c[6] = fmt.Sprintf("%s / %s / %s", ms(s.CycleMS.P50), ms(s.CycleMS.P99), ms(s.CycleMS.Max))
	c[7] = fmt.Sprintf("%s / %s", ms(s.LoginMS.P50), ms(s.LoginMS.P99))
	if s.Logins > 0 {
		c[8] = fmt.Sprintf("%.0f", float64(rw.backendLogins)*1000/float64(s.Logins))
	}
	if rw.kind == "bulk" {
		c[9] = fmt.Sprintf("%.1f", s.MBPerS)
		if so := r.find("socat", rw.workload); so != nil && so.sum.MBPerS > 0 {
			c[10] = fmt.Sprintf("%.2f", s.MBPerS/so.sum.MBPerS)
		}
		if d := r.find("direct", rw.workload); d != nil && d.sum.MBPerS > 0 {
			c[11] = fmt.Sprintf("%.2f", s.MBPerS/d.sum.MBPerS)
		}
	}
	n := s.Cycles
	if idle {
		n = s.Held
	}
	if rw.hasProxy && n > 0 {
		c[12] = fmt.Sprintf("%.3f", rw.proxyCPU.Seconds()*1000/float64(n))
	}
	if n > 0 {
		c[13] = fmt.Sprintf("%.2f", float64(rw.dovecotCPU.Microseconds())/1000/float64(n))
	}
	c[14] = fmt.Sprintf("%d", rw.overflows)
	if idle && rw.hasProxy && rw.memHeld > 0 {
		c[15] = fmt.Sprintf("%.1f → %.1f", mib(rw.memBase), mib(rw.memHeld))
		if s.Held > 0 {
			c[16] = fmt.Sprintf("%.1f", float64(rw.memHeld-rw.memBase)/1024/float64(s.Held))
		}
	}
	return c
}

func ms(v float64) string {
	if v >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.1f", v)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}

func formatCounts(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

const legend = `
Columns:

- **target**: *direct* is Dovecot backend-1 itself; *socat* is ` + "`socat TCP-LISTEN:P,reuseaddr,fork,bind=127.0.0.1 TCP:127.0.0.1:BACKEND1`" + `
  (pure forwarding, a process per connection); *up-imapproxy* is Debian's imapproxyd 1.2.8 (cache on,
  cache_expiration_time 300) in front of backend-1; *imapproxy cold* is a fresh imapproxy process with
  backend-1 (its first pass), *imapproxy warm* the same process's second pass; *imapproxy 3 static* has
  three backend blocks, *imapproxy 3 consul* takes the same three from a Consul agent (TCP checks).
  The idle workload of every proxy runs on a fresh process of it (cold: its first idle run, warm: its second).
- **workload**: imapbench's webmail (connect, LOGIN, SELECT INBOX, UID FETCH 1:20 headers, LOGOUT),
  login (connect, LOGIN, LOGOUT), bulk (long sessions fetching the ~1 MiB messages of "Big" with
  BODY.PEEK[]), idle (sessions that LOGIN, SELECT and IDLE, all held at once); cN = N concurrent clients,
  users user0001..user0050 round robin.
- **cycles**: completed cycles (idle: sessions held of those opened); **errors**: failed cycles by kind.
  *timeout* is no answer within imapbench's -timeout (10 s; idle 30 s). Through socat and up-imapproxy,
  which listen with a backlog of 5, these are connections left in a full accept queue: the client's
  connect succeeded but the server never accepted it, so no greeting came.
- **× direct**: cycles/s over direct Dovecot's for the same workload.
- **cycle ms**: connect to close (bulk: one FETCH of the whole mailbox; idle: connect until IDLE is
  accepted); **LOGIN ms**: the LOGIN command alone.
- **backend logins per 1k**: successful logins in the Dovecot logs (all backends) per 1,000 client logins.
- **MB/s**: literal bytes received by the clients per second (10^6 B/s); × socat and × direct compare
  with those targets' bulk rows.
- **proxy CPU**: user+system CPU of the proxy's process tree (socat: the listener and its forks) during
  the run, per 1,000 cycles (idle: per 1,000 sessions); from /proc/PID/stat.
- **Dovecot CPU**: user+system CPU of all three Dovecot instances (master, its live children, and the
  children it reaped) during the run, per cycle (idle: per session).
- **listen overflows**: growth of the kernel's TcpExt ListenOverflows during the run: connection attempts
  dropped because a listener's accept queue was full, each one a connect that stalls ≥ 1 s (SYN
  retransmit). The counter is for the whole network namespace, so other programs on the machine can add
  to it. imapbench does not time connect-to-greeting separately; a stall also shows in the cycle max.
- **proxy memory**: VmRSS of the proxy process (socat: Pss summed over its process tree) before the idle
  sessions were opened and while all were held; **KiB per session** = (held − base) / sessions held.
`
