//go:build !unix

package imapwire

// rawReads says whether a socket's reads go through its RawConn (see
// lazyBuf). Elsewhere than on Unix a socket is read through net.Conn,
// and an idle connection keeps its read buffer.
const rawReads = false

// readRaw is never called where rawReads is false.
func (b *lazyBuf) readRaw(fd uintptr) bool { panic("imapwire: raw reads on this platform") }
