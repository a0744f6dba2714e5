package upstream

import (
	"strings"
	"testing"
)

func TestParseCapCodeNonASCII(t *testing.T) {
	for _, text := range []string{
		"\xff\xfe\xfd\xfc\xfb [CAPABILITY IMAP4rev1 IDLE] ready",
		"\xc3\xa9t\xc3\xa9 [capability IMAP4rev1 IDLE]",
	} {
		got := ParseCapCode([]byte(text))
		if strings.Join(got, " ") != "IMAP4rev1 IDLE" {
			t.Errorf("ParseCapCode(%q) = %q", text, got)
		}
	}
	if got := ParseCapCode([]byte("\xff\xff\xff\xff\xff\xff [CAPABILITY")); got != nil {
		t.Errorf("unterminated code: %q", got)
	}
}

func TestParseCapLine(t *testing.T) {
	tests := []struct {
		line string
		want string // "" for nil
	}{
		{"* CAPABILITY IMAP4rev1 IDLE", "IMAP4rev1 IDLE"},
		{"* capability IMAP4rev1  UNSELECT", "IMAP4rev1 UNSELECT"},
		{"* OK [CAPABILITY IMAP4rev1] hi", ""},
		{"* CAPABILITY", ""},
	}
	for _, tt := range tests {
		got := ParseCapLine([]byte(tt.line))
		if strings.Join(got, " ") != tt.want || (tt.want == "") != (got == nil) {
			t.Errorf("ParseCapLine(%q) = %q, want %q", tt.line, got, tt.want)
		}
	}
}

func TestCutCapCode(t *testing.T) {
	text := []byte("OK [CAPABILITY IMAP4rev1 IDLE] Logged in")
	list, at, ok := CutCapCode(text)
	if !ok || string(list) != "IMAP4rev1 IDLE" || string(text[at:at+len(list)]) != "IMAP4rev1 IDLE" {
		t.Errorf("CutCapCode(%q) = %q, %d, %v", text, list, at, ok)
	}
	if _, _, ok := CutCapCode([]byte("OK [READ-WRITE] done")); ok {
		t.Error("CutCapCode found a code in text without one")
	}
}

func TestHasCap(t *testing.T) {
	caps := []string{"IMAP4rev1", "Auth=PLAIN", "UNSELECT"}
	for name, want := range map[string]bool{"AUTH=PLAIN": true, "unselect": true, "IDLE": false, "AUTH": false} {
		if got := HasCap(caps, name); got != want {
			t.Errorf("HasCap(%q, %q) = %v, want %v", caps, name, got, want)
		}
	}
}

// TestCapsInterned: the same list from two connections is one slice.
func TestCapsInterned(t *testing.T) {
	a := ParseCapLine([]byte("* CAPABILITY IMAP4rev1 XINTERNTEST"))
	b := ParseCapCode([]byte("[CAPABILITY IMAP4rev1 XINTERNTEST]"))
	if len(a) != 2 || &a[0] != &b[0] {
		t.Errorf("lists %q and %q are not shared", a, b)
	}
}
