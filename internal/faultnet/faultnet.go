// Package faultnet is a TCP man-in-the-middle for tests: placed between
// the code under test and a server (the proxy and a Dovecot backend), it
// forwards bytes both ways and, on command, misbehaves the way a real
// network or a sick server does: it stops forwarding in one direction
// (a stalled backend, a black-holed route), drips bytes, stops just after
// a given byte pattern (a hang in the middle of a literal), resets every
// connection, accepts connections it never serves, or refuses them.
//
// Faults belong to the Proxy and a direction, and apply at once to every
// connection, existing and new. Every goroutine is owned by the Proxy and
// ended by Close, which also closes every socket.
//
// A typical test points the code under test at the Proxy instead of the
// backend, then, for a backend that hangs in the middle of a literal:
//
//	p := faultnet.ListenT(t, backend.Addr)
//	hit := p.PauseOn(faultnet.Down, []byte("{1048"))
//	... start the FETCH through the proxy under test; <-hit ...
//	... assert the client gets its answer or BYE in time ...
//	waitFor(func() bool { return p.Conns() == 0 }) // nothing pinned
//
// A Proxy holds back at most 64 KiB per direction and connection; beyond
// that the sender's writes block, as on a real network, and a close by
// the sender is seen only once the direction flows again (or, as on a
// real network, not at all while both sides' buffers are full).
package faultnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Dir is a direction of the stream.
type Dir int

const (
	Up   Dir = iota // client to target: what the code under test sends
	Down            // target to client: what the server answers
)

func (d Dir) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	}
	return fmt.Sprintf("Dir(%d)", int(d))
}

const (
	dialTimeout = 10 * time.Second
	// queueSize bounds what one direction of one connection holds while
	// it is paused or dripping; beyond it the sender sees backpressure.
	queueSize = 64 << 10
	readSize  = 16 << 10
)

// MaxPattern is the longest pattern PauseOn accepts: each direction keeps
// the last bytes it forwarded to find a pattern split across writes.
const MaxPattern = 1024

// faults is the state of one direction.
type faults struct {
	paused    bool
	dripN     int
	dripEvery time.Duration
	pattern   []byte        // armed by PauseOn until hit
	hit       chan struct{} // closed once pattern has been forwarded
}

// Proxy is a running man-in-the-middle. Its methods are safe for
// concurrent use.
type Proxy struct {
	target string
	ln     *net.TCPListener
	done   chan struct{} // closed by Close
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the Proxy

	bytes    [2]atomic.Int64
	accepted atomic.Int64

	mu        sync.Mutex
	dirs      [2]faults
	changed   [2]chan struct{} // per Dir: closed and replaced when its faults change
	blackHole bool
	refuse    bool
	pairs     map[*pair]struct{}
	open      int // pairs whose client has not closed (see Conns)
	closed    bool
}

// Listen starts a Proxy on 127.0.0.1 (a free port) that forwards each
// connection to target.
func Listen(target string) (*Proxy, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, fmt.Errorf("faultnet: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{
		target:  target,
		ln:      ln,
		done:    make(chan struct{}),
		ctx:     ctx,
		cancel:  cancel,
		changed: [2]chan struct{}{make(chan struct{}), make(chan struct{})},
		pairs:   make(map[*pair]struct{}),
	}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is the "127.0.0.1:PORT" to connect to instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Close stops listening, closes every connection (both sides) and returns
// once every goroutine of the Proxy has ended.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	pairs := p.snapshotLocked()
	p.mu.Unlock()

	close(p.done)
	p.cancel()
	err := p.ln.Close()
	for _, pr := range pairs {
		pr.end(false)
	}
	p.wg.Wait()
	if err != nil {
		return fmt.Errorf("faultnet: %w", err)
	}
	return nil
}

// Pause stops forwarding d: bytes stay queued, in the Proxy (up to
// queueSize per connection) and in the kernel's buffers, and the receiver
// sees a hang. It also ends a Drip and disarms PauseOn of d.
func (p *Proxy) Pause(d Dir) {
	p.setFaults(d, faults{paused: true})
}

// Resume forwards d at full speed again: it ends Pause, Drip and any
// PauseOn of d not hit yet. Queued bytes are delivered first, in order.
func (p *Proxy) Resume(d Dir) {
	p.setFaults(d, faults{})
}

