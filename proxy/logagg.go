package proxy

import (
	"strconv"
	"unicode/utf8"
)

// maxLogString bounds what of a client-controlled string (a user name, a
// tag) goes into a log line.
const maxLogString = 64

// clip makes a client-controlled string fit for a log field: at most
// maxLogString bytes of it, cut at a character boundary and marked with
// the full length when cut, and control characters replaced by '?', so
// that no client can make lines long or forge new ones.
func clip[S ~string | ~[]byte](s S) string {
	n := len(s)
	cut := n > maxLogString
	if cut {
		n = maxLogString
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
	}
	out := make([]byte, 0, n+24)
	for i := 0; i < n; i++ {
		c := s[i]
		if c < ' ' || c == 0x7f {
			c = '?'
		}
		out = append(out, c)
	}
	if cut {
		out = append(out, "...("...)
		out = strconv.AppendInt(out, int64(len(s)), 10)
		out = append(out, " bytes)"...)
	}
	return string(out)
}
