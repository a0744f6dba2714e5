//go:build unix

package imapwire

import "syscall"

// rawReads says whether a socket's reads go through its RawConn (see
// lazyBuf), which lets an idle connection hold no buffer.
const rawReads = true

// readRaw is the callback of rawFill: false asks the runtime to wait for
// readability and call again.
func (b *lazyBuf) readRaw(fd uintptr) bool {
	if b.buf == nil {
		b.buf = getBuf()
	}
	for {
		b.n, b.rerr = syscall.Read(int(fd), b.buf[b.w:])
		if b.rerr != syscall.EINTR {
			break
		}
	}
	if b.rerr == syscall.EAGAIN {
		b.n, b.rerr = 0, nil
		b.release()
		return false
	}
	return true
}
