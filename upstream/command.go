package upstream

import (
	"strconv"

	"github.com/imapproxy/imapproxy/imapwire"
)

// The commands the proxy writes to a backend. Nothing here flushes but
// command; a login's lines go out in one write.

// command writes "tag cmd" and flushes.
func (c *Conn) command(tag, cmd string) error {
	c.writeLine(tag, cmd)
	return c.w.Flush()
}

// writeLine buffers "tag cmd"; cmd is well formed (atoms, quoted strings).
func (c *Conn) writeLine(tag, cmd string) {
	c.w.WriteString(tag)
	c.w.WriteString(" ")
	c.w.WriteString(cmd)
	c.w.WriteString("\r\n")
}

// writeID buffers "tag ID params"; params is the list as the client's ID
// command had it, or as the proxy built it.
func (c *Conn) writeID(tag string, params []byte) {
	c.w.WriteString(tag)
	c.w.WriteString(" ID ")
	c.w.Write(params)
	c.w.WriteString("\r\n")
}

// writeLogin buffers "tag LOGIN user password". The user must be
// quotable; a password that is not goes as a literal, non-synchronising
// where the backend takes LITERAL+, else synchronising: the bytes
// returned are then to be sent after the backend's "+".
func (c *Conn) writeLogin(tag string, cr *Credentials) (rest []byte) {
	buf := make([]byte, 0, 64+2*len(cr.User)+2*len(cr.Pass))
	buf = append(buf, tag...)
	buf = append(buf, " LOGIN "...)
	buf, _ = imapwire.AppendAString(buf, cr.User)
	buf = append(buf, ' ')
	if nb, ok := imapwire.AppendAString(buf, cr.Pass); ok {
		buf = append(nb, "\r\n"...)
	} else if HasCap(c.preCaps, "LITERAL+") {
		buf = strconv.AppendInt(append(buf, '{'), int64(len(cr.Pass)), 10)
		buf = append(buf, "+}\r\n"...)
		buf = append(buf, cr.Pass...)
		buf = append(buf, "\r\n"...)
	} else {
		buf = strconv.AppendInt(append(buf, '{'), int64(len(cr.Pass)), 10)
		buf = append(buf, "}\r\n"...)
		rest = append(append([]byte(nil), cr.Pass...), "\r\n"...)
	}
	c.w.Write(buf)
	clear(buf)
	return rest
}

// writeAuthenticate buffers "tag AUTHENTICATE PLAIN", with the initial
// response where the backend takes SASL-IR; else it returns the response
// line to be sent after the backend's "+".
func (c *Conn) writeAuthenticate(tag string, cr *Credentials) (rest []byte) {
	ir := PlainResponse(cr)
	c.w.WriteString(tag)
	c.w.WriteString(" AUTHENTICATE PLAIN")
	if !HasCap(c.preCaps, "SASL-IR") {
		c.w.WriteString("\r\n")
		return append(ir, "\r\n"...)
	}
	c.w.WriteString(" ")
	c.w.Write(ir)
	c.w.WriteString("\r\n")
	clear(ir)
	return nil
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
