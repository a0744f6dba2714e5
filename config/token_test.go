package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAdminTokenFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("token", "  s3cret-token\n")
	blank := write("blank", " \n\t\n")
	absent := filepath.Join(dir, "absent")
	block := func(path string) string {
		return base + "admin {\n  token_file = \"" + path + "\"\n}\n"
	}

	c, err := Parse([]byte(block(good)), "test.hcl")
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.Admin.TokenFile != good {
		t.Errorf("Admin.TokenFile = %q, want %q", c.Admin.TokenFile, good)
	}
	if tok, err := ReadToken(good); err != nil || string(tok) != "s3cret-token" {
		t.Errorf("ReadToken = %q, %v; want the token without white space", tok, err)
	}

	for _, tt := range []struct{ name, path, want string }{
		{"absent", absent, "test.hcl:4: admin.token_file: open " + absent + ": no such file or directory"},
		{"blank", blank, "test.hcl:4: admin.token_file: no token in " + blank},
	} {
		_, err := Parse([]byte(block(tt.path)), "test.hcl")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Parse error = %v, want it to contain %q", tt.name, err, tt.want)
		}
		// The token itself never appears in an error.
		if err != nil && strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: error shows a token: %v", tt.name, err)
		}
	}
}
