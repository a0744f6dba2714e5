package imapwire

import (
	"bytes"
	"errors"
)

// TokenKind tells the lexical class of a command argument.
type TokenKind int

const (
	Atom      TokenKind = iota // includes NIL, numbers and sequence sets
	String                     // a quoted string or a literal, decoded
	ListStart                  // (
	ListEnd                    // )
)

// Token is one argument of a decoded command. Value aliases no reader
// buffer: it stays valid after the next read.
type Token struct {
	Kind  TokenKind
	Value []byte
}

// Command is a decoded client command.
type Command struct {
	Tag  string
	Name string // upper case
	Args []Token
}

// Decoder decodes whole client commands, literals included. It is meant
// for the few commands the proxy answers itself before login; after login
// traffic is relayed line by line.
type Decoder struct {
	R *Reader
	// MaxLiteral bounds each literal; a larger one fails with
	// ErrLiteralTooBig before any of it is read.
	MaxLiteral int
	// MaxArgs bounds the number of tokens in one command.
	MaxArgs int
	// ArgLimit, if set, bounds the tokens of the command it names (upper
	// case) instead of MaxArgs, so that a command of a known shape cannot
	// be stretched into a chain of pieces.
	ArgLimit func(name string) int
	// MaxCommand, if positive, bounds the bytes of one whole command:
	// its lines and literals together. A literal that would go over it is
	// refused before any of it is read.
	MaxCommand int
	// Continue is called before reading a synchronising literal, to send
	// the "+" continuation request.
	Continue func() error
}

// ErrNonSyncTooBig means a {n+} literal over the limit is on its way and
// cannot be refused: the connection must end.
var ErrNonSyncTooBig = errors.New("imapwire: non-synchronising literal too big")

// ReadCommand reads and decodes one command. When the error is a
// *SyntaxError or ErrLiteralTooBig and the tag could be read, the returned
// command carries the tag so the caller can answer with a tagged BAD or NO;
// the rest of the command has then been consumed up to a line boundary,
// unless the error is ErrNonSyncTooBig.
func (d *Decoder) ReadCommand() (*Command, error) {
	line, lit, err := d.R.ReadLine()
	if err != nil {
		return nil, err
	}
	cmd := &Command{}
	p := TrimEOL(line)
	tag, rest, ok := cutTag(p)
	if !ok {
		return cmd, d.fail(lit, syntaxErrorf("bad tag"))
	}
	cmd.Tag = string(tag)
	name, rest := cutAtom(rest)
	if len(name) == 0 {
		return cmd, d.fail(lit, syntaxErrorf("missing command"))
	}
	cmd.Name = string(bytes.ToUpper(name))
	maxArgs := d.maxArgs(cmd.Name)
	size := int64(len(line))
	// rest either is empty or begins with SP.
	for {
		if d.MaxCommand > 0 && size > int64(d.MaxCommand) {
			return cmd, d.fail(lit, syntaxErrorf("command too long"))
		}
		rest, err = d.lexPiece(cmd, rest, lit != nil, maxArgs)
		if err != nil {
			return cmd, d.fail(lit, err)
		}
		if lit == nil {
			return cmd, nil
		}
		if err := d.admitLiteral(cmd, lit, size, maxArgs); err != nil {
			return cmd, err
		}
		if !lit.NonSync && d.Continue != nil {
			if err := d.Continue(); err != nil {
				return cmd, err
			}
		}
		b, err := d.R.ReadLiteral(lit.Size, d.MaxLiteral)
		if err != nil {
			return cmd, err
		}
		cmd.Args = append(cmd.Args, Token{Kind: String, Value: b})
		line, lit, err = d.R.ReadLine()
		if err != nil {
			return cmd, err
		}
		size += int64(len(b)) + int64(len(line))
		rest = TrimEOL(line)
		// After a literal the next token follows directly (SP or ')').
		if len(rest) > 0 && rest[0] != ' ' && rest[0] != ')' {
			return cmd, d.fail(lit, syntaxErrorf("missing space after literal"))
		}
	}
}

// maxArgs bounds the tokens of the command name: ArgLimit does, or
// MaxArgs (256 when unset).
func (d *Decoder) maxArgs(name string) int {
	if d.ArgLimit != nil {
		return d.ArgLimit(name)
	}
	if d.MaxArgs <= 0 {
		return 256
	}
	return d.MaxArgs
}

// admitLiteral refuses lit, which follows size bytes of cmd, before it is
// read, and before a "+" asks for it.
func (d *Decoder) admitLiteral(cmd *Command, lit *Literal, size int64, maxArgs int) error {
	if len(cmd.Args) >= maxArgs {
		return d.fail(lit, syntaxErrorf("too many arguments"))
	}
	if d.MaxCommand > 0 && size+lit.Size > int64(d.MaxCommand) && lit.Size <= int64(d.MaxLiteral) {
		return d.fail(lit, syntaxErrorf("command too long"))
	}
	if lit.Size > int64(d.MaxLiteral) {
		if lit.NonSync {
			return ErrNonSyncTooBig
		}
		return ErrLiteralTooBig
	}
	return nil
}

