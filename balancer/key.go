package balancer

import (
	"encoding/binary"
	"unicode"
	"unicode/utf8"

	"github.com/cespare/xxhash/v2"
)

const utf8Max = utf8.UTFMax

// lowerBuf is sized to hold typical user@domain names whole, so that they
// hash in one Sum64 call; longer or non-ASCII names stream through a Digest.
const lowerBuf = 128

// needsLower reports whether lowercasing might change s. Non-ASCII bytes
// count as "might": they go through the rune path. It looks at eight bytes
// at a time: it runs on every Pick, and byte by byte it cost a third of a
// 16-backend Pick.
func needsLower(s string) bool {
	i := 0
	for ; i+8 <= len(s); i += 8 {
		x := load64(s, i)
		if x&high != 0 || upperBits(x) != 0 {
			return true
		}
	}
	for ; i < len(s); i++ {
		if c := s[i]; c >= utf8.RuneSelf || 'A' <= c && c <= 'Z' {
			return true
		}
	}
	return false
}

const (
	ones = 0x0101010101010101
	high = 0x8080808080808080
)

// load64 reads s[i:i+8] as one little-endian word (the compiler makes it
// one load).
func load64(s string, i int) uint64 {
	return uint64(s[i]) | uint64(s[i+1])<<8 | uint64(s[i+2])<<16 | uint64(s[i+3])<<24 |
		uint64(s[i+4])<<32 | uint64(s[i+5])<<40 | uint64(s[i+6])<<48 | uint64(s[i+7])<<56
}

// upperBits has the high bit of each byte of x that is in 'A'..'Z' set,
// for an x with no byte of 0x80 or above: then no sum carries into the
// next byte, and a byte's high bit is set in ge for 'A' and above, in gt
// for above 'Z'.
func upperBits(x uint64) uint64 {
	ge := x + (0x80-'A')*ones
	gt := x + (0x80-'Z'-1)*ones
	return ge &^ gt & high
}

// lowerRune writes the lowercase form of the character at s[i] into dst
// (len(dst) >= utf8.UTFMax) and returns the bytes written and read. It is
// the definition of lowercasing behind both Key and the allocation-free
// hashing in Pick, so the two cannot drift apart (sumLower's ASCII loop
// repeats its ASCII rule, held to it by TestKeyHash). Invalid UTF-8 bytes
// are copied unchanged: unlike
// strings.ToLower, which would turn each into U+FFFD, this keeps distinct
// malformed names distinct.
func lowerRune(dst []byte, s string, i int) (written, read int) {
	c := s[i]
	if c < utf8.RuneSelf {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst[0] = c
		return 1, 1
	}
	r, size := utf8.DecodeRuneInString(s[i:])
	if r == utf8.RuneError && size == 1 {
		dst[0] = c
		return 1, 1
	}
	return utf8.EncodeRune(dst, unicode.ToLower(r)), size
}

// appendLower appends the lowercase form of s to dst.
func appendLower(dst []byte, s string) []byte {
	var tmp [utf8Max]byte
	for i := 0; i < len(s); {
		w, n := lowerRune(tmp[:], s, i)
		dst = append(dst, tmp[:w]...)
		i += n
	}
	return dst
}

// sumLower is xxhash.Sum64String(lowercase(s)) computed in a stack buffer,
// because Pick must not allocate even for mixed-case names.
func sumLower(s string) uint64 {
	// Most names are short ASCII: lowercase them into one buffer and hash
	// it in one call, without lowerRune's per-byte call or a Digest.
	if len(s) <= lowerBuf {
		var buf [lowerBuf]byte
		i := 0
		for ; i+8 <= len(s); i += 8 {
			x := load64(s, i)
			if x&high != 0 {
				break // non-ASCII: the byte loop below finds it
			}
			binary.LittleEndian.PutUint64(buf[i:], x|upperBits(x)>>2) // 0x80>>2 is 'a'-'A'
		}
		for ; i < len(s); i++ {
			c := s[i]
			if c >= utf8.RuneSelf {
				break
			}
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			buf[i] = c
		}
		if i == len(s) {
			return xxhash.Sum64(buf[:i])
		}
	}
	return sumLowerStream(s)
}

// sumLowerStream is sumLower for long or non-ASCII names, whose lowercase
// form may not fit one buffer: it streams chunks through a Digest.
func sumLowerStream(s string) uint64 {
	var (
		buf [lowerBuf]byte
		d   xxhash.Digest
		n   int
	)
	d.Reset()
	for i := 0; i < len(s); {
		if n > len(buf)-utf8Max {
			d.Write(buf[:n])
			n = 0
		}
		w, r := lowerRune(buf[n:], s, i)
		n += w
		i += r
	}
	d.Write(buf[:n])
	return d.Sum64()
}