// Drip forwards d at most n bytes every interval on each connection (the
// first n at once), until Resume or Pause. n <= 0 or every <= 0 is Resume.
func (p *Proxy) Drip(d Dir, n int, every time.Duration) {
	if n <= 0 || every <= 0 {
		p.Resume(d)
		return
	}
	p.setFaults(d, faults{dripN: n, dripEvery: every})
}

// PauseOn forwards d normally until the first occurrence of pattern on any
// connection, forwards the pattern's last byte and then pauses d, as
// Pause. The returned channel is closed once the bytes up to and including
// the pattern have been written to the receiver's socket. Pause, Resume or
// Drip of d disarm it (the channel then stays open). The occurrence may
// start in bytes forwarded before the call. It replaces an earlier
// PauseOn, Pause or Drip of d. pattern must be 1..MaxPattern bytes.
func (p *Proxy) PauseOn(d Dir, pattern []byte) <-chan struct{} {
	if len(pattern) == 0 || len(pattern) > MaxPattern {
		panic(fmt.Sprintf("faultnet: PauseOn pattern of %d bytes, want 1..%d", len(pattern), MaxPattern))
	}
	hit := make(chan struct{})
	p.setFaults(d, faults{pattern: bytes.Clone(pattern), hit: hit})
	return hit
}

func (p *Proxy) setFaults(d Dir, f faults) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.dirs[d] = f
	p.changedLocked(d)
}

// changedLocked wakes every goroutine waiting for a change of d's faults.
func (p *Proxy) changedLocked(d Dir) {
	close(p.changed[d])
	p.changed[d] = make(chan struct{})
}

// Reset ends every current connection with a TCP reset on both sides
// (SO_LINGER 0, then close): each peer's next read fails with
// ECONNRESET. New connections are not affected.
func (p *Proxy) Reset() {
	p.mu.Lock()
	pairs := p.snapshotLocked()
	p.mu.Unlock()
	for _, pr := range pairs {
		pr.end(true)
	}
}

// BlackHole, while on, accepts new connections but never connects them to
// the target and never sends a byte: a connect that succeeds and then
// hangs. What the client sends is read and dropped. Such a connection is
// held until the client closes it, Reset or Close; turning BlackHole off
// affects new connections only.
//
// BlackHole and Refuse apply to connections accepted after the call. The
// kernel completes a connect before the Proxy accepts it: a test that
// dialled just before the call waits for Accepted to count the connection.
func (p *Proxy) BlackHole(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.blackHole = on
}

// Refuse, while on, resets new connections as soon as they are accepted,
// without connecting to the target: the client's connect, or its first
// read, fails with ECONNRESET (on loopback the reset can beat connect).
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refuse = on
}

// Conns is the number of connections the client side still holds:
// accepted, and neither closed nor reset by the client, nor ended by
// Reset or Close. A connection the client has closed is no longer counted
// even while the Proxy still holds the target side to deliver bytes held
// back in Down (it does so until Resume, Reset or Close).
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open
}

// Accepted is the number of connections accepted so far, refused and
// black-holed ones included.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// Bytes is the number of bytes forwarded in d so far (written to the
// receiver's socket), over every connection.
func (p *Proxy) Bytes(d Dir) int64 { return p.bytes[d].Load() }

func (p *Proxy) snapshotLocked() []*pair {
	out := make([]*pair, 0, len(p.pairs))
	for pr := range p.pairs {
		out = append(out, pr)
	}
	return out
}

// acceptLoop accepts until Close, retrying temporary errors with backoff.
func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	var backoff time.Duration
	for {
		c, err := p.ln.AcceptTCP()
		if err != nil {
			select {
			case <-p.done:
				return
			default:
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-p.done:
				t.Stop()
				return
			}
			continue
		}
		backoff = 0
		// The mode is taken here, before Accepted counts the
		// connection, so that a test which saw the count knows which
		// mode applies.
		p.mu.Lock()
		refuse, hole := p.refuse, p.blackHole
		p.mu.Unlock()
		p.accepted.Add(1)
		p.wg.Add(1)
		go p.serve(c, refuse, hole)
	}
}

