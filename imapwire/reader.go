// Package imapwire frames the IMAP byte stream: lines, literals and the
// tokens of a command. It does no network I/O of its own beyond the
// io.Reader it is given, and it never logs.
//
// The proxy relays most traffic without understanding it, so the central
// type is Reader: it hands out one line at a time, says whether the line
// ends in a literal announcement ({n}, {n+}, ~{n}), and lets the caller copy
// the literal's bytes in bulk. Only the pre-login commands are decoded into
// tokens (Decoder).
package imapwire

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

var (
	// ErrLineTooLong is returned when a line exceeds the reader's limit.
	// The rest of the line has been discarded, so the stream is back at a
	// line boundary.
	ErrLineTooLong = errors.New("imapwire: line too long")
	// ErrLiteralTooBig is returned by ReadLiteral when a literal exceeds
	// the caller's limit. Nothing of it has been read.
	ErrLiteralTooBig = errors.New("imapwire: literal too big")
)

// SyntaxError is a malformed line. It maps to a tagged BAD.
type SyntaxError struct{ Msg string }

func (e *SyntaxError) Error() string { return "imapwire: syntax error: " + e.Msg }

func syntaxErrorf(format string, a ...any) error {
	return &SyntaxError{Msg: fmt.Sprintf(format, a...)}
}

// Literal describes a literal announced at the end of a line.
type Literal struct {
	Size    int64
	NonSync bool // {n+}: the sender does not wait for a continuation
	Binary  bool // ~{n}: literal8 (RFC 3516), may contain NUL
}

// Reader reads IMAP lines and literals from a byte stream.
//
// Lines are returned with their terminator. A line that does not fit the
// bufio buffer is assembled in a scratch buffer that is dropped again when
// it grew large, so an idle connection does not keep a 64 KiB buffer.
type Reader struct {
	br      *lazyBuf
	maxLine int
	scratch []byte
	long    *longLine // a line being read in parts; nil between lines
}

// DefaultMaxLine is Dovecot's command line limit after login.
const DefaultMaxLine = 64 * 1024

const bufSize = 4096

// NewReader returns a Reader over rd. maxLine <= 0 means DefaultMaxLine.
func NewReader(rd io.Reader, maxLine int) *Reader {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	return &Reader{br: newLazyBuf(rd), maxLine: maxLine}
}

// Buffered reports how many bytes can be read without blocking.
func (r *Reader) Buffered() int { return r.br.buffered() }

// Take consumes up to n bytes that are already buffered, without reading,
// and returns them. They are valid until the next call on r.
func (r *Reader) Take(n int) []byte { return r.br.take(n) }

// Wait blocks until a line can be read without blocking again: data is
// buffered, or the socket had data (now buffered), or reading failed, in
// which case Wait returns the error ReadLine would have returned. It
// honours the read deadline and holds no buffer while it waits.
//
// A reader that waits here rather than inside ReadLine parks its goroutine
// a few frames shallower, which is what lets the runtime shrink the stack
// of a connection that waits for its peer to the smallest size it keeps
// (4 KiB; ReadLine's full depth needs 8 KiB). On a source that cannot be
// waited on (TLS) Wait returns nil at once and ReadLine does the waiting.
func (r *Reader) Wait() error {
	// An idle connection keeps no scratch from one long line.
	r.dropScratch()
	return r.br.wait()
}

// Reset discards buffered data and reads from rd from now on.
func (r *Reader) Reset(rd io.Reader) {
	r.br.reset(rd)
	r.scratch = nil
	r.long = nil
}

// ReadLine returns the next line, terminator included (CRLF, or a bare LF
// from lenient peers), and the literal it announces, if any (lit is nil when
// the line does not end in one). The returned slice is valid until the next
// call on r. After a literal the caller must consume exactly lit.Size bytes
// (CopyLiteral, ReadLiteral or DiscardLiteral) before reading the line's
// continuation with ReadLine.
func (r *Reader) ReadLine() (line []byte, lit *Literal, err error) {
	line, err = r.readRaw()
	if err != nil {
		return nil, nil, err
	}
	lit, err = literalAtEnd(line)
	return line, lit, err
}

