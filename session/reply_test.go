package session

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"strings"
	"testing"

	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/pool"
)

// A failure's class states the policy apart from the table, so that the
// table cannot drift from it unnoticed.
type failureClass int

const (
	clientSyntax  failureClass = iota // BAD, no code, the session goes on
	retryLater                        // [UNAVAILABLE]: NO while a command can fail, else BYE
	limitReached                      // [LIMIT] or [TOOBIG]: NO
	badCredential                     // [AUTHENTICATIONFAILED], [PRIVACYREQUIRED], [CANNOT]: NO
	sessionEnds                       // BYE
)

var failureClasses = map[error]failureClass{
	errSyntax:                 clientSyntax,
	imapwire.ErrLineTooLong:   clientSyntax,
	ErrTooManyClients:         retryLater,
	ErrOutOfFiles:             retryLater,
	pool.ErrFull:              retryLater,
	errNoBackend:              retryLater,
	errUnreachable:            retryLater,
	errBackendEnded:           retryLater,
	errBackendTimeout:         retryLater,
	ErrDrained:                retryLater,
	ErrKicked:                 retryLater,
	errUserLimit:              limitReached,
	errUserTooLong:            limitReached,
	errPassTooLong:            limitReached,
	imapwire.ErrLiteralTooBig: limitReached,
	errUserChars:              badCredential,
	errPassChars:              badCredential,
	errNeedTLS:                badCredential,
	errMechanism:              badCredential,
	imapwire.ErrNonSyncTooBig: sessionEnds,
	errPipelinedTLS:           sessionEnds,
	errTooManyBad:             sessionEnds,
	errTooManyFailures:        sessionEnds,
	errIdle:                   sessionEnds,
	errShutdown:               sessionEnds,
	errBackendLost:            sessionEnds,
}

// TestReplies walks the reply table and checks each entry against the
// NO/BAD/BYE policy of its failure's class and its phase.
func TestReplies(t *testing.T) {
	for k, st := range replies {
		name := k.err.Error() + " (" + k.phase.String() + ")"
		class, ok := failureClasses[k.err]
		if !ok {
			t.Errorf("%s: no class in failureClasses; say what kind of failure it is", name)
			continue
		}
		if st.Tag != "" {
			t.Errorf("%s: tagged %q in the table; replyTo tags it", name, st.Tag)
		}
		if st.Text == "" || strings.ContainsAny(st.Text, "\r\n\x00") {
			t.Errorf("%s: text %q, want one non-empty line", name, st.Text)
		}
		if k.phase == accepting && st.Type != imapwire.StatusBye {
			t.Errorf("%s: %s before the greeting, want BYE: there is no command to answer", name, st.Type)
		}
		switch class {
		case clientSyntax:
			if st.Type != imapwire.StatusBad || st.Code != "" {
				t.Errorf("%s: %s [%s], want BAD without a code", name, st.Type, st.Code)
			}
		case retryLater:
			want := imapwire.StatusNo
			if k.phase != preLogin {
				want = imapwire.StatusBye
			}
			if st.Type != want || st.Code != imapwire.CodeUnavailable {
				t.Errorf("%s: %s [%s], want %s [UNAVAILABLE]", name, st.Type, st.Code, want)
			}
		case limitReached:
			if st.Type != imapwire.StatusNo || st.Code != imapwire.CodeLimit && st.Code != imapwire.CodeTooBig {
				t.Errorf("%s: %s [%s], want NO [LIMIT] or NO [TOOBIG]", name, st.Type, st.Code)
			}
		case badCredential:
			if st.Type != imapwire.StatusNo || st.Code == "" {
				t.Errorf("%s: %s [%s], want NO with a code", name, st.Type, st.Code)
			}
		case sessionEnds:
			if st.Type != imapwire.StatusBye {
				t.Errorf("%s: %s, want BYE", name, st.Type)
			}
		}
	}
	// The example the policy is written for: a backend down is a login
	// that fails, and after login the session's end.
	for _, tt := range []struct {
		err   error
		phase phase
		want  string
	}{
		{errUnreachable, preLogin, "a NO [UNAVAILABLE] IMAP server unreachable, try again later\r\n"},
		{errBackendTimeout, loggedIn, "* BYE [UNAVAILABLE] IMAP server not responding\r\n"},
		{errUserLimit, preLogin, "a NO [LIMIT] Too many sessions for this user\r\n"},
		{errUserTooLong, preLogin, "a NO [LIMIT] User name too long (at most 7 bytes)\r\n"},
		{&imapwire.SyntaxError{Msg: "bad tag"}, loggedIn, "a BAD Error in IMAP command: bad tag\r\n"},
		{imapwire.ErrNonSyncTooBig, loggedIn, "* BYE [TOOBIG] Literal too big\r\n"},
		{ErrTooManyClients, accepting, "* BYE [UNAVAILABLE] Too many connections, try again later\r\n"},
		{ErrKicked, loggedIn, "* BYE [UNAVAILABLE] Session ended by the administrator, please reconnect\r\n"},
	} {
		var args []any
		if tt.err == errUserTooLong {
			args = []any{7}
		}
		if got := encodeStatus(t, replyTo(tt.err, tt.phase, "a", args...)); got != tt.want {
			t.Errorf("replyTo(%v, %s) = %q, want %q", tt.err, tt.phase, got, tt.want)
		}
	}
	if got, want := encodeStatus(t, refusal("a", "NO", []byte("\x01\x02"))), "a NO Authentication failed\r\n"; got != want {
		t.Errorf("refusal with no printable text = %q, want %q", got, want)
	}
	if got, want := encodeStatus(t, refusal("a", "BAD", []byte("[X] no\r\n* OK"))), "a BAD [X] no* OK\r\n"; got != want {
		t.Errorf("refusal = %q, want %q", got, want)
	}
}

