package session

import (
	"testing"

	"github.com/imapproxy/imapproxy/upstream"
)

// FuzzSASLPlain feeds the AUTHENTICATE PLAIN decoder hostile base64: it
// must never panic, and whatever it accepts must encode back to the same
// credentials.
func FuzzSASLPlain(f *testing.F) {
	for _, s := range []string{"AGJvYgBzZWNyZXQ=", "=", "", "*", "YWRtaW4AYm9iAHB3", "AAAA", "!!!!", "AGJvYgBzZWNyZXQ"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		data, err := decodeSASL(in)
		if err != nil {
			return
		}
		cr, ok := parsePlain(data)
		if !ok {
			return
		}
		if len(cr.User) == 0 {
			t.Fatal("accepted an empty user name")
		}
		again, err := decodeSASL(upstream.PlainResponse(cr))
		if err != nil {
			t.Fatalf("re-encoding failed: %v", err)
		}
		cr2, ok := parsePlain(again)
		if !ok || string(cr2.User) != string(cr.User) || string(cr2.Pass) != string(cr.Pass) || string(cr2.Authzid) != string(cr.Authzid) {
			t.Fatalf("round trip changed the credentials")
		}
	})
}
