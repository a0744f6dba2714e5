package imapwire

// AppendAString appends s as an atom or a quoted string. It reports false,
// leaving dst as it was, when s can only be sent as a literal (CR, LF, NUL,
// 8-bit bytes, or empty-atom cases that quoting covers are handled here).
func AppendAString(dst, s []byte) ([]byte, bool) {
	if len(s) > 0 && isAtom(s) {
		return append(dst, s...), true
	}
	return AppendQuoted(dst, s)
}

// AppendQuoted appends s as a quoted string, or reports false when s needs
// a literal.
func AppendQuoted(dst, s []byte) ([]byte, bool) {
	for _, c := range s {
		if c == 0 || c == '\r' || c == '\n' || c >= 0x80 {
			return dst, false
		}
	}
	dst = append(dst, '"')
	for _, c := range s {
		if c == '"' || c == '\\' {
			dst = append(dst, '\\')
		}
		dst = append(dst, c)
	}
	return append(dst, '"'), true
}

func isAtom(s []byte) bool {
	for _, c := range s {
		if !isAtomChar(c) {
			return false
		}
	}
	// NIL as an atom would be read as nil, not as the string "NIL".
	return !(len(s) == 3 && (s[0]|0x20) == 'n' && (s[1]|0x20) == 'i' && (s[2]|0x20) == 'l')
}
