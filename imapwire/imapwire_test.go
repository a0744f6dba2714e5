package imapwire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestReadLineLiterals(t *testing.T) {
	tests := []struct {
		name string
		line string
		want *Literal
		err  bool
	}{
		{"plain", "a NOOP\r\n", nil, false},
		{"sync", "a LOGIN {4}\r\n", &Literal{Size: 4}, false},
		{"nonsync", "a LOGIN {4+}\r\n", &Literal{Size: 4, NonSync: true}, false},
		{"literal-minus", "a LOGIN {4-}\r\n", &Literal{Size: 4}, false},
		{"binary", "* 1 FETCH (BINARY[] ~{10}\r\n", &Literal{Size: 10, Binary: true}, false},
		{"zero", "a X {0}\r\n", &Literal{Size: 0}, false},
		{"bare LF", "a X {3}\n", &Literal{Size: 3}, false},
		{"inside quotes", "a SEARCH SUBJECT \"x {5}\r\n", nil, false},
		{"after quotes", "a SEARCH SUBJECT \"x\" {5}\r\n", &Literal{Size: 5}, false},
		{"escaped quote", "a X \"a\\\"b\" {2}\r\n", &Literal{Size: 2}, false},
		{"huge", "a X {999999999999}\r\n", &Literal{Size: 999999999999}, false},
		{"overflow", "a X {99999999999999999999}\r\n", nil, true},
		{"19 digits overflow", "a X {9999999999999999999}\r\n", nil, true},
		{"negative", "a X {-5}\r\n", nil, true},
		{"empty", "a X {}\r\n", nil, true},
		{"letters", "a X {12a}\r\n", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReader(strings.NewReader(tt.line), 0)
			line, lit, err := r.ReadLine()
			if tt.err {
				var se *SyntaxError
				if !errors.As(err, &se) {
					t.Fatalf("ReadLine(%q) err = %v, want a SyntaxError", tt.line, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadLine(%q): %v", tt.line, err)
			}
			if string(line) != tt.line {
				t.Errorf("line = %q, want %q", line, tt.line)
			}
			if (lit == nil) != (tt.want == nil) || lit != nil && *lit != *tt.want {
				t.Errorf("ReadLine(%q) literal = %+v, want %+v", tt.line, lit, tt.want)
			}
		})
	}
}

func TestReadLineTooLong(t *testing.T) {
	long := "a " + strings.Repeat("x", 10000) + "\r\nb NOOP\r\n"
	r := NewReader(strings.NewReader(long), 5000)
	if _, _, err := r.ReadLine(); !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("first ReadLine err = %v, want ErrLineTooLong", err)
	}
	// The stream is back at a line boundary.
	line, _, err := r.ReadLine()
	if err != nil || string(line) != "b NOOP\r\n" {
		t.Fatalf("after a long line: %q, %v; want the next line", line, err)
	}
}

func TestReadLineLongWithinLimit(t *testing.T) {
	// Longer than the bufio buffer but within the limit (a 32 KiB ID).
	long := "a ID (" + strings.Repeat("\"k\" \"v\" ", 4000) + ")\r\n"
	r := NewReader(strings.NewReader(long), DefaultMaxLine)
	line, _, err := r.ReadLine()
	if err != nil || string(line) != long {
		t.Fatalf("ReadLine: len %d err %v, want the whole %d-byte line", len(line), err, len(long))
	}
}

func TestReadLineEOF(t *testing.T) {
	r := NewReader(strings.NewReader("a NOOP"), 0)
	if _, _, err := r.ReadLine(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("unterminated line: err = %v, want ErrUnexpectedEOF", err)
	}
	r = NewReader(strings.NewReader(""), 0)
	if _, _, err := r.ReadLine(); err != io.EOF {
		t.Fatalf("empty stream: err = %v, want EOF", err)
	}
}

func TestCopyLiteral(t *testing.T) {
	body := strings.Repeat("0123456789", 1000)
	src := "* 1 FETCH (BODY[] {10000}\r\n" + body + ")\r\n"
	r := NewReader(strings.NewReader(src), 0)
	_, lit, err := r.ReadLine()
	if err != nil || lit == nil {
		t.Fatalf("ReadLine: %v %v", lit, err)
	}
	var out bytes.Buffer
	n, err := r.CopyLiteral(&out, lit.Size, nil)
	if err != nil || n != lit.Size || out.String() != body {
		t.Fatalf("CopyLiteral = %d, %v; body equal %v", n, err, out.String() == body)
	}
	line, lit, err := r.ReadLine()
	if err != nil || string(line) != ")\r\n" || lit != nil {
		t.Fatalf("continuation = %q %v %v", line, lit, err)
	}
}

