package session

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"syscall"

	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/pool"
)

// The replies of the proxy's own are imapwire.Status values, written by
// imapwire's Encoder; the codec holds the vocabulary (types, codes) and
// the one writer, which also keeps any text to one line. What the client
// is told about each failure is policy and lives here, in replies.

// phase is where in a session a failure happens; with the failure it
// decides the answer.
type phase uint8

const (
	// accepting: the connection is refused before its greeting. There
	// is no command to answer: the only word is BYE.
	accepting phase = iota
	// preLogin: from the greeting to the end of the login. A command
	// that fails gets NO (a response code says why) or BAD (its
	// syntax), and the client may try again; BYE ends the session.
	preLogin
	// loggedIn: relaying. A failure of the proxy or of the backend
	// connection ends the session with BYE; the client's own errors
	// are answered as before login.
	loggedIn
)

var phaseNames = [...]string{accepting: "accepting", preLogin: "pre-login", loggedIn: "logged-in"}

func (p phase) String() string { return phaseNames[p] }

// Failures the server hands to Refuse and Session.Evict.
var (
	// ErrTooManyClients: a client limit turned the connection away.
	ErrTooManyClients = errors.New("too many client connections")
	// ErrOutOfFiles: the process ran out of descriptors.
	ErrOutOfFiles = errors.New("out of file descriptors")
	// ErrDrained: the session's backend left the set or was drained.
	ErrDrained = errors.New("backend taken out of service")
	// ErrKicked: an operator ended the user's sessions.
	ErrKicked = errors.New("session ended by the administrator")
)

// Failures the proxy answers that no other package names.
var (
	errNoBackend      = errors.New("no backend available")
	errUnreachable    = errors.New("no backend reachable")
	errBackendEnded   = errors.New("backend ended the connection during login")
	errUserTooLong    = errors.New("user name too long")
	errPassTooLong    = errors.New("password too long")
	errUserChars      = errors.New("invalid characters in user name")
	errPassChars      = errors.New("invalid characters in password")
	errNeedTLS        = errors.New("login without TLS")
	errMechanism      = errors.New("unsupported authentication mechanism")
	errPipelinedTLS   = errors.New("data pipelined after STARTTLS")
	errSyntax         = errors.New("syntax error") // stands for any *imapwire.SyntaxError
	errIdle           = errors.New("client idle for too long")
	errShutdown       = errors.New("server shutting down")
	errBackendTimeout = errors.New("backend not responding")
	errBackendLost    = errors.New("backend connection lost")
)

type replyKey struct {
	err   error
	phase phase
}

// replies is the proxy's whole NO/BAD/BYE policy: what a client hears
// for each failure in each phase where it happens. A failure of the
// client's syntax is BAD; one the client may retry later (a backend
// down, a limit reached) is NO with a response code while a command can
// fail, and BYE when the session must end; a text with a verb takes the
// reply's arguments. TestReplies checks the policy entry by entry.
var replies = map[replyKey]imapwire.Status{
	{ErrTooManyClients, accepting}: {Type: imapwire.StatusBye, Code: imapwire.CodeUnavailable, Text: "Too many connections, try again later"},
	{ErrOutOfFiles, accepting}:     {Type: imapwire.StatusBye, Code: imapwire.CodeUnavailable, Text: "Server out of resources, try again later"},

	{ErrOutOfFiles, preLogin}:      {Type: imapwire.StatusNo, Code: imapwire.CodeUnavailable, Text: "Server out of resources, try again later"},
	{pool.ErrFull, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeUnavailable, Text: "Too many connections, try again later"},
	{errNoBackend, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeUnavailable, Text: "No IMAP server available, try again later"},
	{errUnreachable, preLogin}:     {Type: imapwire.StatusNo, Code: imapwire.CodeUnavailable, Text: "IMAP server unreachable, try again later"},
	{errBackendEnded, preLogin}:    {Type: imapwire.StatusNo, Code: imapwire.CodeUnavailable, Text: "IMAP server ended the connection during login"},
	{errUserLimit, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeLimit, Text: "Too many sessions for this user"},
	{errUserTooLong, preLogin}:     {Type: imapwire.StatusNo, Code: imapwire.CodeLimit, Text: "User name too long (at most %d bytes)"},
	{errPassTooLong, preLogin}:     {Type: imapwire.StatusNo, Code: imapwire.CodeLimit, Text: "Password too long (at most %d bytes)"},
	{errUserChars, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeAuthenticationFailed, Text: "Invalid characters in user name"},
	{errPassChars, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeAuthenticationFailed, Text: "Invalid characters in password"},
	{errNeedTLS, preLogin}:         {Type: imapwire.StatusNo, Code: imapwire.CodePrivacyRequired, Text: "Use STARTTLS or implicit TLS before %s"},
	{errMechanism, preLogin}:       {Type: imapwire.StatusNo, Code: imapwire.CodeCannot, Text: "Unsupported authentication mechanism"},
	{errPipelinedTLS, preLogin}:    {Type: imapwire.StatusBye, Text: "Pipelined data after STARTTLS"},
	{errTooManyBad, preLogin}:      {Type: imapwire.StatusBye, Text: "Too many invalid commands"},
	{errTooManyFailures, preLogin}: {Type: imapwire.StatusBye, Text: "Too many failed logins"},

	// The client's own errors and ends, before login and after alike.
	{errSyntax, preLogin}:                 {Type: imapwire.StatusBad, Text: "Error in IMAP command: %s"},
	{errSyntax, loggedIn}:                 {Type: imapwire.StatusBad, Text: "Error in IMAP command: %s"},
	{imapwire.ErrLineTooLong, preLogin}:   {Type: imapwire.StatusBad, Text: "Command line too long"},
	{imapwire.ErrLineTooLong, loggedIn}:   {Type: imapwire.StatusBad, Text: "Command line too long"},
	{imapwire.ErrLiteralTooBig, preLogin}: {Type: imapwire.StatusNo, Code: imapwire.CodeTooBig, Text: "Literal too big"},
	{imapwire.ErrLiteralTooBig, loggedIn}: {Type: imapwire.StatusNo, Code: imapwire.CodeTooBig, Text: "Literal too big"},
	{imapwire.ErrNonSyncTooBig, preLogin}: {Type: imapwire.StatusBye, Code: imapwire.CodeTooBig, Text: "Literal too big"},
	{imapwire.ErrNonSyncTooBig, loggedIn}: {Type: imapwire.StatusBye, Code: imapwire.CodeTooBig, Text: "Literal too big"},
	{errIdle, preLogin}:                   {Type: imapwire.StatusBye, Text: "Autologout; idle for too long"},
	{errIdle, loggedIn}:                   {Type: imapwire.StatusBye, Text: "Autologout; idle for too long"},
	{errShutdown, preLogin}:               {Type: imapwire.StatusBye, Text: "Server shutting down"},
	{errShutdown, loggedIn}:               {Type: imapwire.StatusBye, Text: "Server shutting down"},

	// After login the backend connection is the session.
	{errBackendTimeout, loggedIn}: {Type: imapwire.StatusBye, Code: imapwire.CodeUnavailable, Text: "IMAP server not responding"},
	{errBackendLost, loggedIn}:    {Type: imapwire.StatusBye, Text: "Connection to IMAP server lost"},
	{ErrDrained, loggedIn}:        {Type: imapwire.StatusBye, Code: imapwire.CodeUnavailable, Text: "IMAP server taken out of service, please reconnect"},
	{ErrKicked, loggedIn}:         {Type: imapwire.StatusBye, Code: imapwire.CodeUnavailable, Text: "Session ended by the administrator, please reconnect"},
}