func (r *Reader) readRaw() ([]byte, error) {
	r.dropScratch()
	b, err := r.br.readSlice('\n')
	if err == nil {
		if len(b) > r.maxLine {
			return nil, ErrLineTooLong
		}
		return b, nil
	}
	if err != bufio.ErrBufferFull {
		if len(b) > 0 && err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	r.scratch = append(r.scratch[:0], b...)
	for {
		b, err = r.br.readSlice('\n')
		if len(r.scratch)+len(b) > r.maxLine {
			if err == nil {
				r.dropScratch()
				return nil, ErrLineTooLong
			}
			if err == bufio.ErrBufferFull {
				// Keep discarding up to the end of the line so the
				// stream stays framed; nothing more is stored.
				r.scratch = r.scratch[:0]
				if derr := r.discardLine(); derr != nil {
					return nil, derr
				}
				r.dropScratch()
				return nil, ErrLineTooLong
			}
			return nil, err
		}
		r.scratch = append(r.scratch, b...)
		switch err {
		case nil:
			return r.scratch, nil
		case bufio.ErrBufferFull:
			continue
		case io.EOF:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

func (r *Reader) discardLine() error {
	for {
		_, err := r.br.readSlice('\n')
		switch err {
		case nil:
			return nil
		case bufio.ErrBufferFull:
			continue
		case io.EOF:
			return io.ErrUnexpectedEOF
		default:
			return err
		}
	}
}

// dropScratch lets a large line buffer be collected, so that one long
// command does not pin memory for the rest of a long session.
func (r *Reader) dropScratch() {
	if cap(r.scratch) > 2*bufSize {
		r.scratch = nil
	}
}

// longLine follows a line read in parts: the quoting state of what has
// gone by and the line's last bytes, where a literal announcement would be.
type longLine struct {
	q    quoting // of the line up to tail
	tail []byte  // the last bytes seen, at most maxTail
	buf  [2 * maxTail]byte
	// braceOut: the last '{' before the tail was outside a quoted
	// string. A '}' that ends the line closes it over more bytes than a
	// literal length has, which the whole line refuses as a bad length.
	braceOut bool
}

// maxTail holds the longest literal announcement, "~{" 19 digits "+}"
// CRLF, with room to spare.
const maxTail = 32

// ReadPart reads the next line of a peer whose lines have no length limit,
// such as a server's responses (a SEARCH of a large mailbox, an ENVELOPE
// with thousands of addresses): a line that does not fit the buffer comes
// in parts, each valid until the next call, so that it can be passed on
// holding no more than one buffer. more is true while the line goes on;
// the last part ends with the terminator and carries the line's literal,
// if any. A line that fits comes whole, as from ReadLine. A caller that
// needs the start of the line (tag, status) finds at least the buffer's
// size of it in the first part.
func (r *Reader) ReadPart() (part []byte, more bool, lit *Literal, err error) {
	r.dropScratch()
	b, err := r.br.readSlice('\n')
	switch {
	case err == nil:
	case err == bufio.ErrBufferFull:
		if r.long == nil {
			r.long = &longLine{}
		}
		r.long.add(b)
		return b, true, nil, nil
	default:
		r.long = nil
		if err == io.EOF && len(b) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, false, nil, err
	}
	if r.long == nil {
		lit, err = literalAtEnd(b)
		return b, false, lit, err
	}
	l := r.long
	r.long = nil
	l.add(b)
	lit, err = l.literalAtEnd()
	return b, false, lit, err
}

// add takes the next part of a long line: its last bytes stay in the
// tail, the ones pushed out of it go through the quoting state.
func (l *longLine) add(p []byte) {
	if len(p) >= maxTail {
		l.pass(l.tail)
		l.pass(p[:len(p)-maxTail])
		l.tail = append(l.buf[:0], p[len(p)-maxTail:]...)
		return
	}
	if l.tail == nil {
		l.tail = l.buf[:0]
	}
	l.tail = append(l.tail, p...)
	if over := len(l.tail) - maxTail; over > 0 {
		l.pass(l.tail[:over])
		l.tail = append(l.buf[:0], l.tail[over:]...)
	}
}

// pass takes bytes that leave the tail through the quoting state, noting
// where the last '{' stood.
func (l *longLine) pass(b []byte) {
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], '{')
		if j < 0 {
			l.q.scan(b[i:])
			return
		}
		l.q.scan(b[i : i+j])
		l.braceOut = !l.q.in
		l.q.scan(b[i+j : i+j+1]) // it may end an escape
		i += j + 1
	}
}

// literalAtEnd is literalAtEnd for the whole line, of which only the tail
// is still at hand.
func (l *longLine) literalAtEnd() (*Literal, error) {
	t := TrimEOL(l.tail)
	if len(t) > 0 && t[len(t)-1] == '}' && bytes.IndexByte(t, '{') < 0 && l.braceOut {
		return nil, syntaxErrorf("bad literal length")
	}
	return l.q.literalAtEnd(l.tail)
}

// ReadLiteral reads a literal of n bytes into memory. If n > limit it reads
// nothing and returns ErrLiteralTooBig.
func (r *Reader) ReadLiteral(n int64, limit int) ([]byte, error) {
	if n > int64(limit) {
		return nil, ErrLiteralTooBig
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r.br, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// DiscardLiteral skips n bytes.
func (r *Reader) DiscardLiteral(n int64) error {
	_, err := io.CopyN(io.Discard, r.br, n)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// CopyLiteral copies n bytes to w without looking at them. What is already
// buffered is written first; the rest goes straight from the underlying
// reader, so that a *net.TCPConn destination can splice from a TCP source.
func (r *Reader) CopyLiteral(w io.Writer, n int64, src io.Reader) (int64, error) {
	var done int64
	if buffered := r.br.buffered(); buffered > 0 {
		k := int64(buffered)
		if k > n {
			k = n
		}
		m, err := w.Write(r.br.take(int(k)))
		done += int64(m)
		if err != nil {
			return done, err
		}
	}
	if done == n {
		return done, nil
	}
	if src == nil {
		src = r.br
	}
	m, err := io.CopyN(w, src, n-done)
	done += m
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return done, err
}

// literalAtEnd reports the literal announced at the end of line, if any.
// A '}' at the end only announces a literal when it is outside a quoted
// string; otherwise a client could make the proxy frame the stream
// differently from the server.
func literalAtEnd(line []byte) (*Literal, error) {
	var q quoting
	return q.literalAtEnd(line)
}

// literalAtEnd is literalAtEnd for the end of a line whose start left
// the quoting state q.
func (q quoting) literalAtEnd(line []byte) (*Literal, error) {
	l := TrimEOL(line)
	if len(l) == 0 || l[len(l)-1] != '}' {
		return nil, nil
	}
	open := bytes.LastIndexByte(l, '{')
	if open < 0 {
		return nil, nil
	}
	if q.scan(l[:open]); q.in {
		return nil, nil
	}
	lit := &Literal{}
	if open > 0 && l[open-1] == '~' {
		lit.Binary = true
	}
	digits := l[open+1 : len(l)-1]
	if len(digits) > 0 && (digits[len(digits)-1] == '+' || digits[len(digits)-1] == '-') {
		lit.NonSync = digits[len(digits)-1] == '+'
		digits = digits[:len(digits)-1]
	}
	if len(digits) == 0 || len(digits) > 19 {
		return nil, syntaxErrorf("bad literal length")
	}
	var n int64
	for _, c := range digits {
		if c < '0' || c > '9' {
			return nil, syntaxErrorf("bad literal length")
		}
		n = n*10 + int64(c-'0')
	}
	if n < 0 { // 19 digits can overflow int64
		return nil, syntaxErrorf("bad literal length")
	}
	lit.Size = n
	return lit, nil
}

// quoting is where a scan of a line stands with respect to quoted
// strings: inside one, and just after a backslash in one.
type quoting struct{ in, escaped bool }

func (q *quoting) scan(b []byte) {
	for _, c := range b {
		switch {
		case q.escaped:
			q.escaped = false
		case c == '"':
			q.in = !q.in
		case c == '\\' && q.in:
			q.escaped = true
		}
	}
}

// TrimEOL removes a trailing CRLF or LF.
func TrimEOL(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
		if n := len(b); n > 0 && b[n-1] == '\r' {
			b = b[:n-1]
		}
	}
	return b
}
