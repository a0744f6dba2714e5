package proxy

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/imapproxy/imapproxy/imapwire"
)

// A per-user protocol trace: every command line a user's sessions send
// after login and every response line they get, written to a file for an
// operator chasing a client bug. Literal contents (message bodies, APPEND
// data) are left out and only their size written, and a LOGIN or
// AUTHENTICATE line, which the relay refuses anyway, loses its arguments:
// the trace holds no credentials and no message contents. It does hold
// what servers send as quoted strings (ENVELOPE subjects and addresses).

var (
	// ErrTraceActive is returned when the user is traced already.
	ErrTraceActive = errors.New("proxy: user is traced already")
	// ErrNoTrace is returned when the user is not traced.
	ErrNoTrace = errors.New("proxy: user is not traced")
	// ErrTooManyTraces is returned when maxTraces traces run already.
	ErrTooManyTraces = errors.New("proxy: too many traces running")
)

// maxTraces bounds the open trace files: each holds a descriptor.
const maxTraces = 16

// traceMaxBytes ends a trace that an operator forgot: a busy IMAP user
// can write a lot of FETCH responses.
const traceMaxBytes = 64 << 20

// TraceInfo describes a running trace.
type TraceInfo struct {
	User    string
	Path    string
	Started time.Time
	Bytes   int64
}

type tracer struct {
	user    string // as the operator gave it
	path    string
	started time.Time

	mu     sync.Mutex
	f      *os.File
	n      int64
	closed bool
	buf    []byte
}

func traceKey(user string) string { return strings.ToLower(user) }

// StartTrace starts tracing user (compared without case) into a new file
// at path (created, mode 0600; an existing file is an error). Sessions of
// the user already running are traced from their next line on.
func (s *Server) StartTrace(user, path string) error {
	if user == "" {
		return errors.New("proxy: empty user")
	}
	k := traceKey(user)
	s.mu.Lock()
	_, dup := s.traces[k]
	n := len(s.traces)
	s.mu.Unlock()
	switch {
	case dup:
		return ErrTraceActive
	case n >= maxTraces:
		return ErrTooManyTraces
	}
	// The file is made outside s.mu, which every accept and login takes:
	// a slow trace_dir must not stall them.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	tr := &tracer{user: user, path: path, started: time.Now(), f: f}
	tr.event("trace started")
	s.mu.Lock()
	if _, dup := s.traces[k]; dup || len(s.traces) >= maxTraces {
		s.mu.Unlock()
		tr.close()
		os.Remove(path)
		if dup {
			return ErrTraceActive
		}
		return ErrTooManyTraces
	}
	if s.traces == nil {
		s.traces = map[string]*tracer{}
	}
	s.traces[k] = tr
	for sess := range s.sessions {
		if rl := sess.rl.Load(); rl != nil && sess.user != "" && traceKey(sess.user) == k {
			rl.trace.Store(tr)
		}
	}
	s.mu.Unlock()
	s.log.Info("protocol trace started", "user", user, "path", path)
	return nil
}

// StopTrace ends the trace of user and closes its file.
func (s *Server) StopTrace(user string) (TraceInfo, error) {
	s.mu.Lock()
	k := traceKey(user)
	tr, ok := s.traces[k]
	if ok {
		delete(s.traces, k)
		for sess := range s.sessions {
			if rl := sess.rl.Load(); rl != nil {
				rl.trace.CompareAndSwap(tr, nil)
			}
		}
	}
	s.mu.Unlock()
	if !ok {
		return TraceInfo{}, ErrNoTrace
	}
	tr.event("trace stopped")
	info := tr.info()
	tr.close()
	s.log.Info("protocol trace stopped", "user", tr.user, "path", tr.path, "bytes", info.Bytes)
	return info, nil
}

// Traces lists the running traces, by user.
func (s *Server) Traces() []TraceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]TraceInfo, 0, len(s.traces))
	for _, tr := range s.traces {
		out = append(out, tr.info())
	}
	slices.SortFunc(out, func(a, b TraceInfo) int { return strings.Compare(a.User, b.User) })
	return out
}

func (s *Server) stopTraces() {
	s.mu.Lock()
	trs := s.traces
	s.traces = nil
	s.mu.Unlock()
	for _, tr := range trs {
		tr.event("trace stopped: server shutting down")
		tr.close()
	}
}

func (tr *tracer) info() TraceInfo {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return TraceInfo{User: tr.user, Path: tr.path, Started: tr.started, Bytes: tr.n}
}

func (tr *tracer) close() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if !tr.closed {
		tr.closed = true
		tr.f.Close()
	}
}

func (tr *tracer) event(msg string) {
	tr.write(func(b []byte) []byte { return append(b, "-- "+msg...) })
}

// line records one protocol line of session id; dir is "C" (client to
// server) or "S". lit, if not nil, is the literal that follows it.
func (tr *tracer) line(id, backend, dir string, line []byte, lit *imapwire.Literal) {
	tr.write(func(b []byte) []byte {
		b = append(b, id...)
		b = append(b, ' ')
		b = append(b, backend...)
		b = append(b, ' ')
		b = append(b, dir...)
		b = append(b, ": "...)
		l := imapwire.TrimEOL(line)
		if dir == "C" && isCredentialCommand(l) {
			tag, _, _ := imapwire.CutTag(l)
			b = append(b, tag...)
			return append(b, " [a login command, not traced]"...)
		}
		for _, c := range l {
			// Control bytes would garble the file for the reader.
			if c < 0x20 || c == 0x7f {
				c = '?'
			}
			b = append(b, c)
		}
		if lit != nil {
			b = fmt.Appendf(b, " [literal of %d bytes not traced]", lit.Size)
		}
		return b
	})
}

func (tr *tracer) write(fill func([]byte) []byte) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.closed {
		return
	}
	b := time.Now().UTC().AppendFormat(tr.buf[:0], "2006-01-02T15:04:05.000000Z ")
	b = fill(b)
	b = append(b, '\n')
	tr.buf = b[:0]
	if tr.n+int64(len(b)) > traceMaxBytes {
		tr.f.WriteString("-- trace ended: size limit reached\n")
		tr.closed = true
		tr.f.Close()
		return
	}
	n, _ := tr.f.Write(b)
	tr.n += int64(n)
}

// isCredentialCommand reports whether a client line is LOGIN or
// AUTHENTICATE, whatever its tag.
func isCredentialCommand(l []byte) bool {
	_, rest, ok := imapwire.CutTag(l)
	if !ok {
		return false
	}
	name, _, _ := strings.Cut(string(rest), " ")
	return strings.EqualFold(name, "LOGIN") || strings.EqualFold(name, "AUTHENTICATE")
}
