package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

// Limits of what one response may make the client hold. Literals above
// keepLiteral, or that would grow a response past maxResp, are read and
// counted but not kept (a BODY[] of a big message); a line longer than
// maxResp is a protocol error.
const (
	keepLiteral = 16 << 10
	maxResp     = 1 << 20
	maxLiteral  = 1 << 40
	scratchSize = 64 << 10 // read size for skipped literals
	spliceMin   = 64 << 10 // smallest remainder of a literal worth a splice
)

// respKind tells what a response is by its first token.
type respKind uint8

const (
	respUntagged respKind = iota // "* ..."
	respCont                     // "+ ..."
	respTagged                   // "TAG ..." for the command in flight
)

// protoError is a response the client cannot make sense of.
type protoError struct{ msg string }

func (e *protoError) Error() string { return "protocol: " + e.msg }

func protof(format string, args ...any) error {
	return &protoError{msg: fmt.Sprintf(format, args...)}
}

// byeError: the server said BYE where the client did not ask for it and
// then closed the connection (or the read failed).
type byeError struct {
	text string
	err  error
}

func (e *byeError) Error() string { return fmt.Sprintf("server said %q: %v", e.text, e.err) }
func (e *byeError) Unwrap() error { return e.err }

// statusError is a tagged NO or BAD.
type statusError struct {
	status string // "NO" or "BAD"
	text   string // the whole tagged line
}

func (e *statusError) Error() string { return e.text }

// client is one IMAP client connection: a buffered reader, one write per
// command, tags a1, a2, ... per connection. It is reused across
// connections (attach) so that a cycle allocates little beyond the dial.
// Not safe for concurrent use. The client owns conn from attach to close.
type client struct {
	conn    net.Conn
	r       *bufio.Reader
	timeout time.Duration // per command (write and reply); 0: none

	wbuf    []byte // the command being built: "TAG CMD...\r\n"
	tag     []byte // copy of the tag in flight, for matching replies
	seq     uint64
	resp    []byte // the last response, CRLF stripped, small literals inline
	scratch []byte
	null    *os.File // /dev/null for big literals (useSplice); closed by release

	// Observations, reset by attach (litBytes is cumulative).
	litBytes  int64  // literal octets received
	bye       bool   // an untagged BYE arrived
	byeText   []byte // its text
	reused    bool   // * OK [XPROXYREUSE] seen
	exists    int64  // last * N EXISTS
	fetches   int64  // * N FETCH responses (callers zero it per command)
	greetName []byte // "NAME" of a greeting ending in "(NAME)."
	idName    []byte // "name" field of the last * ID
}

func newClient(bufSize int, timeout time.Duration) *client {
	return &client{r: bufio.NewReaderSize(nil, bufSize), timeout: timeout, wbuf: make([]byte, 0, 256), resp: make([]byte, 0, 512)}
}

// useSplice makes the client drop big literals into /dev/null by splice
// (bulk). release closes it.
func (c *client) useSplice() error {
	if c.null != nil {
		return nil
	}
	f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	c.null = f
	return nil
}

// release closes the connection and /dev/null.
func (c *client) release() {
	c.close()
	if c.null != nil {
		c.null.Close()
		c.null = nil
	}
}

// attach makes conn the client's connection and resets the per-connection
// state. The client owns conn until close.
func (c *client) attach(conn net.Conn) {
	c.conn = conn
	c.r.Reset(conn)
	c.seq = 0
	c.tag = c.tag[:0]
	c.bye = false
	c.byeText = c.byeText[:0]
	c.reused = false
	c.exists = 0
	c.fetches = 0
	c.greetName = c.greetName[:0]
	c.idName = c.idName[:0]
}

// close closes the connection, if any.
func (c *client) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
		c.r.Reset(nil)
	}
}

func (c *client) arm() error {
	if c.timeout <= 0 {
		return nil
	}
	return c.conn.SetDeadline(time.Now().Add(c.timeout))
}

// begin starts a command with a fresh tag in wbuf; the caller appends the
// command and calls flush.
func (c *client) begin() {
	c.seq++
	c.wbuf = append(c.wbuf[:0], 'a')
	c.wbuf = strconv.AppendUint(c.wbuf, c.seq, 10)
	c.tag = append(c.tag[:0], c.wbuf...)
	c.wbuf = append(c.wbuf, ' ')
}