func TestReadCommand(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		tag   string
		cmd   string
		args  []string // String tokens as their value, atoms prefixed with "atom:", lists as ( )
		err   string   // substring of the error
		conts int      // continuation requests expected
	}{
		{name: "noop", in: "a1 NOOP\r\n", tag: "a1", cmd: "NOOP"},
		{name: "lowercase", in: "a1 login bob secret\r\n", tag: "a1", cmd: "LOGIN", args: []string{"atom:bob", "atom:secret"}},
		{name: "quoted", in: "a LOGIN \"bob\" \"se\\\"c ret\"\r\n", tag: "a", cmd: "LOGIN", args: []string{"bob", "se\"c ret"}},
		{name: "sync literal", in: "a LOGIN {3}\r\nbob {6}\r\nsecret\r\n", tag: "a", cmd: "LOGIN", args: []string{"bob", "secret"}, conts: 2},
		{name: "nonsync literal", in: "a LOGIN {3+}\r\nbob {2+}\r\n\x00x\r\n", tag: "a", cmd: "LOGIN", args: []string{"bob", "\x00x"}},
		{name: "id list", in: "a ID (\"name\" \"x\" \"version\" NIL)\r\n", tag: "a", cmd: "ID", args: []string{"(", "name", "x", "version", "atom:NIL", ")"}},
		{name: "literal in list", in: "a ID (\"name\" {2}\r\nab)\r\n", tag: "a", cmd: "ID", args: []string{"(", "name", "ab", ")"}, conts: 1},
		{name: "no tag", in: " NOOP\r\n", err: "bad tag"},
		{name: "bad tag char", in: "a{ NOOP\r\n", err: "bad tag"},
		{name: "tag only", in: "abc\r\n", err: "bad tag"},
		{name: "no command", in: "a \r\n", tag: "a", err: "missing command"},
		{name: "unterminated quote", in: "a LOGIN \"bob\r\n", tag: "a", err: "unterminated"},
		{name: "bad escape", in: "a LOGIN \"b\\ob\" x\r\n", tag: "a", err: "escape"},
		{name: "nul in quoted", in: "a LOGIN \"b\x00\" x\r\n", tag: "a", err: "bad character"},
		{name: "too big sync", in: "a LOGIN {99999}\r\n", tag: "a", err: "literal too big"},
		{name: "too big nonsync", in: "a LOGIN {99999+}\r\n", tag: "a", err: "non-synchronising"},
		{name: "missing space after literal", in: "a LOGIN {3}\r\nbobx\r\n", tag: "a", err: "missing space", conts: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conts := 0
			d := &Decoder{R: NewReader(strings.NewReader(tt.in), 0), MaxLiteral: 1024, Continue: func() error { conts++; return nil }}
			cmd, err := d.ReadCommand()
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ReadCommand(%q) err = %v, want %q", tt.in, err, tt.err)
				}
				if cmd != nil && cmd.Tag != tt.tag {
					t.Errorf("tag on error = %q, want %q", cmd.Tag, tt.tag)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadCommand(%q): %v", tt.in, err)
			}
			if cmd.Tag != tt.tag || cmd.Name != tt.cmd {
				t.Errorf("ReadCommand(%q) = %q %q, want %q %q", tt.in, cmd.Tag, cmd.Name, tt.tag, tt.cmd)
			}
			var got []string
			for _, a := range cmd.Args {
				switch a.Kind {
				case Atom:
					got = append(got, "atom:"+string(a.Value))
				case String:
					got = append(got, string(a.Value))
				case ListStart:
					got = append(got, "(")
				case ListEnd:
					got = append(got, ")")
				}
			}
			if strings.Join(got, "|") != strings.Join(tt.args, "|") {
				t.Errorf("args = %q, want %q", got, tt.args)
			}
			if conts != tt.conts {
				t.Errorf("continuations = %d, want %d", conts, tt.conts)
			}
		})
	}
}

