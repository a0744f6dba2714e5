package config

import (
	"bytes"
	"fmt"
	"os"
)

// ReadToken reads a token file such as admin.token_file: the file's
// content less surrounding white space, which must leave something.
func ReadToken(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	tok := bytes.TrimSpace(b)
	if len(tok) == 0 {
		return nil, fmt.Errorf("no token in %s", path)
	}
	return tok, nil
}