// flush ends the command with CRLF, arms the deadline and writes it in
// one write.
func (c *client) flush() error {
	c.wbuf = append(c.wbuf, '\r', '\n')
	if err := c.arm(); err != nil {
		return err
	}
	_, err := c.conn.Write(c.wbuf)
	return err
}

// run sends "TAG cmd" (cmd without CRLF) and reads to its tagged reply.
// A tagged NO or BAD is a *statusError.
func (c *client) run(cmd []byte) error {
	c.begin()
	c.wbuf = append(c.wbuf, cmd...)
	if err := c.flush(); err != nil {
		return err
	}
	return c.wait(nil)
}

// greeting reads the server greeting; it must be "* OK". The name in
// "(NAME)" at the end of its text is kept in greetName.
func (c *client) greeting() error {
	if err := c.arm(); err != nil {
		return err
	}
	kind, err := c.readResp()
	if err != nil {
		return err
	}
	if kind != respUntagged {
		return protof("greeting %q", clip(c.resp))
	}
	word, rest := splitWord(c.resp[2:])
	switch {
	case asciiEqualFold(word, "OK"):
	case asciiEqualFold(word, "BYE"):
		c.bye = true
		return &byeError{text: string(c.resp), err: errors.New("greeting")}
	default:
		return protof("greeting %q", clip(c.resp))
	}
	c.greetName = append(c.greetName[:0], greetingName(rest)...)
	return nil
}

// wait reads responses until the tagged reply to the command in flight,
// observing untagged data on the way. A continuation request is an error
// when onCont is nil; otherwise wait returns what onCont does.
func (c *client) wait(onCont func() error) error {
	for {
		kind, err := c.readResp()
		if err != nil {
			if c.bye {
				return &byeError{text: string(c.byeText), err: err}
			}
			return err
		}
		switch kind {
		case respUntagged:
			c.untagged()
		case respCont:
			if onCont == nil {
				return protof("unexpected continuation %q", clip(c.resp))
			}
			return onCont()
		case respTagged:
			return c.tagged()
		}
	}
}

// tagged checks the status of the tagged reply in resp.
func (c *client) tagged() error {
	word, _ := splitWord(c.resp[len(c.tag)+1:])
	switch {
	case asciiEqualFold(word, "OK"):
		return nil
	case asciiEqualFold(word, "NO"):
		return &statusError{status: "NO", text: string(c.resp)}
	case asciiEqualFold(word, "BAD"):
		return &statusError{status: "BAD", text: string(c.resp)}
	}
	return protof("tagged reply %q", clip(c.resp))
}

// logout sends LOGOUT and reads the BYE and the tagged OK.
func (c *client) logout() error {
	if err := c.run(cmdLogout); err != nil {
		return err
	}
	if !c.bye {
		return protof("LOGOUT completed without BYE")
	}
	return nil
}

// idle sends IDLE and waits for the continuation; then the connection has
// no deadline until done.
func (c *client) idle() error {
	c.begin()
	c.wbuf = append(c.wbuf, "IDLE"...)
	if err := c.flush(); err != nil {
		return err
	}
	continued := false
	err := c.wait(func() error {
		continued = true
		return c.conn.SetDeadline(time.Time{})
	})
	if err == nil && !continued {
		return protof("IDLE completed without continuation")
	}
	return err
}

// done ends IDLE and reads the IDLE command's tagged reply.
func (c *client) done() error {
	c.wbuf = append(c.wbuf[:0], "DONE\r\n"...)
	if err := c.arm(); err != nil {
		return err
	}
	if _, err := c.conn.Write(c.wbuf); err != nil {
		return err
	}
	return c.wait(nil)
}

var cmdLogout = []byte("LOGOUT")

