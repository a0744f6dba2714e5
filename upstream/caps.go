package upstream

import (
	"bytes"
	"strings"
	"sync"
)

// ParseCapCode returns the capabilities of a "[CAPABILITY ...]" response
// code in a response text, or nil.
func ParseCapCode(text []byte) []string {
	list, _, ok := CutCapCode(text)
	if !ok {
		return nil
	}
	return internCaps(list)
}

// CutCapCode finds a "[CAPABILITY ...]" response code in text and returns
// its list and the offset of the list in text. The match is made on text
// itself, ASCII case folded: an upper-cased copy of non-ASCII text can
// differ in length, and its offsets would not fit the original.
func CutCapCode(text []byte) (list []byte, at int, ok bool) {
	const code = "[CAPABILITY "
	for i := 0; i+len(code) <= len(text); i++ {
		if text[i] != '[' || !asciiEqualFold(text[i:i+len(code)], code) {
			continue
		}
		rest := text[i+len(code):]
		j := bytes.IndexByte(rest, ']')
		if j < 0 {
			return nil, 0, false
		}
		return rest[:j], i + len(code), true
	}
	return nil, 0, false
}

// asciiEqualFold reports whether b begins with upper, ASCII letters of b
// folded to upper case.
func asciiEqualFold(b []byte, upper string) bool {
	for i := range len(upper) {
		c := b[i]
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		if c != upper[i] {
			return false
		}
	}
	return true
}

// ParseCapLine returns the capabilities of an untagged "* CAPABILITY ..."
// line, or nil.
func ParseCapLine(line []byte) []string {
	const p = "* CAPABILITY "
	if len(line) < len(p) || !strings.EqualFold(string(line[:len(p)]), p) {
		return nil
	}
	return internCaps(line[len(p):])
}

// Every connection to a backend carries its capability list, and they
// are nearly always the same few lists: share one copy of each instead of
// a kilobyte per idle session. Bounded, so a backend sending ever new
// lists cannot grow it.
var (
	capsMu    sync.Mutex
	capsCache = map[string][]string{}
)

const maxCapsCache = 64

func internCaps(b []byte) []string {
	capsMu.Lock()
	defer capsMu.Unlock()
	if c, ok := capsCache[string(b)]; ok {
		return c
	}
	c := strings.Fields(string(b))
	if len(capsCache) < maxCapsCache {
		capsCache[string(b)] = c
	}
	return c
}

// HasCap reports whether caps holds name, compared case-insensitively.
func HasCap(caps []string, name string) bool {
	for _, c := range caps {
		if strings.EqualFold(c, name) {
			return true
		}
	}
	return false
}