// fail turns a syntax error into one the caller can answer, consuming an
// announced literal when that is safe.
func (d *Decoder) fail(lit *Literal, err error) error {
	if lit == nil {
		return err
	}
	if !lit.NonSync {
		// The client waits for "+" that never comes; the BAD ends the
		// command for it.
		return err
	}
	if lit.Size > int64(d.MaxLiteral) {
		return ErrNonSyncTooBig
	}
	if derr := d.R.DiscardLiteral(lit.Size); derr != nil {
		return derr
	}
	// The command continues after the literal; skip to its end.
	for {
		_, l, rerr := d.R.ReadLine()
		if rerr != nil {
			return rerr
		}
		if l == nil {
			return err
		}
		if !l.NonSync || l.Size > int64(d.MaxLiteral) {
			return ErrNonSyncTooBig
		}
		if derr := d.R.DiscardLiteral(l.Size); derr != nil {
			return derr
		}
	}
}

// lexPiece tokenises one line piece. If the piece ends in a literal
// announcement (hasLit), the trailing "{n}" is not a token.
func (d *Decoder) lexPiece(cmd *Command, p []byte, hasLit bool, maxArgs int) ([]byte, error) {
	if hasLit {
		open := bytes.LastIndexByte(p, '{')
		if open > 0 && p[open-1] == '~' {
			open--
		}
		p = p[:open]
	}
	for len(p) > 0 {
		switch p[0] {
		case ' ':
			p = p[1:]
			if len(p) == 0 && !hasLit {
				return nil, syntaxErrorf("trailing space")
			}
			continue
		case '(':
			cmd.Args = append(cmd.Args, Token{Kind: ListStart})
			p = p[1:]
		case ')':
			cmd.Args = append(cmd.Args, Token{Kind: ListEnd})
			p = p[1:]
		case '"':
			s, rest, err := cutQuoted(p)
			if err != nil {
				return nil, err
			}
			cmd.Args = append(cmd.Args, Token{Kind: String, Value: s})
			p = rest
		default:
			a, rest := cutAtom(p)
			if len(a) == 0 {
				return nil, syntaxErrorf("unexpected character %q", p[0])
			}
			cmd.Args = append(cmd.Args, Token{Kind: Atom, Value: bytes.Clone(a)})
			p = rest
		}
		if len(cmd.Args) > maxArgs {
			return nil, syntaxErrorf("too many arguments")
		}
	}
	return p, nil
}

// cutQuoted decodes a quoted string at the start of p.
func cutQuoted(p []byte) (s, rest []byte, err error) {
	out := make([]byte, 0, len(p))
	for i := 1; i < len(p); i++ {
		switch c := p[i]; c {
		case '"':
			return out, p[i+1:], nil
		case '\\':
			i++
			if i == len(p) || (p[i] != '\\' && p[i] != '"') {
				return nil, nil, syntaxErrorf("bad escape in quoted string")
			}
			out = append(out, p[i])
		case 0, '\r', '\n':
			return nil, nil, syntaxErrorf("bad character in quoted string")
		default:
			out = append(out, c)
		}
	}
	return nil, nil, syntaxErrorf("unterminated quoted string")
}

// cutTag splits a tag off the start of a command line.
func cutTag(p []byte) (tag, rest []byte, ok bool) {
	i := 0
	for i < len(p) && IsTagChar(p[i]) {
		i++
	}
	if i == 0 || i == len(p) || p[i] != ' ' {
		return nil, nil, false
	}
	return p[:i], p[i+1:], true
}

// CutTag splits "TAG SP rest" and reports whether a valid tag was found.
func CutTag(line []byte) (tag, rest []byte, ok bool) { return cutTag(TrimEOL(line)) }

// CutAtom splits off the atom at the start of p (after one optional SP).
func CutAtom(p []byte) (atom, rest []byte) { return cutAtom(p) }

func cutAtom(p []byte) (atom, rest []byte) {
	if len(p) > 0 && p[0] == ' ' {
		p = p[1:]
	}
	i := 0
	for i < len(p) && isAtomChar(p[i]) {
		i++
	}
	return p[:i], p[i:]
}

// IsTagChar reports whether c may appear in a tag: an ATOM-CHAR other
// than "+". RFC 3501 also allows "]", but Dovecot refuses a tag with it
// (an untagged "* BAD Error in IMAP tag" that answers no command), and a
// relay that passed one on would wait for an answer that never comes.
func IsTagChar(c byte) bool { return isAtomChar(c) && c != '+' }

// isAtomChar reports whether c is an ATOM-CHAR (RFC 3501).
func isAtomChar(c byte) bool {
	if c <= ' ' || c >= 0x7f {
		return false
	}
	switch c {
	case '(', ')', '{', '%', '*', '"', '\\', ']':
		return false
	}
	return true
}
