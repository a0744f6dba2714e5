package session

import (
	"fmt"
	"os"
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

// Tracer writes one user's trace. The server keeps the running ones and
// hands each to the user's sessions (Session.Trace).
type Tracer struct {
	user    string // as the operator gave it
	path    string
	started time.Time

	mu     sync.Mutex
	f      *os.File
	n      int64
	closed bool
	buf    []byte
}

// NewTracer starts a trace of user into a new file at path (created, mode
// 0600; an existing file is an error).
func NewTracer(user, path string) (*Tracer, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &Tracer{user: user, path: path, started: time.Now(), f: f}, nil
}

// Info describes the trace.
func (tr *Tracer) Info() TraceInfo {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return TraceInfo{User: tr.user, Path: tr.path, Started: tr.started, Bytes: tr.n}
}

// Close ends the trace; lines written after it are dropped.
func (tr *Tracer) Close() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if !tr.closed {
		tr.closed = true
		tr.f.Close()
	}
}

// Event writes an operator's note, such as why the trace ends.
func (tr *Tracer) Event(msg string) {
	tr.write(func(b []byte) []byte { return append(b, "-- "+msg...) })
}

// line records one protocol line of session id; dir is "C" (client to
// server) or "S". lit, if not nil, is the literal that follows it.
func (tr *Tracer) line(id, backend, dir string, line []byte, lit *imapwire.Literal) {
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

func (tr *Tracer) write(fill func([]byte) []byte) {
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
