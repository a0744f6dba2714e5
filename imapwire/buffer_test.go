package imapwire

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"
)

// chunkReader returns its data in small random pieces, as a socket does.
type chunkReader struct {
	data []byte
	rnd  *rand.Rand
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := 1 + c.rnd.IntN(min(len(p), 700))
	n = copy(p, c.data[:min(n, len(c.data))])
	c.data = c.data[n:]
	return n, nil
}

// TestReaderChunked frames lines and literals exactly, however the bytes
// arrive, across buffer boundaries and lines longer than the buffer.
func TestReaderChunked(t *testing.T) {
	var in bytes.Buffer
	var want []string
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 300; i++ {
		switch i % 3 {
		case 0:
			l := "* " + strings.Repeat("x", rnd.IntN(9000)) + "\r\n"
			in.WriteString(l)
			want = append(want, l)
		case 1:
			body := strings.Repeat("b", rnd.IntN(20000))
			l := "* 1 FETCH (BODY[] {" + itoa(len(body)) + "}\r\n"
			in.WriteString(l + body + ")\r\n")
			want = append(want, l, "="+body, ")\r\n")
		default:
			in.WriteString("a OK done\r\n")
			want = append(want, "a OK done\r\n")
		}
	}
	r := NewReader(&chunkReader{data: in.Bytes(), rnd: rnd}, 1<<20)
	var got []string
	for {
		line, lit, err := r.ReadLine()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ReadLine after %d lines: %v", len(got), err)
		}
		got = append(got, string(line))
		if lit != nil {
			var body bytes.Buffer
			if _, err := r.CopyLiteral(&body, lit.Size, nil); err != nil {
				t.Fatalf("CopyLiteral: %v", err)
			}
			got = append(got, "="+body.String())
		}
	}
	if len(got) != len(want) {
		t.Fatalf("got %d pieces, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("piece %d: got %d bytes %.40q, want %d bytes %.40q", i, len(got[i]), got[i], len(want[i]), want[i])
		}
	}
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// TestIdleHoldsNoBuffer: a reader blocked waiting on a quiet socket holds
// no buffer, and a writer holds none after Flush.
func TestIdleHoldsNoBuffer(t *testing.T) {
	client, server := tcpPair(t)

	r := NewReader(server, 0)
	w := NewWriter(client)
	w.WriteString("a NOOP\r\n")
	if w.Buffered() == 0 || w.buf == nil {
		t.Fatal("writer buffered nothing")
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if w.buf != nil {
		t.Error("writer kept its buffer after Flush")
	}
	line, _, err := r.ReadLine()
	if err != nil || string(line) != "a NOOP\r\n" {
		t.Fatalf("ReadLine = %q, %v", line, err)
	}
	// The next read blocks on a quiet socket: by then the buffer is back
	// in the pool. The read deadline ends the wait.
	server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, _, err := r.ReadLine(); !isTimeout(err) {
		t.Fatalf("ReadLine on a quiet socket: %v, want a timeout", err)
	}
	if r.br.buf != nil {
		t.Error("reader kept a buffer while waiting on a quiet socket")
	}
	// And it reads again when data comes.
	server.SetReadDeadline(time.Time{})
	w.WriteString("b NOOP\r\n")
	w.Flush()
	if line, _, err := r.ReadLine(); err != nil || string(line) != "b NOOP\r\n" {
		t.Fatalf("ReadLine after the wait = %q, %v", line, err)
	}
}

// TestIdleDropsScratch: a line longer than the buffer is assembled in a
// scratch buffer; a connection that then waits (Wait, or the next read on
// a quiet socket) holds none of it, so one long command does not pin up
// to 64 KiB for the rest of a session or a cached connection's life.
func TestIdleDropsScratch(t *testing.T) {
	client, server := tcpPair(t)
	r := NewReader(server, 0)
	long := "a UID STORE " + strings.Repeat("1,", 10000) + "1 +FLAGS (\\Seen)\r\n"
	for _, wait := range []func() error{
		r.Wait,
		func() error { _, _, err := r.ReadLine(); return err },
	} {
		go client.Write([]byte(long))
		line, _, err := r.ReadLine()
		if err != nil || len(line) != len(long) {
			t.Fatalf("ReadLine = %d bytes, %v; want %d", len(line), err, len(long))
		}
		if r.scratch == nil {
			t.Fatal("no scratch for a line over the buffer: the test tests nothing")
		}
		server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if err := wait(); !isTimeout(err) {
			t.Fatalf("waiting on a quiet socket: %v, want a timeout", err)
		}
		if r.scratch != nil {
			t.Errorf("reader kept %d bytes of scratch while waiting", cap(r.scratch))
		}
		server.SetReadDeadline(time.Time{})
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestWait: Wait returns once a line's bytes are there (buffering them, so
// ReadLine does not block), returns ReadLine's error on a timeout or EOF,
// and holds no buffer while it waits.
func TestWait(t *testing.T) {
	client, server := tcpPair(t)
	r := NewReader(server, 0)

	// Two lines in one write: the first Wait reads both, the second
	// returns at once with the rest still buffered.
	if _, err := client.Write([]byte("a NOOP\r\nb NOOP\r\n")); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"a NOOP\r\n", "b NOOP\r\n"} {
		if err := r.Wait(); err != nil {
			t.Fatalf("Wait: %v", err)
		}
		if r.Buffered() == 0 {
			t.Fatalf("Wait returned with nothing buffered before %q", want)
		}
		if line, _, err := r.ReadLine(); err != nil || string(line) != want {
			t.Fatalf("ReadLine = %q, %v; want %q", line, err, want)
		}
	}

	server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if err := r.Wait(); !isTimeout(err) {
		t.Fatalf("Wait on a quiet socket: %v, want a timeout", err)
	}
	if r.br.buf != nil {
		t.Error("reader kept a buffer while waiting on a quiet socket")
	}

	server.SetReadDeadline(time.Time{})
	client.Close()
	if err := r.Wait(); err != io.EOF {
		t.Fatalf("Wait after the peer closed: %v, want EOF", err)
	}
	if _, _, err := r.ReadLine(); err != io.EOF {
		t.Fatalf("ReadLine after the peer closed: %v, want EOF", err)
	}
}

// TestWaitNotASocket: on a source that cannot be waited on, Wait returns
// at once and ReadLine reads as before.
func TestWaitNotASocket(t *testing.T) {
	r := NewReader(strings.NewReader("a NOOP\r\n"), 0)
	if err := r.Wait(); err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if line, _, err := r.ReadLine(); err != nil || string(line) != "a NOOP\r\n" {
		t.Fatalf("ReadLine = %q, %v", line, err)
	}
}

// TestSocketReadAllocs: reading a line from a socket allocates nothing
// (the pooled buffer aside); a read that allocated would also keep its
// allocations alive while an idle connection waits.
func TestSocketReadAllocs(t *testing.T) {
	client, server := tcpPair(t)
	r := NewReader(server, 0)
	msg := []byte("a NOOP\r\n")
	var failed error
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := client.Write(msg); err != nil {
			failed = err
			return
		}
		if err := r.Wait(); err != nil {
			failed = err
			return
		}
		if line, _, err := r.ReadLine(); err != nil || string(line) != string(msg) {
			failed = fmt.Errorf("ReadLine = %q, %v", line, err)
		}
	})
	if failed != nil {
		t.Fatal(failed)
	}
	// sync.Pool may allocate now and then when a GC empties it.
	if allocs >= 1 {
		t.Errorf("write and read of a line: %v allocations, want 0", allocs)
	}
}

