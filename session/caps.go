package session

import (
	"strings"

	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/upstream"
)

// asciiEqualFold reports whether b begins with upper, ASCII letters of b
// folded to upper case.
func asciiEqualFold(b []byte, upper string) bool {
	for i := range len(upper) {
		c := b[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != upper[i] {
			return false
		}
	}
	return true
}

// filterCaps rewrites the capability list of a backend response the
// client sees after login (an untagged CAPABILITY response, or a
// [CAPABILITY] code in a status response) to what the proxy can relay,
// by the rule the login OK uses: the client then sees one list however it
// asks. Other lines are returned as they are.
func filterCaps(line []byte) []byte {
	l := imapwire.TrimEOL(line)
	const untagged = "* CAPABILITY "
	if len(l) >= len(untagged) && asciiEqualFold(l[:len(untagged)], untagged) {
		return []byte(untagged + postLoginCaps(strings.Fields(string(l[len(untagged):]))) + "\r\n")
	}
	list, at, ok := upstream.CutCapCode(l)
	if !ok {
		return line
	}
	out := make([]byte, 0, len(line)+16)
	out = append(out, l[:at]...)
	out = append(out, postLoginCaps(strings.Fields(string(list)))...)
	out = append(out, l[at+len(list):]...)
	return append(out, "\r\n"...)
}

// relayable reports whether a backend capability may be shown to the
// client. The proxy cannot relay a compressed stream (it must see command
// boundaries), does TLS and authentication itself, and cannot let a session
// drop back to the unauthenticated state under it.
func relayable(c string) bool {
	u := strings.ToUpper(c)
	switch {
	case strings.HasPrefix(u, "AUTH="),
		strings.HasPrefix(u, "COMPRESS="),
		u == "STARTTLS", u == "LOGINDISABLED", u == "SASL-IR",
		u == "LOGIN-REFERRALS", u == "UNAUTHENTICATE",
		u == "LITERAL+", u == "LITERAL-", u == "ID", u == "IMAP4REV1":
		return false
	}
	return true
}

// preLoginCaps builds the capability list the proxy announces before login
// from the backend's pre-login list.
func preLoginCaps(backend []string, startTLS, loginDisabled bool) string {
	var b strings.Builder
	b.WriteString("IMAP4rev1")
	for _, c := range backend {
		if relayable(c) {
			b.WriteByte(' ')
			b.WriteString(c)
		}
	}
	b.WriteString(" SASL-IR ID LITERAL+")
	if startTLS {
		b.WriteString(" STARTTLS")
	}
	if loginDisabled {
		b.WriteString(" LOGINDISABLED")
	} else {
		b.WriteString(" AUTH=PLAIN AUTH=LOGIN")
	}
	return b.String()
}

// postLoginCaps filters the backend's post-login capabilities. LITERAL+ and
// ID are relayed as the backend has them, since after login the backend
// answers those itself.
func postLoginCaps(backend []string) string {
	var b strings.Builder
	b.WriteString("IMAP4rev1")
	for _, c := range backend {
		u := strings.ToUpper(c)
		if relayable(c) || u == "LITERAL+" || u == "LITERAL-" || u == "ID" {
			b.WriteByte(' ')
			b.WriteString(c)
		}
	}
	return b.String()
}

func hasPrefixFold(b []byte, p string) bool {
	return len(b) >= len(p) && strings.EqualFold(string(b[:len(p)]), p)
}
