package imapwire

import "io"

// Writer buffers writes until Flush, in a buffer borrowed from a pool on
// the first write and handed back by Flush, so that a quiet connection
// holds none. The proxy flushes once per response burst: one write, one
// TCP segment where it fits, with TCP_NODELAY set.
type Writer struct {
	dst io.Writer
	buf []byte
	err error
}

// NewWriter returns a Writer to dst.
func NewWriter(dst io.Writer) *Writer { return &Writer{dst: dst} }

// Reset discards anything unflushed and writes to dst from now on.
func (w *Writer) Reset(dst io.Writer) {
	w.release()
	w.dst, w.err = dst, nil
}

// Buffered is the number of bytes waiting for Flush.
func (w *Writer) Buffered() int { return len(w.buf) }

// Available is how many more bytes Write takes into the buffer without
// writing anything out.
func (w *Writer) Available() int { return bufSize - len(w.buf) }

func (w *Writer) Write(p []byte) (int, error) { return write(w, p, w.dst.Write) }

// WriteString is Write for a string, without converting it.
func (w *Writer) WriteString(s string) (int, error) {
	return write(w, s, func(s string) (int, error) { return io.WriteString(w.dst, s) })
}

// write buffers p, or writes it straight through direct when it would not
// fit even in an empty buffer.
func write[T string | []byte](w *Writer, p T, direct func(T) (int, error)) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if w.buf == nil {
		w.buf = getBuf()[:0]
	}
	if len(w.buf)+len(p) > cap(w.buf) {
		if err := w.flushBuf(); err != nil {
			return 0, err
		}
		if len(p) >= cap(w.buf) {
			n, err := direct(p)
			if err != nil {
				w.err = err
			}
			return n, err
		}
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

// Flush writes what is buffered and hands the buffer back.
func (w *Writer) Flush() error {
	err := w.flushBuf()
	w.release()
	return err
}

func (w *Writer) flushBuf() error {
	if w.err != nil {
		return w.err
	}
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.dst.Write(w.buf)
	w.buf = w.buf[:0]
	if err != nil {
		w.err = err
	}
	return err
}

func (w *Writer) release() {
	if w.buf != nil {
		putBuf(w.buf)
		w.buf = nil
	}
}
