package main

import (
	"errors"
	"math"
	"math/bits"
	"os"
	"syscall"
	"time"
)

// errKind classifies a failed cycle.
type errKind uint8

const (
	kindDial errKind = iota
	kindGreeting
	kindLoginNO
	kindLoginBAD
	kindID
	kindSelect
	kindFetch
	kindIdle
	kindLogout
	kindTimeout
	kindProtocol
	kindBye
	numKinds
)

var kindNames = [numKinds]string{
	kindDial: "dial", kindGreeting: "greeting", kindLoginNO: "login_no", kindLoginBAD: "login_bad",
	kindID: "id", kindSelect: "select", kindFetch: "fetch", kindIdle: "idle", kindLogout: "logout",
	kindTimeout: "timeout", kindProtocol: "protocol", kindBye: "bye",
}

func (k errKind) String() string { return kindNames[k] }

// cycleError is an error of one step of a cycle, with the kind it counts as.
type cycleError struct {
	kind errKind
	err  error
}

func (e *cycleError) Error() string { return e.kind.String() + ": " + e.err.Error() }
func (e *cycleError) Unwrap() error { return e.err }

// stepErr classifies err from the step stage (one of dial, greeting,
// login (pass kindLoginNO), id, select, fetch, idle, logout): a deadline is
// a timeout, an unsolicited BYE is bye, garbage is protocol, a tagged BAD
// to LOGIN is login_bad, anything else (NO, EOF, reset) counts as the stage.
func stepErr(stage errKind, err error) error {
	kind := stage
	var (
		pe *protoError
		be *byeError
		se *statusError
	)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		kind = kindTimeout
	case errors.As(err, &be):
		kind = kindBye
	case errors.As(err, &pe):
		kind = kindProtocol
	case stage == kindLoginNO && errors.As(err, &se) && se.status == "BAD":
		kind = kindLoginBAD
	}
	return &cycleError{kind: kind, err: err}
}

// kindOf returns the kind of an error from a cycle.
func kindOf(err error) errKind {
	var ce *cycleError
	if errors.As(err, &ce) {
		return ce.kind
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return kindTimeout
	}
	return kindProtocol
}

// A histogram of durations in nanoseconds, log-linear (HDR-like): exact
// below 128 ns, then 64 buckets per power of two, so any value is known
// within 1/64 (reported at the bucket middle: within 0.8%). Fixed size,
// no allocation per sample; histograms merge by adding.
const (
	histSubBits = 7
	histHalf    = 1 << (histSubBits - 1)
	histBuckets = (64-histSubBits)*histHalf + 2*histHalf
)

type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	max    uint64
}

func histBucket(v uint64) int {
	if v < 1<<histSubBits {
		return int(v)
	}
	e := bits.Len64(v) - histSubBits
	return e*histHalf + int(v>>e)
}

// histValue is the middle of bucket i.
func histValue(i int) uint64 {
	if i < 1<<histSubBits {
		return uint64(i)
	}
	e := i/histHalf - 1
	m := uint64(i - e*histHalf)
	return m<<e + (uint64(1)<<e)/2
}

func (h *histogram) record(d time.Duration) {
	v := uint64(max(d, 0))
	h.counts[histBucket(v)]++
	h.n++
	h.max = max(h.max, v)
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the q-quantile (0 < q <= 1): the smallest recorded
// value with at least q*n samples at or below it, to bucket precision.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	rank = max(rank, 1)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return time.Duration(min(histValue(i), h.max))
		}
	}
	return time.Duration(h.max)
}

// latency is a histogram's summary in milliseconds.
type latency struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func (h *histogram) latency() latency {
	ms := func(d time.Duration) float64 { return round3(float64(d) / 1e6) }
	return latency{P50: ms(h.quantile(0.50)), P90: ms(h.quantile(0.90)), P99: ms(h.quantile(0.99)), Max: ms(time.Duration(h.max))}
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// stats are one worker's counts; merged at the end, never shared.
type stats struct {
	cycle, login histogram
	cycles       int64
	errs         [numKinds]int64
	firstErr     [numKinds]string
	bytes        int64 // literal octets received
	messages     int64 // FETCH responses received
	reused       int64 // logins answered with [XPROXYREUSE]
	held         int64 // idle: sessions that reached IDLE
	backends     []backendCount
}

type backendCount struct {
	name string
	n    int64
}

// addBackend counts a session on backend name (linear: a few backends).
func (s *stats) addBackend(name []byte) {
	if len(name) == 0 {
		name = unknownBackend
	}
	for i := range s.backends {
		if s.backends[i].name == string(name) {
			s.backends[i].n++
			return
		}
	}
	s.backends = append(s.backends, backendCount{name: string(name), n: 1})
}

var unknownBackend = []byte("unknown")

func (s *stats) fail(err error) {
	k := kindOf(err)
	s.errs[k]++
	if s.firstErr[k] == "" {
		s.firstErr[k] = err.Error()
	}
}

func (s *stats) merge(o *stats) {
	s.cycle.merge(&o.cycle)
	s.login.merge(&o.login)
	s.cycles += o.cycles
	for k := range s.errs {
		s.errs[k] += o.errs[k]
		if s.firstErr[k] == "" {
			s.firstErr[k] = o.firstErr[k]
		}
	}
	s.bytes += o.bytes
	s.messages += o.messages
	s.reused += o.reused
	s.held += o.held
	for _, b := range o.backends {
		found := false
		for i := range s.backends {
			if s.backends[i].name == b.name {
				s.backends[i].n += b.n
				found = true
				break
			}
		}
		if !found {
			s.backends = append(s.backends, b)
		}
	}
}

// summary is the final JSON line.
type summary struct {
	Workload      string           `json:"workload"`
	Target        string           `json:"target"`
	Concurrency   int              `json:"concurrency"`
	DurationS     float64          `json:"duration_s"`
	Cycles        int64            `json:"cycles"`
	CyclesPerS    float64          `json:"cycles_per_s"`
	Errors        map[string]int64 `json:"errors"`
	CycleMS       latency          `json:"cycle_ms"`
	LoginMS       latency          `json:"login_ms"`
	Logins        int64            `json:"logins"`
	Bytes         int64            `json:"bytes"`
	MBPerS        float64          `json:"mb_per_s"`
	Backends      map[string]int64 `json:"backends"`
	Held          int64            `json:"held"`
	Reused        int64            `json:"reused"`
	Messages      int64            `json:"messages"`
	CPUS          float64          `json:"cpu_s"`
	CPUUsPerCycle float64          `json:"cpu_us_per_cycle"`

	firstErr map[string]string // for the human report
}

// cpuTime is the process's user+system CPU time so far (getrusage).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