func encodeStatus(t *testing.T, st imapwire.Status) string {
	t.Helper()
	var b strings.Builder
	w := imapwire.NewWriter(&b)
	enc := imapwire.Encoder{W: w}
	if err := enc.Status(st); err != nil {
		t.Fatal(err)
	}
	w.Flush()
	return b.String()
}

// TestReplyCoverage reads the session package: every sentinel of another
// package that the proxy uses must have a reply, and every replyTo call
// with a named failure and phase must find its entry.
func TestReplyCoverage(t *testing.T) {
	// The exported sentinels of our packages the proxy may meet, by
	// the name the source uses. One missing here fails the test below.
	exported := map[string]error{
		"imapwire.ErrLineTooLong":   imapwire.ErrLineTooLong,
		"imapwire.ErrLiteralTooBig": imapwire.ErrLiteralTooBig,
		"imapwire.ErrNonSyncTooBig": imapwire.ErrNonSyncTooBig,
		"imapwire.ErrSyncLiteral":   imapwire.ErrSyncLiteral,
		"pool.ErrFull":              pool.ErrFull,
	}
	// Package errors that never reach a client as a reply of their own.
	notReplies := map[string]bool{"imapwire.ErrSyncLiteral": true}
	for k := range replies {
		if name := errName(k.err, exported); strings.HasPrefix(name, "?") {
			t.Errorf("replies entry %q: not in proxyErrors", k.err)
		}
	}
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, ".", func(fi fs.FileInfo) bool { return !strings.HasSuffix(fi.Name(), "_test.go") }, 0)
	if err != nil {
		t.Fatal(err)
	}
	phases := map[string]phase{"accepting": accepting, "preLogin": preLogin, "loggedIn": loggedIn}
	calls := 0
	for _, f := range pkgs["session"].Files {
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.SelectorExpr:
				x, ok := n.X.(*ast.Ident)
				if !ok || (x.Name != "imapwire" && x.Name != "pool") || !strings.HasPrefix(n.Sel.Name, "Err") {
					return true
				}
				name := x.Name + "." + n.Sel.Name
				e, ok := exported[name]
				if !ok {
					t.Errorf("%s: %s is not in the test's list of sentinels; add it, and a reply for it", fset.Position(n.Pos()), name)
					return true
				}
				if notReplies[name] {
					return true
				}
				if !hasReply(e) {
					t.Errorf("%s: %s has no entry in replies", fset.Position(n.Pos()), name)
				}
			case *ast.CallExpr:
				fn, ok := n.Fun.(*ast.Ident)
				if !ok || fn.Name != "replyTo" || len(n.Args) < 2 {
					return true
				}
				ph, ok := n.Args[1].(*ast.Ident)
				if !ok {
					return true
				}
				key := exprName(n.Args[0])
				e, ok := proxyErrors[key]
				if !ok {
					e, ok = exported[key]
				}
				if !ok {
					if key != "err" && key != "se" {
						t.Errorf("%s: replyTo(%s, ...): add %s to proxyErrors", fset.Position(n.Pos()), key, key)
					}
					// A variable: the error is known at run time only.
					return true
				}
				calls++
				if _, ok := replies[replyKey{e, phases[ph.Name]}]; !ok {
					t.Errorf("%s: replyTo(%s, %s) has no entry in replies", fset.Position(n.Pos()), key, ph.Name)
				}
			}
			return true
		})
	}
	if calls < 20 {
		t.Errorf("found %d replyTo calls with a named failure; the source scan is broken", calls)
	}
}

func hasReply(e error) bool {
	for k := range replies {
		if k.err == e {
			return true
		}
	}
	return false
}

// errName is how the proxy's source names e.
func errName(e error, exported map[string]error) string {
	for name, x := range exported {
		if x == e {
			return name
		}
	}
	for name, x := range proxyErrors {
		if x == e {
			return name
		}
	}
	return "?" + e.Error()
}

var proxyErrors = map[string]error{
	"ErrTooManyClients": ErrTooManyClients, "ErrOutOfFiles": ErrOutOfFiles, "errNoBackend": errNoBackend,
	"errUnreachable": errUnreachable, "errBackendEnded": errBackendEnded, "errUserTooLong": errUserTooLong,
	"errPassTooLong": errPassTooLong, "errUserChars": errUserChars, "errPassChars": errPassChars,
	"errNeedTLS": errNeedTLS, "errMechanism": errMechanism, "errPipelinedTLS": errPipelinedTLS,
	"errSyntax": errSyntax, "errIdle": errIdle, "errShutdown": errShutdown,
	"errBackendTimeout": errBackendTimeout, "errBackendLost": errBackendLost, "ErrDrained": ErrDrained,
	"ErrKicked": ErrKicked, "errUserLimit": errUserLimit, "errTooManyBad": errTooManyBad,
	"errTooManyFailures": errTooManyFailures,
}

func exprName(e ast.Expr) string {
	switch e := e.(type) {
	case *ast.Ident:
		return e.Name
	case *ast.SelectorExpr:
		if x, ok := e.X.(*ast.Ident); ok {
			return x.Name + "." + e.Sel.Name
		}
	}
	return ""
}
