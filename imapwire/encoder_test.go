package imapwire

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func encode(t *testing.T, litPlus bool, f func(enc *Encoder) error) (string, int) {
	t.Helper()
	var out bytes.Buffer
	w := NewWriter(&out)
	conts := 0
	enc := &Encoder{W: w, LiteralPlus: litPlus, Continue: func() error { conts++; return nil }}
	if err := f(enc); err != nil {
		t.Fatalf("encode: %v", err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return out.String(), conts
}

func TestEncoder(t *testing.T) {
	tests := []struct {
		name    string
		litPlus bool
		enc     func(enc *Encoder) error
		want    string
		conts   int
	}{
		{"login atoms", false, func(e *Encoder) error {
			return e.Atom("a1").SP().Atom("LOGIN").SP().AString([]byte("bob")).SP().AString([]byte("secret")).CRLF()
		}, "a1 LOGIN bob secret\r\n", 0},
		{"login quoted", false, func(e *Encoder) error {
			return e.Atom("a1").SP().Atom("LOGIN").SP().AString([]byte("bob smith")).SP().AString([]byte(`p"a\ss`)).CRLF()
		}, "a1 LOGIN \"bob smith\" \"p\\\"a\\\\ss\"\r\n", 0},
		{"empty and NIL are quoted", false, func(e *Encoder) error {
			return e.AString(nil).SP().AString([]byte("nil")).CRLF()
		}, "\"\" \"nil\"\r\n", 0},
		{"login literal plus", true, func(e *Encoder) error {
			return e.Atom("a1").SP().Atom("LOGIN").SP().AString([]byte("bob")).SP().AString([]byte("p\x00\r\n")).CRLF()
		}, "a1 LOGIN bob {4+}\r\np\x00\r\n\r\n", 0},
		{"login synchronising literals", false, func(e *Encoder) error {
			return e.Atom("a1").SP().Atom("LOGIN").SP().AString([]byte("b\xc3\xb6b")).SP().AString([]byte("p\n")).CRLF()
		}, "a1 LOGIN {4}\r\nb\xc3\xb6b {2}\r\np\n\r\n", 2},
		{"authenticate plain with SASL-IR", false, func(e *Encoder) error {
			return e.Atom("a2").SP().Atom("AUTHENTICATE").SP().Atom("PLAIN").SP().Atom("AGJvYgBzZWNyZXQ=").CRLF()
		}, "a2 AUTHENTICATE PLAIN AGJvYgBzZWNyZXQ=\r\n", 0},
		{"id list", false, func(e *Encoder) error {
			kv := [][]byte{[]byte("name"), []byte("imapproxy"), []byte("x-originating-ip"), nil}
			return e.Atom("a0").SP().Atom("ID").SP().List(len(kv), func(i int) {
				if kv[i] == nil {
					e.NIL()
				} else {
					e.String(kv[i])
				}
			}).CRLF()
		}, "a0 ID (\"name\" \"imapproxy\" \"x-originating-ip\" NIL)\r\n", 0},
		{"empty list", false, func(e *Encoder) error {
			return e.List(0, nil).CRLF()
		}, "()\r\n", 0},
		{"number", false, func(e *Encoder) error {
			return e.Number(0).SP().Number(4294967295).SP().Number(18446744073709551615).CRLF()
		}, "0 4294967295 18446744073709551615\r\n", 0},
		{"text drops controls", false, func(e *Encoder) error {
			return e.Text("a\r\n* BYE\x00x\x7f").CRLF()
		}, "a* BYEx\r\n", 0},
		{"status", false, func(e *Encoder) error {
			return e.Status(Status{Tag: "a3", Type: StatusNo, Code: CodeUnavailable, Text: "Try again\r\nlater"})
		}, "a3 NO [UNAVAILABLE] Try againlater\r\n", 0},
		{"untagged status with code arguments", false, func(e *Encoder) error {
			return e.Status(Status{Type: StatusOK, Code: CodeCapability, Arg: "IMAP4rev1 LITERAL+", Text: "ready."})
		}, "* OK [CAPABILITY IMAP4rev1 LITERAL+] ready.\r\n", 0},
		{"status without code", false, func(e *Encoder) error {
			return e.Status(Status{Type: StatusBye, Text: "Logging out"})
		}, "* BYE Logging out\r\n", 0},
		{"continuation", false, func(e *Encoder) error {
			return e.Continuation("")
		}, "+ \r\n", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, conts := encode(t, tt.litPlus, tt.enc)
			if got != tt.want {
				t.Errorf("wrote %q, want %q", got, tt.want)
			}
			if conts != tt.conts {
				t.Errorf("waited for %d continuations, want %d", conts, tt.conts)
			}
		})
	}
}

// TestEncoderSyncLiteralFlushes checks that a synchronising literal's
// announcement is on the wire before Continue waits for the "+", and its
// bytes are not.
func TestEncoderSyncLiteralFlushes(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out)
	var seen string
	enc := &Encoder{W: w, Continue: func() error { seen = out.String(); return nil }}
	if err := enc.Atom("a").SP().Atom("LOGIN").SP().AString([]byte("bob")).SP().String([]byte("\xff")).CRLF(); err != nil {
		t.Fatal(err)
	}
	w.Flush()
	if want := "a LOGIN bob {1}\r\n"; seen != want {
		t.Errorf("on the wire at Continue: %q, want %q", seen, want)
	}
	if want := "a LOGIN bob {1}\r\n\xff\r\n"; out.String() != want {
		t.Errorf("wrote %q, want %q", out.String(), want)
	}
}

