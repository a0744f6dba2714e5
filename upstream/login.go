package upstream

import (
	"context"
	"encoding/base64"
	"net"
	"time"
)

// Credentials are what a client logs in with.
type Credentials struct {
	User    []byte
	Authzid []byte // the SASL authorization identity; empty for none
	Pass    []byte
}

// LoginResult is the backend's answer to a login.
type LoginResult struct {
	OK     bool
	Status string // OK, NO or BAD
	Text   []byte // response text after the status, e.g. "[AUTHENTICATIONFAILED] ..."
}

// Login sends ID (when id, the parenthesised parameter list, is not nil)
// and LOGIN or AUTHENTICATE PLAIN, pipelined in one write where the
// protocol allows, all within the Dialer's login timeout. A refusal is a
// LoginResult, not an error; an error means the connection is of no
// further use. The end of ctx (the server's Close) cuts a login that
// waits on a hung backend; Login then reports ctx's error.
func (c *Conn) Login(ctx context.Context, cr *Credentials, id []byte) (LoginResult, error) {
	stop := context.AfterFunc(ctx, c.Abort)
	res, err := c.login(cr, id)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	return res, err
}

func (c *Conn) login(cr *Credentials, id []byte) (LoginResult, error) {
	c.conn.SetDeadline(time.Now().Add(c.d.LoginLimit()))
	defer c.conn.SetDeadline(time.Time{})

	method := c.method(cr)
	if method == "login" && !quotable(cr.User) {
		return LoginResult{Status: "NO", Text: []byte("[CANNOT] User name not supported")}, nil
	}
	var idTag string
	if id != nil {
		idTag = c.NextTag()
		c.writeID(idTag, id)
	}
	tag := c.NextTag()
	// The answer to ID is read before the login's, and before the
	// continuation request a login may have to wait for.
	idRead := idTag == ""
	readID := func() error {
		if idRead {
			return nil
		}
		idRead = true
		_, _, err := c.readTagged(idTag, nil)
		return err
	}
	var err error
	if method == "plain" {
		err = c.writeAuthenticate(tag, cr, readID)
	} else {
		err = c.writeLogin(tag, cr, readID)
	}
	if err == nil {
		err = c.w.Flush()
	}
	if err == nil {
		err = readID()
	}
	if err != nil {
		return LoginResult{}, err
	}
	return c.loginAnswer(tag)
}

// method is the login method for cr: the Dialer's, or in "auto" PLAIN
// where the backend offers it; PLAIN whenever there is an authorization
// identity, which only SASL can carry.
func (c *Conn) method(cr *Credentials) string {
	method := c.d.LoginMethod
	if method == "" || method == "auto" {
		method = "login"
		if HasCap(c.preCaps, "AUTH=PLAIN") {
			method = "plain"
		}
	}
	if len(cr.Authzid) > 0 {
		method = "plain"
	}
	return method
}

// loginAnswer reads the login's tagged answer and, after an OK, the
// capabilities: from the answer, from an untagged CAPABILITY on the way,
// or asked for.
func (c *Conn) loginAnswer(tag string) (LoginResult, error) {
	var caps []string
	status, text, err := c.readTagged(tag, func(l []byte) {
		if cl := ParseCapLine(l); cl != nil {
			caps = cl
		}
	})
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return LoginResult{}, ErrLoginTimeout
		}
		return LoginResult{}, err
	}
	if status != "OK" {
		return LoginResult{Status: status, Text: text}, nil
	}
	if cc := ParseCapCode(text); cc != nil {
		caps = cc
	}
	if caps == nil {
		if caps, err = c.capability(); err != nil {
			return LoginResult{}, err
		}
	}
	c.postCaps = caps
	c.born = time.Now()
	return LoginResult{OK: true, Status: status, Text: text}, nil
}

// awaitContinuation reads up to a "+" continuation request.
func (c *Conn) awaitContinuation() error {
	line, lit, err := c.r.ReadLine()
	if err != nil {
		return err
	}
	if lit != nil || len(line) == 0 || line[0] != '+' {
		return ErrUnexpected
	}
	return nil
}

// PlainResponse is the base64 SASL PLAIN initial response for cr
// (RFC 4616): authzid NUL user NUL password.
func PlainResponse(cr *Credentials) []byte {
	raw := make([]byte, 0, len(cr.Authzid)+len(cr.User)+len(cr.Pass)+2)
	raw = append(raw, cr.Authzid...)
	raw = append(raw, 0)
	raw = append(raw, cr.User...)
	raw = append(raw, 0)
	raw = append(raw, cr.Pass...)
	out := make([]byte, base64.StdEncoding.EncodedLen(len(raw)))
	base64.StdEncoding.Encode(out, raw)
	clear(raw)
	return out
}
