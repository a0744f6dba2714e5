// Package logx holds the logging the proxy's parts share: a logger that
// adds a session's fields only when a line is written, and the
// aggregation of events that clients can repeat at will.
package logx

import (
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
)

// Interval is how often the server logs a repeated client event at most.
const Interval = 10 * time.Second

// Events aggregates the log lines of events that clients can repeat at
// will (refused logins, limits hit): thousands of clients retrying at
// once during an outage must not write a line each and fill the disk.
// The first event of a kind is logged at once; the others in the
// interval after it are counted, and at its end one line says how many
// there were, with the last of them as the example. An interval without
// events ends the kind's run, and the next event is again logged at once.
type Events struct {
	every time.Duration
	mu    sync.Mutex
	kinds map[string]*eventRun
	done  bool
}

// eventRun is one kind's events since its last line.
type eventRun struct {
	n     int
	log   hclog.Logger // the example's logger, with its fields
	level hclog.Level
	msg   string
	args  []any
	timer *time.Timer
}

// NewEvents returns an Events that logs each kind at most once every every.
func NewEvents(every time.Duration) *Events {
	return &Events{every: every, kinds: map[string]*eventRun{}}
}

// Log records an event of kind: msg and args as l.Log takes them.
func (e *Events) Log(l hclog.Logger, level hclog.Level, kind, msg string, args ...any) {
	e.mu.Lock()
	if e.done {
		e.mu.Unlock()
		l.Log(level, msg, args...)
		return
	}
	r := e.kinds[kind]
	if r == nil {
		r = &eventRun{}
		e.kinds[kind] = r
		r.timer = time.AfterFunc(e.every, func() { e.tick(kind) })
		e.mu.Unlock()
		l.Log(level, msg, args...)
		return
	}
	r.n++
	r.log, r.level, r.msg, r.args = l, level, msg, args
	e.mu.Unlock()
}

// tick ends an interval of kind: it writes the summary, if there were
// events, and starts the next interval; else it ends the run.
func (e *Events) tick(kind string) {
	e.mu.Lock()
	r := e.kinds[kind]
	if r == nil || e.done {
		e.mu.Unlock()
		return
	}
	if r.n == 0 {
		delete(e.kinds, kind)
		e.mu.Unlock()
		return
	}
	s := *r
	r.n, r.log, r.args = 0, nil, nil
	r.timer.Reset(e.every)
	e.mu.Unlock()
	s.write(e.every)
}

func (r *eventRun) write(every time.Duration) {
	args := append(r.args[:len(r.args):len(r.args)], "count", r.n, "interval", every)
	r.log.Log(r.level, r.msg, args...)
}

// Close writes what is counted and not yet logged, and stops the timers;
// later events are logged one by one.
func (e *Events) Close() {
	e.mu.Lock()
	e.done = true
	var pending []eventRun
	for kind, r := range e.kinds {
		r.timer.Stop()
		if r.n > 0 {
			pending = append(pending, *r)
		}
		delete(e.kinds, kind)
	}
	e.mu.Unlock()
	for _, r := range pending {
		r.write(e.every)
	}
}

// maxLogString bounds what of a client-controlled string (a user name, a
// tag) goes into a log line.
const maxLogString = 64

// Clip makes a client-controlled string fit for a log field: at most
// maxLogString bytes of it, cut at a character boundary and marked with
// the full length when cut, and control characters replaced by '?', so
// that no client can make lines long or forge new ones.
func Clip[S ~string | ~[]byte](s S) string {
	n := len(s)
	cut := n > maxLogString
	if cut {
		n = maxLogString
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
	}
	out := make([]byte, 0, n+24)
	for i := 0; i < n; i++ {
		c := s[i]
		if c < ' ' || c == 0x7f {
			c = '?'
		}
		out = append(out, c)
	}
	if cut {
		out = append(out, "...("...)
		out = strconv.AppendInt(out, int64(len(s)), 10)
		out = append(out, " bytes)"...)
	}
	return string(out)
}
