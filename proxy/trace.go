package proxy

import (
	"errors"
	"os"
	"slices"
	"strings"

	"github.com/imapproxy/imapproxy/session"
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
	tr, err := session.NewTracer(user, path)
	if err != nil {
		return err
	}
	tr.Event("trace started")
	s.mu.Lock()
	if _, dup := s.traces[k]; dup || len(s.traces) >= maxTraces {
		s.mu.Unlock()
		tr.Close()
		os.Remove(path)
		if dup {
			return ErrTraceActive
		}
		return ErrTooManyTraces
	}
	if s.traces == nil {
		s.traces = map[string]*session.Tracer{}
	}
	s.traces[k] = tr
	for sess, m := range s.sessions {
		if m.user != "" && traceKey(m.user) == k {
			sess.Trace(tr)
		}
	}
	s.mu.Unlock()
	s.log.Info("protocol trace started", "user", user, "path", path)
	return nil
}

// StopTrace ends the trace of user and closes its file.
func (s *Server) StopTrace(user string) (session.TraceInfo, error) {
	s.mu.Lock()
	k := traceKey(user)
	tr, ok := s.traces[k]
	if ok {
		delete(s.traces, k)
		for sess := range s.sessions {
			sess.Untrace(tr)
		}
	}
	s.mu.Unlock()
	if !ok {
		return session.TraceInfo{}, ErrNoTrace
	}
	tr.Event("trace stopped")
	info := tr.Info()
	tr.Close()
	s.log.Info("protocol trace stopped", "user", info.User, "path", info.Path, "bytes", info.Bytes)
	return info, nil
}

// Traces lists the running traces, by user.
func (s *Server) Traces() []session.TraceInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]session.TraceInfo, 0, len(s.traces))
	for _, tr := range s.traces {
		out = append(out, tr.Info())
	}
	slices.SortFunc(out, func(a, b session.TraceInfo) int { return strings.Compare(a.User, b.User) })
	return out
}

func (s *Server) stopTraces() {
	s.mu.Lock()
	trs := s.traces
	s.traces = nil
	s.mu.Unlock()
	for _, tr := range trs {
		tr.Event("trace stopped: server shutting down")
		tr.Close()
	}
}