// untagged observes an untagged response in resp.
func (c *client) untagged() {
	body := c.resp[2:]
	word, rest := splitWord(body)
	if len(word) > 0 && word[0] >= '0' && word[0] <= '9' {
		kw, _ := splitWord(rest)
		switch {
		case asciiEqualFold(kw, "FETCH"):
			c.fetches++
		case asciiEqualFold(kw, "EXISTS"):
			if n, err := strconv.ParseInt(string(word), 10, 64); err == nil {
				c.exists = n
			}
		}
		return
	}
	switch {
	case asciiEqualFold(word, "BYE"):
		c.bye = true
		c.byeText = append(c.byeText[:0], c.resp...)
	case asciiEqualFold(word, "OK"):
		if bytes.HasPrefix(rest, []byte("[XPROXYREUSE]")) {
			c.reused = true
		}
	case asciiEqualFold(word, "ID"):
		c.idName = append(c.idName[:0], idName(rest)...)
	}
}

// readResp reads one whole response into resp: its lines, and literals
// {n} (or ~{n}) inline when small. The final CRLF is stripped; the CRLF
// after each literal header stays, so resp reads like the wire. It
// classifies the response by its first token.
func (c *client) readResp() (respKind, error) {
	c.resp = c.resp[:0]
	for {
		start := len(c.resp)
		if err := c.readLine(); err != nil {
			return 0, err
		}
		n, ok, err := literalSize(c.resp[start:])
		if err != nil {
			return 0, err
		}
		if !ok {
			break
		}
		c.litBytes += n
		if n <= keepLiteral && int64(len(c.resp))+n <= maxResp {
			c.resp = grow(c.resp, int(n))
			if _, err := io.ReadFull(c.r, c.resp[len(c.resp)-int(n):]); err != nil {
				return 0, unexpectedEOF(err)
			}
			continue
		}
		if err := c.skip(n); err != nil {
			return 0, err
		}
	}
	c.resp = trimCRLF(c.resp)
	r := c.resp
	switch {
	case len(r) >= 2 && r[0] == '*' && r[1] == ' ':
		return respUntagged, nil
	case len(r) >= 1 && r[0] == '+' && (len(r) == 1 || r[1] == ' '):
		return respCont, nil
	case len(c.tag) > 0 && len(r) > len(c.tag) && r[len(c.tag)] == ' ' && bytes.Equal(r[:len(c.tag)], c.tag):
		return respTagged, nil
	}
	return 0, protof("unexpected response %q", clip(r))
}

// readLine appends one line, with its LF, to resp.
func (c *client) readLine() error {
	for {
		frag, err := c.r.ReadSlice('\n')
		if len(c.resp)+len(frag) > maxResp {
			return protof("response line longer than %d bytes", maxResp)
		}
		c.resp = append(c.resp, frag...)
		switch err {
		case nil:
			return nil
		case bufio.ErrBufferFull:
			continue
		}
		return unexpectedEOF(err)
	}
}

// skip reads and drops n literal octets: first what is buffered, then
// the rest straight from the connection. Big remainders go to /dev/null
// with io.CopyN, which Linux does with splice(2) (socket to pipe to
// /dev/null, no copy into the process); otherwise, or if that fails
// before moving anything, in big reads.
func (c *client) skip(n int64) error {
	if b := int64(c.r.Buffered()); b > 0 {
		k := min(b, n)
		if _, err := c.r.Discard(int(k)); err != nil {
			return err
		}
		n -= k
	}
	if n >= spliceMin && c.null != nil {
		m, err := io.CopyN(c.null, c.conn, n)
		n -= m
		if err != nil && n > 0 {
			return unexpectedEOF(err)
		}
	}
	if n > 0 && c.scratch == nil {
		c.scratch = make([]byte, scratchSize)
	}
	for n > 0 {
		m, err := c.conn.Read(c.scratch[:min(n, int64(len(c.scratch)))])
		n -= int64(m)
		if err != nil && n > 0 {
			return unexpectedEOF(err)
		}
	}
	return nil
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// literalSize parses the literal header that ends a line ("... {123}\r\n",
// also "{123+}" and "~{123}"). ok is false when the line has none.
func literalSize(line []byte) (n int64, ok bool, err error) {
	line = trimCRLF(line)
	if len(line) < 3 || line[len(line)-1] != '}' {
		return 0, false, nil
	}
	end := len(line) - 1
	if line[end-1] == '+' {
		end--
	}
	i := end
	for i > 0 && line[i-1] >= '0' && line[i-1] <= '9' {
		i--
	}
	if i == end || i == 0 || line[i-1] != '{' {
		return 0, false, nil
	}
	for _, d := range line[i:end] {
		n = n*10 + int64(d-'0')
		if n > maxLiteral {
			return 0, false, protof("literal of more than %d bytes", int64(maxLiteral))
		}
	}
	return n, true, nil
}

func trimCRLF(b []byte) []byte {
	if len(b) > 0 && b[len(b)-1] == '\n' {
		b = b[:len(b)-1]
	}
	if len(b) > 0 && b[len(b)-1] == '\r' {
		b = b[:len(b)-1]
	}
	return b
}

// grow extends b by n bytes (content undefined).
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) < n {
		nb := make([]byte, len(b), 2*cap(b)+n)
		copy(nb, b)
		b = nb
	}
	return b[:len(b)+n]
}