// serve owns client until it has handed it to a pair.
func (p *Proxy) serve(client *net.TCPConn, refuse, hole bool) {
	defer p.wg.Done()
	if refuse {
		_ = client.SetLinger(0)
		client.Close()
		return
	}

	pr := &pair{p: p, client: client, done: make(chan struct{}), clientOpen: true}
	if !p.add(pr) {
		client.Close()
		return
	}
	if hole {
		p.hold(pr)
		return
	}

	var d net.Dialer
	ctx, cancel := context.WithTimeout(p.ctx, dialTimeout)
	c, err := d.DialContext(ctx, "tcp", p.target)
	cancel()
	if err != nil {
		// The target refused or is unreachable: the client sees the
		// reset it would have seen connecting directly.
		pr.end(true)
		return
	}
	target := c.(*net.TCPConn)
	if ended, rst := pr.setTarget(target); ended {
		// The pair ended while dialling: end the target side the same way.
		if rst {
			_ = target.SetLinger(0)
		}
		target.Close()
		return
	}
	up := &link{pr: pr, dir: Up, src: client, dst: target}
	down := &link{pr: pr, dir: Down, src: target, dst: client}
	for _, l := range []*link{up, down} {
		l.readable = make(chan struct{}, 1)
		l.writable = make(chan struct{}, 1)
		p.wg.Add(2)
		go l.read()
		go l.write()
	}
}

// hold keeps a black-holed connection, reading and dropping what the
// client sends, until the client closes it or the pair is ended.
func (p *Proxy) hold(pr *pair) {
	buf := make([]byte, readSize)
	for {
		if _, err := pr.client.Read(buf); err != nil {
			pr.end(!errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed))
			return
		}
	}
}

// add registers pr, unless the Proxy is closed.
func (p *Proxy) add(pr *pair) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.pairs[pr] = struct{}{}
	p.open++
	return true
}

// pair is one client connection and its connection to the target.
type pair struct {
	p      *Proxy
	client *net.TCPConn
	done   chan struct{} // closed by end
	once   sync.Once

	// Guarded by p.mu.
	target     *net.TCPConn
	rst        bool // ended with a reset
	clientOpen bool
	finished   int // links that delivered their EOF
}

// setTarget hands c to the pair, unless the pair has ended (rst: with a
// reset), when the caller keeps it.
func (pr *pair) setTarget(c *net.TCPConn) (ended, rst bool) {
	pr.p.mu.Lock()
	defer pr.p.mu.Unlock()
	select {
	case <-pr.done:
		return true, pr.rst
	default:
	}
	pr.target = c
	return false, false
}

// clientGone records that the client closed or reset its side.
func (pr *pair) clientGone() {
	pr.p.mu.Lock()
	defer pr.p.mu.Unlock()
	pr.clientGoneLocked()
}

func (pr *pair) clientGoneLocked() {
	if pr.clientOpen {
		pr.clientOpen = false
		pr.p.open--
	}
}

// linkFinished records that one direction delivered its EOF; the pair
// ends once both have.
func (pr *pair) linkFinished() {
	pr.p.mu.Lock()
	pr.finished++
	both := pr.finished == 2
	pr.p.mu.Unlock()
	if both {
		pr.end(false)
	}
}

// end closes both sockets, with a reset (SO_LINGER 0) if rst, and wakes
// every goroutine of the pair. Only the first call acts.
func (pr *pair) end(rst bool) {
	pr.once.Do(func() {
		pr.p.mu.Lock()
		target := pr.target
		pr.rst = rst
		pr.clientGoneLocked()
		delete(pr.p.pairs, pr)
		close(pr.done)
		pr.p.mu.Unlock()
		for _, c := range []*net.TCPConn{pr.client, target} {
			if c == nil {
				continue
			}
			if rst {
				_ = c.SetLinger(0)
			}
			c.Close()
		}
	})
}

// link is one direction of a pair. Its reader fills q from src, up to
// queueSize; its writer drains q into dst as the direction's faults allow.
// Two goroutines, so that the reader sees the sender close even while the
// writer is held back.
type link struct {
	pr       *pair
	dir      Dir
	src, dst *net.TCPConn
	readable chan struct{} // cap 1: q grew or end was set
	writable chan struct{} // cap 1: q shrank

	mu  sync.Mutex
	q   []byte
	eof bool // src ended cleanly after q

	tail []byte // the last bytes written, writer only: patterns across writes
}

func kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// read copies src into q until src ends. A clean end (EOF) is queued for
// the writer, which passes it on as a half-close after the data; a reset
// or other error ends the pair at once and resets the other side.
func (l *link) read() {
	defer l.pr.p.wg.Done()
	buf := make([]byte, readSize)
	for {
		l.mu.Lock()
		room := queueSize - len(l.q)
		l.mu.Unlock()
		if room <= 0 {
			select {
			case <-l.writable:
				continue
			case <-l.pr.done:
				return
			}
		}
		n, err := l.src.Read(buf[:min(room, len(buf))])
		l.mu.Lock()
		l.q = append(l.q, buf[:n]...)
		if errors.Is(err, io.EOF) {
			l.eof = true
		}
		l.mu.Unlock()
		kick(l.readable)
		if err == nil {
			continue
		}
		if l.dir == Up {
			l.pr.clientGone()
		}
		if !errors.Is(err, io.EOF) {
			l.pr.end(!errors.Is(err, net.ErrClosed))
		}
		return
	}
}

// write forwards q to dst, obeying the direction's faults.
func (l *link) write() {
	defer l.pr.p.wg.Done()
	p := l.pr.p
	out := make([]byte, queueSize)
	for {
		chunk, ok := l.waitQueued(out)
		if !ok {
			return
		}

		p.mu.Lock()
		f, changed := p.dirs[l.dir], p.changed[l.dir]
		p.mu.Unlock()
		if f.paused {
			select {
			case <-changed:
				continue
			case <-l.pr.done:
				return
			}
		}
		if f.dripN > 0 {
			chunk = chunk[:min(len(chunk), f.dripN)]
		}
		var hit chan struct{}
		if f.pattern != nil {
			if end := l.match(chunk, f.pattern); end >= 0 {
				if !l.claim(f.hit) {
					continue // the faults changed meanwhile
				}
				chunk, hit = chunk[:end], f.hit
			}
		}

		if !l.send(chunk) {
			return
		}
		if hit != nil {
			close(hit)
		}
		if f.dripN > 0 && !l.drip(f.dripEvery, changed) {
			return
		}
	}
}

// waitQueued copies what q holds into out, waiting while q is empty. It
// returns false once the link is finished (EOF forwarded) or the pair is
// done.
func (l *link) waitQueued(out []byte) ([]byte, bool) {
	for {
		l.mu.Lock()
		n, eof := len(l.q), l.eof
		chunk := out[:copy(out, l.q)]
		l.mu.Unlock()
		if n > 0 {
			return chunk, true
		}
		if eof {
			_ = l.dst.CloseWrite()
			l.pr.linkFinished()
			return nil, false
		}
		select {
		case <-l.readable:
		case <-l.pr.done:
			return nil, false
		}
	}
}

// send writes chunk to dst and then drops it from q; false when dst
// failed, which ends the pair.
func (l *link) send(chunk []byte) bool {
	p := l.pr.p
	if _, err := l.dst.Write(chunk); err != nil {
		l.pr.end(!errors.Is(err, net.ErrClosed))
		return false
	}
	p.bytes[l.dir].Add(int64(len(chunk)))
	l.remember(chunk)
	l.mu.Lock()
	l.q = append(l.q[:0], l.q[len(chunk):]...)
	l.mu.Unlock()
	kick(l.writable)
	return true
}

// drip waits between two drips, cut short when the faults change; false
// when the pair is done.
func (l *link) drip(every time.Duration, changed <-chan struct{}) bool {
	t := time.NewTimer(every)
	defer t.Stop()
	select {
	case <-t.C:
	case <-changed:
	case <-l.pr.done:
		return false
	}
	return true
}

// match returns the length of the prefix of chunk that ends with the
// first occurrence of pattern in tail+chunk that ends inside chunk, or -1.
func (l *link) match(chunk, pattern []byte) int {
	keep := min(len(l.tail), len(pattern)-1)
	s := append(bytes.Clone(l.tail[len(l.tail)-keep:]), chunk...)
	i := bytes.Index(s, pattern)
	if i < 0 {
		return -1
	}
	return i + len(pattern) - keep
}

// claim turns the PauseOn armed with hit into a pause, unless it was
// disarmed or another connection hit it first.
func (l *link) claim(hit chan struct{}) bool {
	p := l.pr.p
	p.mu.Lock()
	defer p.mu.Unlock()
	f := &p.dirs[l.dir]
	if f.pattern == nil || f.hit != hit {
		return false
	}
	*f = faults{paused: true}
	p.changedLocked(l.dir)
	return true
}

// remember keeps the last MaxPattern-1 bytes written.
func (l *link) remember(b []byte) {
	l.tail = append(l.tail, b...)
	if over := len(l.tail) - (MaxPattern - 1); over > 0 {
		l.tail = append(l.tail[:0], l.tail[over:]...)
	}
}