func TestReadCommandRecovers(t *testing.T) {
	// After a syntax error with a non-synchronising literal, the literal is
	// skipped and the next command reads cleanly.
	in := "a LOGIN \"x {3+}\r\n" + "b NOOP\r\n" + "c LOGIN \"a\\qb\" {2+}\r\nxy\r\nd NOOP\r\n"
	d := &Decoder{R: NewReader(strings.NewReader(in), 0), MaxLiteral: 100}
	if _, err := d.ReadCommand(); err == nil {
		t.Fatal("want a syntax error for an unterminated quote")
	}
	cmd, err := d.ReadCommand()
	if err != nil || cmd.Tag != "b" {
		t.Fatalf("next command = %+v, %v; want tag b", cmd, err)
	}
	if _, err := d.ReadCommand(); err == nil {
		t.Fatal("want an error for the malformed command c")
	}
	cmd, err = d.ReadCommand()
	if err != nil || cmd.Tag != "d" {
		t.Fatalf("after skipped literal: %+v, %v; want tag d", cmd, err)
	}
}

func TestAppendAString(t *testing.T) {
	tests := []struct {
		in   string
		want string
		ok   bool
	}{
		{"bob", "bob", true},
		{"", `""`, true},
		{"NIL", `"NIL"`, true},
		{"a b", `"a b"`, true},
		{`a"b\c`, `"a\"b\\c"`, true},
		{"a(b", `"a(b"`, true},
		{"pä", "", false},
		{"a\r\nb", "", false},
		{"a\x00", "", false},
	}
	for _, tt := range tests {
		got, ok := AppendAString(nil, []byte(tt.in))
		if string(got) != tt.want || ok != tt.ok {
			t.Errorf("AppendAString(%q) = %q, %v; want %q, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
}

func TestRoundTripAString(t *testing.T) {
	for _, s := range []string{"bob", "a b", `q"uote`, `back\slash`, "NIL", ""} {
		enc, ok := AppendAString([]byte("t LOGIN "), []byte(s))
		if !ok {
			t.Fatalf("AppendAString(%q) needs a literal", s)
		}
		enc = append(enc, " x\r\n"...)
		d := &Decoder{R: NewReader(bytes.NewReader(enc), 0), MaxLiteral: 10}
		cmd, err := d.ReadCommand()
		if err != nil || len(cmd.Args) != 2 || string(cmd.Args[0].Value) != s {
			t.Errorf("decode(encode(%q)) = %+v, %v", s, cmd, err)
		}
	}
}

// TestReadPartLongLines reads server lines far longer than the buffer,
// as a SEARCH of a large mailbox or an ENVELOPE of thousands of
// addresses sends, with quoted strings holding braces and escaped quotes
// across part boundaries: the parts must make up the line and the literal
// at its end be found exactly when it is outside quotes.
func TestReadPartLongLines(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	pieces := []string{" 12345", ` "a {5}"`, ` "x\"y"`, ` "\\"`, " {", "}", " NIL", ` "` + strings.Repeat("z", 700) + `"`}
	for i := 0; i < 500; i++ {
		var b strings.Builder
		b.WriteString("* SEARCH")
		for n := 4000 + rnd.IntN(30000); b.Len() < n; {
			b.WriteString(pieces[rnd.IntN(len(pieces))])
		}
		switch rnd.IntN(3) {
		case 0:
			b.WriteString(" {3}\r\nabc)\r\n")
		case 1:
			b.WriteString(` "q {3}`) // inside quotes: no literal
			b.WriteString("\"\r\n")
		default:
			b.WriteString("\r\n")
		}
		stream := b.String() + "a OK done\r\n"
		whole := NewReader(strings.NewReader(stream), len(stream))
		want, wlit, werr := whole.ReadLine()
		r := NewReader(strings.NewReader(stream), 0)
		var got []byte
		nparts := 0
		for {
			p, more, lit, err := r.ReadPart()
			if err != nil {
				t.Fatalf("case %d: ReadPart: %v", i, err)
			}
			nparts++
			got = append(got, p...)
			if !more {
				if (lit == nil) != (wlit == nil) || lit != nil && *lit != *wlit {
					t.Fatalf("case %d: literal %+v, want %+v (%v)", i, lit, wlit, werr)
				}
				if lit != nil {
					r.DiscardLiteral(lit.Size)
					whole.DiscardLiteral(lit.Size)
				}
				break
			}
			if len(p) > bufSize {
				t.Fatalf("case %d: part of %d bytes, buffer %d", i, len(p), bufSize)
			}
		}
		if nparts < 2 {
			t.Fatalf("case %d: a %d-byte line came in %d part", i, len(want), nparts)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("case %d: parts differ from the line", i)
		}
		// The stream goes on framed: the parts reader reads on as the
		// whole reader does.
		next, _, _, err := r.ReadPart()
		if wlit != nil && err == nil && string(next) == ")\r\n" {
			next, _, _, err = r.ReadPart()
		}
		if err != nil || string(next) != "a OK done\r\n" {
			t.Fatalf("case %d: after the long line: %q, %v", i, next, err)
		}
	}
}

// TestReadCommandBounded: a command may not be stretched past MaxCommand
// bytes or its command's argument count by chaining pieces with literals;
// each case is refused with a syntax error carrying the tag, before any
// literal over the bound is asked for or read, and the stream is left at
// the next command.
func TestReadCommandBounded(t *testing.T) {
	argLimit := func(name string) int {
		switch name {
		case "LOGIN":
			return 2
		case "ID":
			return 62
		}
		return 0
	}
	chain := func(name string, n int, piece string) string {
		var b strings.Builder
		b.WriteString("a " + name)
		for range n {
			b.WriteString(" " + piece + " {0+}\r\n")
		}
		return b.String() + "\r\n"
	}
	// RFC 2971's largest ID: 30 pairs of a 30-byte key and a 1024-byte
	// value, about 31 KiB.
	var id strings.Builder
	id.WriteString("a ID (")
	for i := range 30 {
		if i > 0 {
			id.WriteByte(' ')
		}
		fmt.Fprintf(&id, "\"%030d\" \"%s\"", i, strings.Repeat("v", 1024))
	}
	id.WriteString(")\r\n")
	tests := []struct {
		name    string
		in      string
		err     string // "" for success
		conts   int
		nargs   int
		readAll bool // the input is consumed up to the next command
	}{
		{name: "largest ID", in: id.String(), nargs: 62},
		{name: "chain of empty literals", in: chain("LOGIN", 100, strings.Repeat("x", 300)), err: "too many arguments"},
		{name: "long chain within the args", in: "a ID (\"k\" {0+}\r\n" + strings.Repeat(" \"k\" {0+}\r\n", 29) + ")\r\n", nargs: 62},
		{name: "chain past MaxCommand", in: "a ID (\"k\" {1100+}\r\n" + strings.Repeat("v", 1100) + strings.Repeat(" \"k\" {1100+}\r\n"+strings.Repeat("v", 1100), 29) + ")\r\n", err: "command too long"},
		{name: "literal past MaxCommand", in: "a LOGIN {35000}\r\n", err: "command too long"},
		{name: "one line past MaxCommand", in: "a LOGIN " + strings.Repeat("x", 40000) + " y\r\n", err: "command too long"},
		{name: "literal on an argument-less command", in: "a NOOP {5}\r\n", err: "too many arguments"},
		{name: "non-sync literal on an argument-less command", in: "a NOOP {5+}\r\nb NOO\r\n", err: "too many arguments"},
		{name: "LOGIN with three arguments", in: "a LOGIN x y z\r\n", err: "too many arguments"},
		{name: "LOGIN with a third literal", in: "a LOGIN x y {3}\r\n", err: "too many arguments"},
		{name: "LOGIN with literals", in: "a LOGIN {3}\r\nbob {6}\r\nsecret\r\n", conts: 2, nargs: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conts := 0
			d := &Decoder{
				R:          NewReader(strings.NewReader(tt.in+"z NOOP\r\n"), 0),
				MaxLiteral: 40000,
				MaxCommand: 32 * 1024,
				ArgLimit:   argLimit,
				Continue:   func() error { conts++; return nil },
			}
			cmd, err := d.ReadCommand()
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				if cmd == nil || cmd.Tag != "a" {
					t.Errorf("command on error = %+v, want tag a", cmd)
				}
			} else {
				if err != nil {
					t.Fatalf("ReadCommand: %v", err)
				}
				if len(cmd.Args) != tt.nargs {
					t.Errorf("%d args, want %d", len(cmd.Args), tt.nargs)
				}
			}
			if conts != tt.conts {
				t.Errorf("continuations = %d, want %d", conts, tt.conts)
			}
			// A synchronising literal refused is never sent; the stream
			// goes on with the next line.
			for {
				next, err := d.ReadCommand()
				if err == nil && next.Tag == "z" {
					break
				}
				if err == io.EOF {
					t.Fatal("the next command was lost")
				}
			}
		})
	}
}