// replyTo is the answer to err in phase ph: tagged with tag when it
// answers a command (NO, BAD; "" leaves it untagged), with args filling
// the verbs of its text. A *imapwire.SyntaxError is errSyntax with its
// message. A failure without an entry, which TestReplyCoverage keeps
// from happening, is answered as the server's bug.
func replyTo(err error, ph phase, tag string, args ...any) imapwire.Status {
	var se *imapwire.SyntaxError
	if errors.As(err, &se) {
		err, args = errSyntax, []any{se.Msg}
	}
	st, ok := lookupReply(err, ph)
	if !ok {
		st = imapwire.Status{Type: imapwire.StatusNo, Code: imapwire.CodeServerBug, Text: "Internal error"}
		if ph == accepting {
			st.Type = imapwire.StatusBye
		}
	}
	if len(args) > 0 {
		st.Text = fmt.Sprintf(st.Text, args...)
	}
	if st.Type != imapwire.StatusBye {
		st.Tag = tag
	}
	return st
}

// lookupReply finds the entry of err or of an error it wraps.
func lookupReply(err error, ph phase) (imapwire.Status, bool) {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if st, ok := replies[replyKey{e, ph}]; ok {
			return st, true
		}
	}
	return imapwire.Status{}, false
}

// Statuses of the proxy's own that answer no failure.
var (
	statusLogout = imapwire.Status{Type: imapwire.StatusBye, Text: "Logging out"}
	statusReused = imapwire.Status{Type: imapwire.StatusOK, Code: "XPROXYREUSE", Text: "IMAP connection reused by imapproxy"}
)

// okStatus is the tagged OK that completes a command.
func okStatus(tag, text string) imapwire.Status {
	return imapwire.Status{Tag: tag, Type: imapwire.StatusOK, Text: text}
}

// badStatus is the tagged BAD to a command the client got wrong; "" leaves it
// untagged.
func badStatus(tag, text string) imapwire.Status {
	return imapwire.Status{Tag: tag, Type: imapwire.StatusBad, Text: text}
}

// refusal is a backend's refusal of a login passed on: its status as NO
// unless it is BAD, and its text, response code and all, bounded.
func refusal(tag, status string, text []byte) imapwire.Status {
	typ := imapwire.StatusNo
	if status == "BAD" {
		typ = imapwire.StatusBad
	}
	return imapwire.Status{Tag: tag, Type: typ, Text: sanitizeText(text)}
}

// serverID is the proxy's answer to ID.
var serverID = [2]string{"name", "imapproxy"}

// untaggedLine is st as written, without tag and CRLF, for a log.
func untaggedLine(st imapwire.Status) string {
	var b strings.Builder
	w := imapwire.NewWriter(&b)
	st.Tag = ""
	enc := imapwire.Encoder{W: w}
	enc.Status(st)
	w.Flush()
	return strings.TrimSuffix(strings.TrimPrefix(b.String(), "* "), "\r\n")
}

// reply queues st for the client. Callers hold no lock before login (the
// session goroutine is the only writer), wmu after.
func (sess *Session) reply(st imapwire.Status) {
	enc := imapwire.Encoder{W: sess.w}
	enc.Status(st)
}

// Refuse answers a connection turned away before its greeting and
// closes it. A fresh socket takes a short line without blocking; the
// deadline is for the pathological case.
func Refuse(c net.Conn, err error) {
	w := imapwire.NewWriter(c)
	enc := imapwire.Encoder{W: w}
	c.SetWriteDeadline(time.Now().Add(time.Second))
	enc.Status(replyTo(err, accepting, ""))
	w.Flush()
	c.Close()
}

// OutOfFiles reports whether err is the process or the system running out
// of file descriptors: the proxy's trouble, not a backend's.
func OutOfFiles(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}