// tcpPair returns both ends of a TCP connection on 127.0.0.1, closed when
// the test ends.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

// TestTake: Take hands out what is buffered and no more, without reading.
func TestTake(t *testing.T) {
	client, server := tcpPair(t)
	r := NewReader(server, 0)
	if _, err := client.Write([]byte("* 1 FETCH (BODY[] {10}\r\n0123")); err != nil {
		t.Fatal(err)
	}
	line, lit, err := r.ReadLine()
	if err != nil || lit == nil || lit.Size != 10 {
		t.Fatalf("ReadLine = %q, %v, %v", line, lit, err)
	}
	if got := string(r.Take(10)); got != "0123" {
		t.Fatalf("Take(10) = %q, want the 4 buffered bytes", got)
	}
	if got := r.Take(10); len(got) != 0 {
		t.Fatalf("Take on an empty buffer = %q, want nothing (and no read)", got)
	}
	client.Write([]byte("456789)\r\n"))
	var rest strings.Builder
	if _, err := r.CopyLiteral(&rest, 6, nil); err != nil || rest.String() != "456789" {
		t.Fatalf("rest of the literal = %q, %v", rest.String(), err)
	}
}

// TestWriterAvailable: Available is what Write buffers without writing.
func TestWriterAvailable(t *testing.T) {
	var dst strings.Builder
	w := NewWriter(&dst)
	if n := w.Available(); n != bufSize {
		t.Fatalf("Available of a new writer = %d, want %d", n, bufSize)
	}
	w.Write(make([]byte, bufSize-10))
	if n := w.Available(); n != 10 {
		t.Fatalf("Available = %d, want 10", n)
	}
	w.Write(make([]byte, 10))
	if dst.Len() != 0 {
		t.Fatalf("writing Available bytes wrote %d bytes out, want 0", dst.Len())
	}
}
