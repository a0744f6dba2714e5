package upstream

import "github.com/imapproxy/imapproxy/imapwire"

// The commands the proxy writes to a backend, through imapwire's
// Encoder. Nothing here flushes but command and a login that must wait
// for a continuation request; a login's lines go out in one write.

// command writes "tag cmd" and flushes.
func (c *Conn) command(tag, cmd string) error {
	if err := c.writeLine(tag, cmd); err != nil {
		return err
	}
	return c.w.Flush()
}

// writeLine buffers "tag cmd"; cmd is well formed (atoms, quoted strings).
func (c *Conn) writeLine(tag, cmd string) error {
	enc := imapwire.Encoder{W: c.w}
	return enc.Atom(tag).SP().Atom(cmd).CRLF()
}

// writeID buffers "tag ID params"; params is the parenthesised list as
// the proxy built it for the client.
func (c *Conn) writeID(tag string, params []byte) error {
	enc := imapwire.Encoder{W: c.w}
	return enc.Atom(tag).SP().Atom("ID").SP().Atom(string(params)).CRLF()
}

// writeLogin writes "tag LOGIN user password". The user must be
// quotable (see quotable); a password that is not goes as a literal,
// non-synchronising where the backend takes LITERAL+, else
// synchronising: what is buffered is then flushed, before is called (to
// read the answers due first) and the backend's "+" awaited before the
// password is written.
func (c *Conn) writeLogin(tag string, cr *Credentials, before func() error) error {
	enc := imapwire.Encoder{
		W:           c.w,
		LiteralPlus: HasCap(c.preCaps, "LITERAL+"),
		Continue: func() error {
			if err := before(); err != nil {
				return err
			}
			return c.awaitContinuation()
		},
	}
	return enc.Atom(tag).SP().Atom("LOGIN").SP().AString(cr.User).SP().AString(cr.Pass).CRLF()
}

// writeAuthenticate writes "tag AUTHENTICATE PLAIN", with the initial
// response where the backend takes SASL-IR. Else it flushes, calls
// before, awaits the backend's "+" and writes the response on a line of
// its own.
func (c *Conn) writeAuthenticate(tag string, cr *Credentials, before func() error) error {
	ir := PlainResponse(cr)
	defer clear(ir)
	enc := imapwire.Encoder{W: c.w}
	enc.Atom(tag).SP().Atom("AUTHENTICATE").SP().Atom("PLAIN")
	// Base64 is made of atom characters: AString writes it as it is.
	if HasCap(c.preCaps, "SASL-IR") {
		return enc.SP().AString(ir).CRLF()
	}
	if err := enc.CRLF(); err != nil {
		return err
	}
	if err := c.w.Flush(); err != nil {
		return err
	}
	if err := before(); err != nil {
		return err
	}
	if err := c.awaitContinuation(); err != nil {
		return err
	}
	return enc.AString(ir).CRLF()
}

// quotable reports whether s can be sent as a quoted string (or an
// atom), not only as a literal.
func quotable(s []byte) bool {
	for _, ch := range s {
		if ch == 0 || ch == '\r' || ch == '\n' || ch >= 0x80 {
			return false
		}
	}
	return true
}
