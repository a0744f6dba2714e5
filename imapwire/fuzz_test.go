package imapwire

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"strings"
)

// FuzzReadCommand feeds the pre-login command decoder arbitrary client
// input. It must never panic, never hand out more than its limits, and
// always either decode a command or return an error.
func FuzzReadCommand(f *testing.F) {
	for _, s := range []string{
		"a LOGIN bob secret\r\n",
		"a LOGIN {3}\r\nbob {6+}\r\nsecret\r\n",
		"a ID (\"name\" \"x\" \"version\" NIL)\r\n",
		"a AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=\r\n",
		"a LOGIN \"x {3+}\r\nb NOOP\r\n",
		"a LOGIN {999999999999}\r\n",
		"\x00\r\n\r\n",
		"a X ~{3}\r\nabc\r\n",
	} {
		f.Add([]byte(s))
	}
	const maxLine, maxLit, maxCmd = 256, 64, 512
	f.Fuzz(func(t *testing.T, in []byte) {
		d := &Decoder{R: NewReader(bytes.NewReader(in), maxLine), MaxLiteral: maxLit, MaxArgs: 32, MaxCommand: maxCmd}
		for i := 0; i < 64; i++ {
			cmd, err := d.ReadCommand()
			if err == nil {
				if cmd.Tag == "" || cmd.Name == "" {
					t.Fatalf("decoded command without tag or name: %+v", cmd)
				}
				if len(cmd.Args) > 32 {
					t.Fatalf("%d args, limit 32", len(cmd.Args))
				}
				held := 0
				for _, a := range cmd.Args {
					if len(a.Value) > maxLine && len(a.Value) > maxLit {
						t.Fatalf("token of %d bytes exceeds limits", len(a.Value))
					}
					held += len(a.Value)
				}
				if held > maxCmd {
					t.Fatalf("command holds %d bytes, limit %d", held, maxCmd)
				}
				continue
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ErrNonSyncTooBig) {
				return
			}
			var se *SyntaxError
			if !errors.As(err, &se) && !errors.Is(err, ErrLineTooLong) && !errors.Is(err, ErrLiteralTooBig) {
				t.Fatalf("unexpected error type %T: %v", err, err)
			}
		}
	})
}

// FuzzReadResponse frames a hostile backend's output the way the relay
// does: lines and literals. Framing must consume the input exactly or
// fail, never panic or over-read.
func FuzzReadResponse(f *testing.F) {
	for _, s := range []string{
		"* OK [CAPABILITY IMAP4rev1] ready\r\n",
		"* 1 FETCH (BODY[] {5}\r\nhello)\r\na OK done\r\n",
		"* 1 FETCH (BINARY[] ~{3}\r\n\x00\x01\x02)\r\n",
		"+ idling\r\n",
		"* 1 FETCH (BODY[] {99999999999}\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r := NewReader(bytes.NewReader(in), 512)
		var total int64
		for i := 0; i < 256; i++ {
			line, lit, err := r.ReadLine()
			if err != nil {
				return
			}
			total += int64(len(line))
			if lit != nil {
				if lit.Size < 0 {
					t.Fatalf("negative literal size %d", lit.Size)
				}
				n, err := r.CopyLiteral(io.Discard, lit.Size, nil)
				total += n
				if err != nil {
					return
				}
			}
			if total > int64(len(in)) {
				t.Fatalf("read %d bytes from %d of input", total, len(in))
			}
		}
	})
}

// FuzzReadPart checks that a line read in parts frames the stream exactly
// as the whole line would: the parts make up the line, and the literal at
// its end (or none) is the one ReadLine finds with no length limit. The
// input is placed behind filler so that its bytes straddle the boundary
// of the reader's buffer, where the quoting state and the tail must carry
// over from one part to the next.
func FuzzReadPart(f *testing.F) {
	for _, s := range []string{
		"* 1 FETCH (ENVELOPE (\"a {5}\" NIL) BODY[] {5}\r\nhello)\r\n",
		"\" \\\" {3}\r\nabc\r\n",
		"* SEARCH 1 2 3 ~{2}\r\nxy\r\n",
		"x\\\"{3+}\r\n",
		// A brace group too long for a literal length, opened before
		// the last bytes a part reader keeps: an error either way.
		"a {" + strings.Repeat("9", 40) + "}\r\n",
		"a {" + strings.Repeat("x", 40) + "+}\r\n",
		// Opened inside a quoted string: text either way.
		"a \"{" + strings.Repeat("9", 40) + "\" }\r\n",
		"a \"{\" " + strings.Repeat("9", 40) + "}\r\n",
		// An earlier brace outside quotes, the last one inside.
		"{ \"{" + strings.Repeat("9", 40) + "\"}\r\n",
	} {
		f.Add(uint16(10), []byte(s))
	}
	f.Fuzz(func(t *testing.T, shift uint16, in []byte) {
		pad := bufSize - 8 + int(shift%64)
		stream := append(bytes.Repeat([]byte{'x'}, pad), in...)
		whole := NewReader(bytes.NewReader(stream), len(stream)+1)
		parts := NewReader(bytes.NewReader(stream), 0)
		for i := 0; i < 64; i++ {
			want, wlit, werr := whole.ReadLine()
			var got []byte
			var glit *Literal
			var gerr error
			for {
				p, more, lit, err := parts.ReadPart()
				got = append(got, p...)
				if err != nil || !more {
					glit, gerr = lit, err
					break
				}
			}
			if (werr == nil) != (gerr == nil) {
				t.Fatalf("line %d: ReadLine err %v, ReadPart err %v", i, werr, gerr)
			}
			if werr != nil {
				return
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("line %d: parts %q, line %q", i, got, want)
			}
			if (wlit == nil) != (glit == nil) || wlit != nil && *wlit != *glit {
				t.Fatalf("line %d %q: literal %+v by parts, %+v whole", i, want, glit, wlit)
			}
			if wlit == nil {
				continue
			}
			if whole.DiscardLiteral(wlit.Size) != nil || parts.DiscardLiteral(wlit.Size) != nil {
				return
			}
		}
	})
}