func TestEncoderErrors(t *testing.T) {
	var out bytes.Buffer
	w := NewWriter(&out)
	enc := &Encoder{W: w}
	err := enc.Atom("a").SP().String([]byte("\n")).SP().Atom("more").CRLF()
	if !errors.Is(err, ErrSyncLiteral) {
		t.Fatalf("literal without Continue: %v, want ErrSyncLiteral", err)
	}
	w.Flush()
	if out.String() != "a " {
		t.Errorf("wrote %q after the error, want only %q", out.String(), "a ")
	}

	refused := errors.New("no +")
	w = NewWriter(io.Discard)
	enc = &Encoder{W: w, Continue: func() error { return refused }}
	if err := enc.String([]byte("\r")).CRLF(); err != refused {
		t.Errorf("Continue failing: %v, want %v", err, refused)
	}
}

// TestEncoderLong writes strings longer than the Writer's buffer.
func TestEncoderLong(t *testing.T) {
	long := strings.Repeat(`ab"`, bufSize)
	got, _ := encode(t, true, func(e *Encoder) error {
		return e.Atom("a").SP().String([]byte(long)).SP().Text(long).CRLF()
	})
	want := `a "` + strings.ReplaceAll(long, `"`, `\"`) + `" ` + long + "\r\n"
	if got != want {
		t.Errorf("long strings: got %d bytes, want %d", len(got), len(want))
	}
}

func TestEncoderAllocs(t *testing.T) {
	w := NewWriter(io.Discard)
	user, pass := []byte("bob"), []byte("s3cret \"x\"")
	st := Status{Tag: "a1", Type: StatusOK, Code: CodeCapability, Arg: "IMAP4rev1 IDLE", Text: "Logged in"}
	allocs := testing.AllocsPerRun(100, func() {
		enc := Encoder{W: w, LiteralPlus: true}
		enc.Atom("a1").SP().Atom("LOGIN").SP().AString(user).SP().AString(pass).CRLF()
		enc.Number(12345).SP().String([]byte{0, 1}).CRLF()
		enc.Status(st)
		enc.Continuation("Ready for literal data")
		w.Flush()
	})
	if allocs != 0 {
		t.Errorf("%v allocations per run, want 0", allocs)
	}
}

// roundTrip encodes a LOGIN of user and pass and decodes it again.
func roundTrip(t *testing.T, user, pass []byte, litPlus bool) {
	t.Helper()
	var out bytes.Buffer
	w := NewWriter(&out)
	enc := &Encoder{W: w, LiteralPlus: litPlus, Continue: func() error { return nil }}
	if err := enc.Atom("a1").SP().Atom("LOGIN").SP().AString(user).SP().String(pass).CRLF(); err != nil {
		t.Fatalf("encode: %v", err)
	}
	w.Flush()
	wire := out.String()
	d := &Decoder{R: NewReader(&out, 0), MaxLiteral: 1 << 20}
	cmd, err := d.ReadCommand()
	if err != nil {
		t.Fatalf("decode %q: %v", wire, err)
	}
	if cmd.Tag != "a1" || cmd.Name != "LOGIN" || len(cmd.Args) != 2 {
		t.Fatalf("decode %q: %+v", wire, cmd)
	}
	if !bytes.Equal(cmd.Args[0].Value, user) || !bytes.Equal(cmd.Args[1].Value, pass) {
		t.Fatalf("%q decoded as %q %q, want %q %q", wire, cmd.Args[0].Value, cmd.Args[1].Value, user, pass)
	}
	if cmd.Args[1].Kind != String {
		t.Fatalf("%q: String decoded as kind %d", wire, cmd.Args[1].Kind)
	}
	if _, _, err := d.R.ReadLine(); err != io.EOF {
		t.Fatalf("%q: left %v after the command, want EOF", wire, err)
	}
}

// FuzzEncodeRoundTrip: any string encoded is decoded to the same bytes,
// as an atom, a quoted string or a literal of either kind.
func FuzzEncodeRoundTrip(f *testing.F) {
	for _, s := range []string{"bob", "", "NIL", "a b", `"\`, "\x00", "\r\n", "ü", "{3}", "a{3+}", "x)", "*%]"} {
		f.Add([]byte(s), []byte(s), false)
	}
	f.Fuzz(func(t *testing.T, user, pass []byte, litPlus bool) {
		roundTrip(t, user, pass, litPlus)
	})
}
