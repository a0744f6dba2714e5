package imapwire

import (
	"errors"
	"strconv"
)

// ErrSyncLiteral means a string needed a synchronising literal and the
// Encoder has no Continue to wait for the peer's "+" with.
var ErrSyncLiteral = errors.New("imapwire: synchronising literal without Continue")

// Encoder writes IMAP syntax to a Writer: the responses a server sends
// and the commands a client sends. Its methods chain; the first error
// sticks, nothing is written after it, and CRLF or Err reports it. It
// writes into the Writer's buffer and allocates nothing of its own. A
// zero Encoder with W set writes every string that needs a literal as a
// synchronising one, and fails such a string if Continue is nil.
//
//	enc := imapwire.Encoder{W: w, LiteralPlus: true}
//	enc.Atom(tag).SP().Atom("LOGIN").SP().AString(user).SP().AString(pass).CRLF()
type Encoder struct {
	W *Writer
	// LiteralPlus says the peer takes non-synchronising literals
	// ({n+}, RFC 7888 LITERAL+), which follow their announcement at once.
	LiteralPlus bool
	// Continue waits for the peer's continuation request ("+") before the
	// bytes of a synchronising literal ({n}) are sent; the announcement
	// and everything before it have been flushed when it is called.
	Continue func() error

	err error
}

// Err is the first error the Encoder met.
func (enc *Encoder) Err() error { return enc.err }

// Atom writes s as it is: an atom, a tag, a number or a list of them the
// caller knows to be well formed (a capability list, a sequence set).
func (enc *Encoder) Atom(s string) *Encoder {
	if enc.err == nil {
		enc.err = put(enc.W, s)
	}
	return enc
}

// SP writes a space.
func (enc *Encoder) SP() *Encoder { return enc.Atom(" ") }

// NIL writes NIL.
func (enc *Encoder) NIL() *Encoder { return enc.Atom("NIL") }

// Number writes n in decimal.
func (enc *Encoder) Number(n uint64) *Encoder {
	if enc.err == nil {
		enc.err = enc.W.appendUint(n)
	}
	return enc
}

// AString writes s as an atom when it is one, else as a string (see
// String).
func (enc *Encoder) AString(s []byte) *Encoder {
	if len(s) > 0 && isAtom(s) {
		if enc.err == nil {
			enc.err = put(enc.W, s)
		}
		return enc
	}
	return enc.String(s)
}

// String writes s as a quoted string when it can be one, else as a
// literal: {n+} with LiteralPlus, else {n}, flushed, and its bytes after
// Continue has seen the peer's "+".
func (enc *Encoder) String(s []byte) *Encoder {
	if enc.err != nil {
		return enc
	}
	if quotable(s) {
		enc.err = quote(enc.W, s)
		return enc
	}
	return enc.literal(s)
}

func (enc *Encoder) literal(s []byte) *Encoder {
	if !enc.LiteralPlus && enc.Continue == nil {
		enc.err = ErrSyncLiteral
		return enc
	}
	enc.Atom("{").Number(uint64(len(s)))
	if enc.LiteralPlus {
		enc.Atom("+}\r\n")
	} else {
		enc.Atom("}\r\n")
		if enc.err == nil {
			enc.err = enc.W.Flush()
		}
		if enc.err == nil {
			enc.err = enc.Continue()
		}
	}
	if enc.err == nil {
		enc.err = put(enc.W, s)
	}
	return enc
}

// List writes a parenthesised list of n items separated by spaces; item
// writes the i-th.
func (enc *Encoder) List(n int, item func(i int)) *Encoder {
	enc.Atom("(")
	for i := 0; i < n && enc.err == nil; i++ {
		if i > 0 {
			enc.SP()
		}
		item(i)
	}
	return enc.Atom(")")
}

// Text writes human-readable text (resp-text's text) with control
// characters left out, so that no text, whatever its source, can end the
// line early or smuggle a response in.
func (enc *Encoder) Text(s string) *Encoder {
	start := 0
	for i := 0; i < len(s) && enc.err == nil; i++ {
		if isTextChar(s[i]) {
			continue
		}
		enc.Atom(s[start:i])
		start = i + 1
	}
	return enc.Atom(s[start:])
}

// CRLF ends the line and reports the first error. It does not flush: a
// burst of lines goes out in one write when the caller flushes.
func (enc *Encoder) CRLF() error {
	return enc.Atom("\r\n").err
}

func isTextChar(c byte) bool { return c >= ' ' && c != 0x7f }

// quotable reports whether s can be sent as a quoted string.
func quotable(s []byte) bool {
	for _, c := range s {
		if c == 0 || c == '\r' || c == '\n' || c >= 0x80 {
			return false
		}
	}
	return true
}

// quote writes s, which must be quotable, as a quoted string.
func quote(w *Writer, s []byte) error {
	if err := put(w, `"`); err != nil {
		return err
	}
	start := 0
	for i, c := range s {
		if c != '"' && c != '\\' {
			continue
		}
		if err := put(w, s[start:i]); err != nil {
			return err
		}
		if err := put(w, `\`); err != nil {
			return err
		}
		start = i
	}
	if err := put(w, s[start:]); err != nil {
		return err
	}
	return put(w, `"`)
}

// put copies p into w's buffer, flushing as it fills. Unlike Write it
// never hands p to the destination itself, so that p does not escape and
// an encoder's small writes cost no allocation.
func put[T string | []byte](w *Writer, p T) error {
	if w.err != nil {
		return w.err
	}
	if w.buf == nil {
		w.buf = getBuf()[:0]
	}
	for len(p) > 0 {
		if len(w.buf) == cap(w.buf) {
			if err := w.flushBuf(); err != nil {
				return err
			}
		}
		n := copy(w.buf[len(w.buf):cap(w.buf)], p)
		w.buf = w.buf[:len(w.buf)+n]
		p = p[n:]
	}
	return nil
}

// appendUint writes n in decimal straight into w's buffer.
func (w *Writer) appendUint(n uint64) error {
	const maxDigits = 20
	if w.err != nil {
		return w.err
	}
	if w.buf == nil {
		w.buf = getBuf()[:0]
	}
	if cap(w.buf)-len(w.buf) < maxDigits {
		if err := w.flushBuf(); err != nil {
			return err
		}
	}
	w.buf = strconv.AppendUint(w.buf, n, 10)
	return nil
}