// splitWord splits off the first space-delimited word.
func splitWord(b []byte) (word, rest []byte) {
	if i := bytes.IndexByte(b, ' '); i >= 0 {
		return b[:i], b[i+1:]
	}
	return b, nil
}

func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range b {
		x := b[i]
		if 'a' <= x && x <= 'z' {
			x -= 'a' - 'A'
		}
		if x != s[i] {
			return false
		}
	}
	return true
}

// greetingName finds NAME in a greeting text "[CODE ...] Dovecot ready
// (NAME)." : the last parenthesised word after any response code.
func greetingName(text []byte) []byte {
	if len(text) > 0 && text[0] == '[' {
		if i := bytes.IndexByte(text, ']'); i >= 0 {
			text = text[i+1:]
		}
	}
	rp := bytes.LastIndexByte(text, ')')
	if rp < 0 {
		return nil
	}
	lp := bytes.LastIndexByte(text[:rp], '(')
	if lp < 0 {
		return nil
	}
	name := bytes.TrimSpace(text[lp+1 : rp])
	if len(name) == 0 || bytes.ContainsAny(name, " \t") {
		return nil
	}
	return name
}

// idName returns the value of "name" in an ID response's parameter list:
// `("name" "backend-1" "version" "2.3")`, values quoted, literals or NIL.
// It returns nil for NIL or when there is no name.
func idName(list []byte) []byte {
	if len(list) == 0 || list[0] != '(' {
		return nil
	}
	p := list[1:]
	var key []byte
	for n := 0; ; n++ {
		for len(p) > 0 && p[0] == ' ' {
			p = p[1:]
		}
		if len(p) == 0 || p[0] == ')' {
			return nil
		}
		tok, rest, ok := idString(p)
		if !ok {
			return nil
		}
		p = rest
		if n%2 == 0 {
			key = tok
		} else if asciiEqualFold(key, "NAME") {
			return tok
		}
	}
}

// idString reads a quoted string, literal (kept inline by readResp) or
// NIL (returned as nil) from the start of p. An escaped quoted string is
// returned with its backslashes: names do not use them.
func idString(p []byte) (tok, rest []byte, ok bool) {
	switch {
	case p[0] == '"':
		for i := 1; i < len(p); i++ {
			switch p[i] {
			case '\\':
				i++
			case '"':
				return p[1:i], p[i+1:], true
			}
		}
		return nil, nil, false
	case p[0] == '{':
		i := bytes.Index(p, []byte("}\r\n"))
		if i < 0 {
			return nil, nil, false
		}
		n, err := strconv.Atoi(string(bytes.TrimSuffix(p[1:i], []byte("+"))))
		if err != nil || n < 0 || i+3+n > len(p) {
			return nil, nil, false
		}
		return p[i+3 : i+3+n], p[i+3+n:], true
	case len(p) >= 3 && asciiEqualFold(p[:3], "NIL"):
		return nil, p[3:], true
	}
	return nil, nil, false
}

// appendQuoted appends s as an IMAP quoted string; s must be quotable
// (see quotable).
func appendQuoted(b []byte, s string) []byte {
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return append(b, '"')
}

// quotable reports whether s can be sent as a quoted string: 7-bit, no
// NUL, CR or LF (RFC 3501 QUOTED-CHAR).
func quotable(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c == '\r' || c == '\n' || c >= 0x80 {
			return false
		}
	}
	return true
}

// clip shortens a response for an error message.
func clip(b []byte) string {
	const n = 120
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
