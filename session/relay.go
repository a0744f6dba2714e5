package session

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/backend"
	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/pool"
	"github.com/imapproxy/imapproxy/upstream"
)

// cmdKind is what the relay needs to know of a command in flight.
type cmdKind uint8

const (
	kindOther    cmdKind = iota
	kindSelect           // SELECT, EXAMINE: selected on OK, unselected on NO
	kindDeselect         // CLOSE, UNSELECT: unselected on OK
	kindIdle             // IDLE
	kindInternal         // the proxy's own cleanup command
)

// pending is one command in flight. Commands are told apart by entry,
// not by tag: RFC 3501 lets a client reuse a tag, even while a command
// with it is in flight.
type pending struct {
	tag     string
	kind    cmdKind
	seq     uint64
	nonSync bool // carried a {n+} literal
}

// relay runs an authenticated session: the session goroutine copies
// client commands to the backend (clientLoop), the pump goroutine copies
// responses back. Both keep just enough state to know, at logout, whether
// the backend connection is back where a fresh login would leave it.
type relay struct {
	sess    *Session
	up      *upstream.Conn
	backend backend.Backend
	lease   *pool.Lease // up's slot of the budget, settled by giveBack
	user    string
	digest  pool.Digest
	born    time.Time
	log     hclog.Logger

	mu        sync.Mutex // guards the fields below
	inflight  []pending
	seq       uint64 // of the last entry in inflight
	selected  bool
	idling    bool   // IDLE sent and DONE not yet
	idleAcked bool   // the backend answered the IDLE with "+"
	dirty     string // why the connection cannot be cached; "" if it can
	litSeq    uint64 // the entry whose synchronising literal awaits "+"; 0 if none
	// uploading is set while the client sends a command's literals and
	// the lines between them: the backend waits for the client then, and
	// its silence is no sign of a hang (see armLocked).
	uploading bool
	armedAt   int64 // when the backend's read deadline was last set (unix ns); 0: not set
	// logoutTag is the tag of the client's LOGOUT, answered at the end.
	// Only the session goroutine uses it.
	logoutTag string
	stopping  bool   // the pump ends after the next internal reply
	internal  string // status of the internal command
	// passing is set while the pump passes on a tagged answer it has
	// taken off inflight: until that is at the client the relay is not
	// quiet (waitQuiet), or a LOGOUT's OK could overtake it.
	passing bool

	// trace, when an operator traces the user, records the protocol.
	trace atomic.Pointer[Tracer]
	sent  int64 // relayed to the client since the last flush; the pump's

	// running is set, under the session's wmu, once the relay owns the
	// client writer; before that only the session goroutine writes.
	running atomic.Bool
	// waiting is set while the client loop waits for the next command,
	// the one place a drain or an eviction may cut a read short.
	waiting atomic.Bool
	// ending is set once the client loop has ended: from then on the
	// session closes sockets under the pump itself (the client's when it
	// left, the backend's when an answer is still owed), and the pump's
	// failure that follows is that, not news about the backend.
	ending atomic.Bool
	// evictMsg is the last word of a session an operator or a backend
	// drain ends; the client loop says it at the next command boundary.
	evictMsg atomic.Pointer[imapwire.Status]

	litCh    chan bool     // "+" arrived (true) or the command was refused (false)
	progress chan struct{} // a command completed (edge, cap 1)
	pumpDone chan struct{}
	pumpErr  error
}

func (sess *Session) newRelay(up *upstream.Conn, b backend.Backend, l *pool.Lease, user string, d pool.Digest, born time.Time, log hclog.Logger) *relay {
	return &relay{
		sess: sess, up: up, backend: b, lease: l, user: user, digest: d, born: born,
		log:      log,
		litCh:    make(chan bool, 1),
		progress: make(chan struct{}, 1),
		pumpDone: make(chan struct{}),
	}
}

func (rl *relay) setDirty(why string) {
	rl.mu.Lock()
	if rl.dirty == "" {
		rl.dirty = why
	}
	rl.mu.Unlock()
}

// run relays until the session ends, then puts the upstream connection
// back in the pool or closes it.
func (rl *relay) run() {
	sess := rl.sess
	rl.up.SetWriteTimeout(sess.srv.options().writeTimeout())
	sess.wmu.Lock()
	err := sess.flush()
	rl.running.Store(true)
	sess.wmu.Unlock()
	defer sess.rl.Store(nil)
	// Every way out gives the connection back; this catches a panic's,
	// and does nothing after the others (a lease settles once).
	defer rl.giveBack(upAbort)
	if err != nil {
		rl.giveBack(upAbort)
		return
	}
	go rl.pump()
	end := rl.clientLoop()
	rl.finish(end)
}

// endKind says how a session ended from the client's side.
type endKind int

const (
	endLogout   endKind = iota // the client sent LOGOUT; answered
	endClient                  // the client went away or broke the protocol
	endPump                    // the backend side failed; the client was told
	endDraining                // server shutdown; the client was told
	endEvicted                 // an operator or a backend drain ended it; the client was told
)

// interrupted ends the session at a command boundary for a server
// shutdown or an eviction.
func (rl *relay) interrupted() (endKind, bool) {
	if msg := rl.evictMsg.Load(); msg != nil {
		rl.sayLast(*msg)
		return endEvicted, true
	}
	if rl.sess.draining.Load() {
		return rl.drainClient(), true
	}
	return 0, false
}

// wake makes the client loop look at a drain or an eviction now if it is
// waiting for a command; otherwise it will at its next boundary. A read
// in the middle of a command (an APPEND upload) is never cut short.
func (rl *relay) wake() {
	if rl.waiting.Load() {
		rl.sess.raw.SetReadDeadline(time.Now())
	}
}

func (rl *relay) clientLoop() endKind {
	sess := rl.sess
	o := sess.srv.options()
	r := sess.r
	for {
		rl.mu.Lock()
		idling := rl.idling
		rl.mu.Unlock()
		timeout := o.authIdleTimeout()
		if idling {
			timeout = o.idleTimeout()
		}
		sess.conn.SetReadDeadline(time.Now().Add(timeout))
		// Between commands, and only then, a drain or an eviction may
		// wake this wait (see wake): one that came before is seen here.
		rl.waiting.Store(true)
		if end, done := rl.interrupted(); done {
			rl.waiting.Store(false)
			return end
		}
		// Waiting here rather than in ReadLine keeps an idle session's
		// stack small (see imapwire.Reader.Wait).
		err := r.Wait()
		rl.waiting.Store(false)
		if err != nil {
			return rl.clientError(err)
		}
		line, lit, err := r.ReadLine()
		if tr := rl.trace.Load(); tr != nil && err == nil {
			tr.line(sess.id, rl.backend.ID, "C", line, lit)
		}
		if err != nil {
			var se *imapwire.SyntaxError
			switch {
			case errors.As(err, &se):
				rl.answer(replyTo(se, loggedIn, ""))
				continue
			case errors.Is(err, imapwire.ErrLineTooLong):
				rl.answer(replyTo(err, loggedIn, ""))
				continue
			}
			return rl.clientError(err)
		}
		if end, done := rl.command(line, lit, idling); done {
			return end
		}
	}
}

// command handles one client command line (and its literals), the
// session's whole work between two reads. Kept out of clientLoop so that a
// session waiting for its client holds only a small stack.
func (rl *relay) command(line []byte, lit *imapwire.Literal, idling bool) (end endKind, done bool) {
	sess := rl.sess
	o := sess.srv.options()
	if idling {
		// The server waits for DONE and nothing else.
		if !bytes.EqualFold(imapwire.TrimEOL(line), []byte("DONE")) {
			rl.setDirty("unexpected line in IDLE")
		}
		rl.mu.Lock()
		rl.idling = false
		rl.armLocked(true) // the IDLE's tagged answer is owed now
		rl.mu.Unlock()
		if lit != nil {
			rl.setDirty("literal in IDLE")
			return endClient, true
		}
		if err := rl.toUpstream(line, true); err != nil {
			return rl.upstreamError(err), true
		}
		return 0, false
	}
	tagB, rest, ok := imapwire.CutTag(line)
	// A copy now: line lives in a pooled buffer that the next read may
	// hand back or reuse, and the tag is needed after that.
	tag := string(tagB)
	if !ok {
		if !rl.skipLiterals(lit) {
			return endClient, true
		}
		rl.answer(badStatus("", "Invalid tag"))
		return 0, false
	}
	name, args := imapwire.CutAtom(rest)
	cmd := string(bytes.ToUpper(name))
	if cmd == "UID" {
		sub, _ := imapwire.CutAtom(args)
		cmd = "UID " + string(bytes.ToUpper(sub))
	}
	if rl.log.IsTrace() {
		// Never the arguments: they may hold anything.
		rl.log.Trace("command", "tag", tag, "command", cmd)
	}
	kind := kindOther
	switch cmd {
	case "LOGOUT", "STARTTLS", "COMPRESS", "UNAUTHENTICATE", "LOGIN", "AUTHENTICATE":
		// Answered here: what the client pipelined before must
		// reach the server first.
		if err := rl.flushUp(); err != nil {
			return rl.upstreamError(err), true
		}
	}
	switch cmd {
	case "LOGOUT":
		if lit != nil {
			if !rl.skipLiterals(lit) {
				return endClient, true
			}
			rl.answer(badStatus(tag, "LOGOUT takes no arguments"))
			return 0, false
		}
		return rl.logout(tag), true
	case "STARTTLS", "COMPRESS", "UNAUTHENTICATE", "LOGIN", "AUTHENTICATE":
		// TLS and authentication are the proxy's; a compressed or
		// unauthenticated stream cannot be relayed.
		if !rl.skipLiterals(lit) {
			return endClient, true
		}
		rl.answer(badStatus(tag, "Command not available in authenticated state"))
		return 0, false
	case "IDLE":
		kind = kindIdle
	case "SELECT", "EXAMINE":
		kind = kindSelect
	case "CLOSE", "UNSELECT":
		kind = kindDeselect
	default:
		if !stateless[cmd] {
			rl.setDirty(cmd)
		}
	}
	if lit != nil && noArgs[cmd] {
		// Dovecot runs such a literal's content as commands of their
		// own, which the proxy never sees and cannot track.
		rl.setDirty("literal on a command without arguments")
	}
	if lit != nil && lit.Size > o.maxLiteral() {
		if lit.NonSync {
			rl.answer(replyTo(imapwire.ErrNonSyncTooBig, loggedIn, ""))
			return endClient, true
		}
		rl.answer(replyTo(imapwire.ErrLiteralTooBig, loggedIn, tag))
		return 0, false
	}
	rl.scan(cmd, line)
	if end, done := rl.awaitRoom(); done {
		return end, true
	}
	sync := lit != nil && !lit.NonSync
	if sync {
		if end, done := rl.awaitTagFree(tag, 0); done {
			return end, true
		}
	}
	rl.mu.Lock()
	seq := rl.sendLocked(tag, kind, sync, lit != nil && lit.NonSync)
	rl.mu.Unlock()
	if err := rl.toUpstream(line, false); err != nil {
		return rl.upstreamError(err), true
	}
	uploaded := lit != nil
	for lit != nil {
		if !lit.NonSync {
			rl.setUploading(false)
			accepted, end, done := rl.awaitContinuation()
			if done {
				return end, true
			}
			if !accepted {
				// Refused: the client sends no literal.
				lit = nil
				continue
			}
		}
		rl.setUploading(true)
		if end, done := rl.copyLiteralUp(lit.Size); done {
			return end, true
		}
		if line, lit, end, done = rl.readContinuation(cmd); done {
			return end, true
		}
		if lit != nil && !lit.NonSync {
			if end, done := rl.awaitTagFree(tag, seq); done {
				return end, true
			}
			rl.mu.Lock()
			rl.litSeq = seq
			rl.mu.Unlock()
		}
		if lit != nil && lit.NonSync {
			rl.mu.Lock()
			rl.markNonSyncLocked(seq)
			rl.mu.Unlock()
		}
		if _, err := rl.up.Writer().Write(line); err != nil {
			return rl.upstreamError(err), true
		}
	}
	if uploaded {
		// The command is whole: its answer is owed.
		rl.setUploading(false)
	}
	// Pipelined commands go out in one write.
	if sess.r.Buffered() == 0 {
		if err := rl.flushUp(); err != nil {
			return rl.upstreamError(err), true
		}
	}
	return 0, false
}

// sendLocked notes a command about to go to the backend, whose answer is
// owed from now on; with literal, its synchronising literal awaits "+".
// The caller holds mu.
func (rl *relay) sendLocked(tag string, kind cmdKind, literal, nonSync bool) uint64 {
	for _, p := range rl.inflight {
		if p.tag == tag {
			// Which of the two a tagged answer ends is guesswork,
			// and so is the state it leaves.
			rl.dirtyLocked("tag reused while in flight")
			break
		}
	}
	rl.seq++
	rl.inflight = append(rl.inflight, pending{tag: tag, kind: kind, seq: rl.seq, nonSync: nonSync})
	if kind == kindIdle {
		rl.idling, rl.idleAcked = true, false
	}
	if literal {
		// Before the line goes out: the server may answer at once.
		rl.litSeq = rl.seq
	}
	rl.armLocked(true)
	return rl.seq
}

// markNonSyncLocked notes that the command seq carries a {n+} literal
// after all (in a later piece of its line).
func (rl *relay) markNonSyncLocked(seq uint64) {
	for i := range rl.inflight {
		if rl.inflight[i].seq == seq {
			rl.inflight[i].nonSync = true
		}
	}
}

// MaxInFlight bounds the commands a client may have in flight: a client
// that pipelines without reading answers would otherwise grow the list
// (and the time to search it) without end, held back only by the
// backend's pace. Webmails pipeline a handful.
const MaxInFlight = 1000

// awaitRoom waits, when MaxInFlight commands are in flight, until the
// backend has answered one.
func (rl *relay) awaitRoom() (end endKind, done bool) {
	return rl.awaitAnswers("no answer to pipelined commands", rl.sess.srv.options().responseTimeout(), func() bool {
		return len(rl.inflight) >= MaxInFlight
	})
}

// awaitTagFree waits, before a line announcing a synchronising literal
// goes out, until no command with the same tag but other than seq is in
// flight. Only then does a tagged answer with the tag, while the literal
// waits for "+", surely refuse the literal rather than end the other
// command. Clients that never reuse a tag do not wait.
func (rl *relay) awaitTagFree(tag string, seq uint64) (end endKind, done bool) {
	return rl.awaitAnswers("no answer to an earlier command with the same tag", rl.sess.srv.options().literalTimeout(), func() bool {
		for _, p := range rl.inflight {
			if p.tag == tag && p.seq != seq {
				return true
			}
		}
		return false
	})
}

// awaitAnswers sends what is buffered for the backend and waits, while
// blocked (checked under mu) holds, for the backend to answer commands:
// at most timeout, which ends the session as a backend failure (what).
func (rl *relay) awaitAnswers(what string, timeout time.Duration, blocked func() bool) (end endKind, done bool) {
	check := func() bool {
		rl.mu.Lock()
		defer rl.mu.Unlock()
		return blocked()
	}
	if !check() {
		return 0, false
	}
	if err := rl.flushUp(); err != nil {
		return rl.upstreamError(err), true
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for check() {
		select {
		case <-rl.progress:
		case <-rl.pumpDone:
			return endPump, true
		case <-t.C:
			return rl.upstreamError(errors.New(what)), true
		}
	}
	return 0, false
}

// awaitContinuation sends what is buffered for the backend and waits for
// its "+" to the synchronising literal noted in litSeq, or its refusal.
func (rl *relay) awaitContinuation() (accepted bool, end endKind, done bool) {
	if err := rl.flushUp(); err != nil {
		return false, rl.upstreamError(err), true
	}
	wait := time.NewTimer(rl.sess.srv.options().literalTimeout())
	defer wait.Stop()
	select {
	case ok := <-rl.litCh:
		return ok, 0, false
	case <-rl.pumpDone:
		return false, endPump, true
	case <-wait.C:
		// Neither accepted nor refused: the stream cannot be
		// trusted any more.
		return false, rl.upstreamError(errors.New("no continuation for a literal")), true
	}
}

// copyLiteralUp copies a literal of n bytes from the client to the
// backend. The client has the literal timeout to send it (more for a big
// one); the backend must take each write within the write timeout
// (upstream.Conn.Direct), so that one that stops reading is found
// however slow the client, and a slow client is never taken for a hung
// backend.
func (rl *relay) copyLiteralUp(n int64) (end endKind, done bool) {
	sess := rl.sess
	o := sess.srv.options()
	if err := rl.flushUp(); err != nil {
		return rl.upstreamError(err), true
	}
	// A big APPEND over a slow link gets 1s more per 64 KiB.
	sess.conn.SetReadDeadline(time.Now().Add(o.literalTimeout() + time.Duration(n>>16)*time.Second))
	dst := &literalDst{up: rl.up.Direct()}
	for n > 0 {
		k := min(n, literalChunk)
		m, err := sess.r.CopyLiteral(dst, k, sess.conn)
		sess.srv.Stats.BytesUp.Add(uint64(m))
		n -= m
		if err != nil {
			rl.setDirty("literal interrupted")
			if dst.err != nil {
				return rl.upstreamError(dst.err), true
			}
			return rl.clientError(err), true
		}
	}
	return 0, false
}

// literalDst is the backend's socket for a literal from the client: it
// remembers a failed write, which CopyLiteral does not tell from a failed
// read.
type literalDst struct {
	up  io.Writer
	err error
}

func (d *literalDst) Write(p []byte) (int, error) {
	n, err := d.up.Write(p)
	if err != nil {
		d.err = err
	}
	return n, err
}

// setUploading notes whether the client is sending a command's literals.
func (rl *relay) setUploading(on bool) {
	rl.mu.Lock()
	rl.uploading = on
	rl.armLocked(true)
	rl.mu.Unlock()
}

// readContinuation reads the rest of a command after one of its literals.
func (rl *relay) readContinuation(cmd string) (line []byte, lit *imapwire.Literal, end endKind, done bool) {
	line, lit, err := rl.sess.r.ReadLine()
	if err != nil {
		rl.setDirty("command interrupted")
		return nil, nil, rl.clientError(err), true
	}
	if tr := rl.trace.Load(); tr != nil {
		tr.line(rl.sess.id, rl.backend.ID, "C", line, lit)
	}
	if lit != nil && lit.Size > rl.sess.srv.options().maxLiteral() {
		// Half the command is with the server already.
		rl.setDirty("oversized literal")
		rl.answer(replyTo(imapwire.ErrNonSyncTooBig, loggedIn, ""))
		return nil, nil, endClient, true
	}
	rl.scan(cmd, line)
	return line, lit, 0, false
}

// noArgs lists the commands that take no arguments, so that a literal on
// one of them is not an argument at all.
var noArgs = map[string]bool{
	"CAPABILITY": true, "NOOP": true, "CHECK": true, "CLOSE": true, "UNSELECT": true,
	"EXPUNGE": true, "IDLE": true, "NAMESPACE": true,
}

// stateless lists the commands that change nothing on a connection that
// outlives the session, beyond the selected mailbox which is tracked. Any
// other command makes the connection uncacheable.
var stateless = map[string]bool{
	"CAPABILITY": true, "NOOP": true, "CHECK": true, "ID": true, "NAMESPACE": true,
	"CREATE": true, "DELETE": true, "RENAME": true, "SUBSCRIBE": true, "UNSUBSCRIBE": true,
	"LIST": true, "LSUB": true, "XLIST": true, "STATUS": true, "APPEND": true,
	"FETCH": true, "STORE": true, "COPY": true, "MOVE": true, "SEARCH": true,
	"SORT": true, "THREAD": true, "EXPUNGE": true, "REPLACE": true,
	"UID FETCH": true, "UID STORE": true, "UID COPY": true, "UID MOVE": true,
	"UID SEARCH": true, "UID SORT": true, "UID THREAD": true, "UID EXPUNGE": true,
	"GETQUOTA": true, "GETQUOTAROOT": true, "SETQUOTA": true,
	"GETACL": true, "SETACL": true, "DELETEACL": true, "LISTRIGHTS": true, "MYRIGHTS": true,
	"GETMETADATA": true, "SETMETADATA": true,
}

// Words that, anywhere in a command, switch on state that outlives the
// session: CONDSTORE is enabled implicitly by any of its modifiers
// (RFC 7162 3.1), SEARCHRES keeps a saved result, CONTEXT=SEARCH keeps
// updating. A false alarm (a mailbox called "modseq") costs a cached
// connection, nothing more.
var (
	stickyWords = [][]byte{[]byte("CONDSTORE"), []byte("QRESYNC"), []byte("MODSEQ"), []byte("CHANGEDSINCE")}
	searchWords = [][]byte{[]byte("SAVE"), []byte("UPDATE"), []byte("CONTEXT")}
)

func (rl *relay) scan(cmd string, line []byte) {
	var stack [256]byte
	up := stack[:0]
	if len(line) > len(stack) {
		up = make([]byte, 0, len(line))
	}
	for _, c := range line {
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		up = append(up, c)
	}
	for _, w := range stickyWords {
		if bytes.Contains(up, w) {
			rl.setDirty(string(w))
			return
		}
	}
	switch cmd {
	case "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD":
		for _, w := range searchWords {
			if bytes.Contains(up, w) {
				rl.setDirty(string(w))
				return
			}
		}
	}
}

// toUpstream writes a client line to the backend, flushing when nothing
// more is waiting from the client.
func (rl *relay) toUpstream(line []byte, flush bool) error {
	if _, err := rl.up.Writer().Write(line); err != nil {
		return err
	}
	if flush || rl.sess.r.Buffered() == 0 {
		return rl.flushUp()
	}
	return nil
}

// flushUp sends what is buffered for the backend, bounded by the write
// timeout (upstream.Conn.SetWriteTimeout) so that a backend that stops
// reading cannot hold the session.
func (rl *relay) flushUp() error {
	if rl.up.Writer().Buffered() == 0 {
		return nil
	}
	// Counted per flush, not per line: the counter is the whole server's.
	rl.sess.srv.Stats.BytesUp.Add(uint64(rl.up.Writer().Buffered()))
	return rl.up.Writer().Flush()
}

// skipLiterals consumes the literals of a command the proxy answers
// itself. A synchronising literal is never sent (no "+" was given), so
// only non-synchronising ones are read, and only up to the limit.
func (rl *relay) skipLiterals(lit *imapwire.Literal) bool {
	for lit != nil {
		if !lit.NonSync {
			return true
		}
		if lit.Size > rl.sess.srv.options().maxLiteral() {
			rl.answer(replyTo(imapwire.ErrNonSyncTooBig, loggedIn, ""))
			return false
		}
		if err := rl.sess.r.DiscardLiteral(lit.Size); err != nil {
			return false
		}
		var err error
		if _, lit, err = rl.sess.r.ReadLine(); err != nil {
			return false
		}
	}
	return true
}

// answer writes a response of the proxy's own to the client.
func (rl *relay) answer(st imapwire.Status) {
	sess := rl.sess
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.silenced {
		return
	}
	sess.reply(st)
	sess.flush()
}

// say writes the session's last words to the client and silences the
// relay, so nothing from the backend follows them.
func (rl *relay) say(sts ...imapwire.Status) {
	sess := rl.sess
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.silenced {
		return
	}
	sess.silenced = true
	for _, st := range sts {
		sess.reply(st)
	}
	sess.flush()
}

func (rl *relay) clientError(err error) endKind {
	var ne net.Error
	if rl.evictMsg.Load() != nil || errors.As(err, &ne) && ne.Timeout() {
		if end, done := rl.interrupted(); done {
			return end
		}
		rl.say(replyTo(errIdle, loggedIn, ""))
		rl.log.Debug("client timed out")
	} else {
		rl.log.Debug("client connection ended", "error", err)
	}
	return endClient
}

func (rl *relay) upstreamError(err error) endKind {
	rl.setDirty("backend write failed")
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		rl.say(replyTo(errBackendTimeout, loggedIn, ""))
		rl.log.Warn("backend not reading; session ended", "timeout", rl.sess.srv.options().writeTimeout())
		return endPump
	}
	rl.say(replyTo(errBackendLost, loggedIn, ""))
	rl.log.Warn("backend write failed", "error", err)
	return endPump
}

// waitQuiet waits until no client command is in flight, the pump ends,
// or the timeout passes.
func (rl *relay) waitQuiet(timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		rl.mu.Lock()
		quiet := len(rl.inflight) == 0 && !rl.passing
		rl.mu.Unlock()
		if quiet {
			return true
		}
		select {
		case <-rl.progress:
		case <-rl.pumpDone:
			return false
		case <-t.C:
			return false
		}
	}
}

// logout answers the client's LOGOUT once everything it asked before has
// been answered.
func (rl *relay) logout(tag string) endKind {
	if !rl.waitQuiet(rl.sess.srv.options().logoutWait()) {
		rl.setDirty("commands outstanding at logout")
	}
	rl.logoutTag = tag
	return endLogout
}

// drainClient ends the session for a server shutdown, at a command
// boundary: an IDLE is ended for the client, outstanding commands are
// answered first.
func (rl *relay) drainClient() endKind {
	rl.flushUp()
	rl.mu.Lock()
	idling := rl.idling
	rl.idling = false
	rl.armLocked(true) // the IDLE's answer is owed once DONE goes out
	rl.mu.Unlock()
	if idling {
		rl.up.Writer().WriteString("DONE\r\n")
		rl.flushUp()
	}
	rl.waitQuiet(rl.sess.srv.options().logoutWait())
	rl.say(replyTo(errShutdown, loggedIn, ""))
	return endDraining
}

func (rl *relay) drain() { rl.wake() }

// evict ends the session for an operator or a backend drain. A session
// that owes the backend nothing ends at its command boundary, and its
// backend connection is logged out cleanly (an IDLE ended with DONE);
// one waiting on the backend is cut off at once, since that backend may
// be the reason for the eviction and never answer. Either way the
// session says its last words and ends on its own goroutine: an eviction
// never waits on a client, so a drain of many sessions takes no longer
// for the few whose clients do not read.
func (rl *relay) evict(msg imapwire.Status) {
	rl.setDirty("evicted")
	rl.evictMsg.Store(&msg)
	rl.mu.Lock()
	owed := rl.owedLocked()
	rl.mu.Unlock()
	if owed {
		// The backend first: a pump stuck reading a stalled backend
		// holds the client writer, and must let go of it. Then any
		// read of the client's, even mid-command: the session ends.
		rl.up.Abort()
		rl.sess.raw.SetReadDeadline(time.Now())
		return
	}
	rl.wake()
}

// sayLast writes an eviction's last words, bounded short: the session
// ends whether the client reads them or not.
func (rl *relay) sayLast(msg imapwire.Status) {
	sess := rl.sess
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if !rl.running.Load() || sess.silenced {
		return
	}
	sess.silenced = true
	sess.evicted = true // bounds the write to lastWordsTimeout
	sess.reply(msg)
	sess.w.Flush()
}

// finish decides the fate of the upstream connection: back to the pool
// only if provably clean, else logged out and closed.
func (rl *relay) finish(end endKind) {
	rl.ending.Store(true)
	reason, selected := rl.uncacheable(end)
	// A clean session that logged out keeps its client until the backend
	// connection is back in the pool, so that the same user's next login,
	// often a moment later, finds it. Otherwise the client goes first.
	holdClient := end == endLogout && reason == ""
	if !holdClient {
		rl.mu.Lock()
		owed := rl.owedLocked()
		rl.mu.Unlock()
		if reason != "" && owed {
			// A pump waiting on the backend may hold the client
			// writer: cut the backend off first, so that a client
			// that leaves mid-answer frees everything at once.
			rl.up.Abort()
		}
		rl.bye()
	}
	how := upAbort
	if reason != "" {
		rl.log.Debug("not caching backend connection", "reason", reason)
		rl.close()
	} else if reason, how = rl.clean(selected); reason != "" {
		rl.log.Debug("not caching backend connection", "reason", reason)
	}
	rl.giveBack(how)
	if holdClient {
		rl.bye()
	}
}

// bye gives the client its last words, if any are due, and closes it.
func (rl *relay) bye() {
	rl.sess.srv.Host.LeftUser(rl.sess)
	if rl.logoutTag != "" {
		rl.say(statusLogout, okStatus(rl.logoutTag, "LOGOUT completed"))
	} else {
		// Nothing more is due: closing first makes a pump blocked
		// writing to a client that does not read let go of the writer.
		rl.sess.raw.Close()
	}
	sess := rl.sess
	sess.wmu.Lock()
	sess.silenced = true
	sess.wmu.Unlock()
	sess.conn.Close()
}

// uncacheable says why the backend connection cannot be cached, or "".
func (rl *relay) uncacheable(end endKind) (reason string, selected bool) {
	rl.mu.Lock()
	reason = rl.dirty
	switch {
	case end == endPump:
		reason = "backend connection failed"
	case reason != "":
	case rl.idling:
		reason = "in IDLE"
	case len(rl.inflight) > 0:
		reason = "command in flight"
	}
	selected = rl.selected
	rl.mu.Unlock()
	select {
	case <-rl.pumpDone:
		if reason == "" {
			reason = "backend connection failed"
		}
	default:
	}
	if reason == "" && !rl.sess.srv.backends().Serves(rl.backend) {
		reason = "backend left the set"
	}
	return reason, selected
}

// clean brings the backend connection back to the state of a fresh login.
// It says how to give the connection back: cached, or with the reason it
// cannot be and how it is closed.
func (rl *relay) clean(selected bool) (reason string, how upEnd) {
	// Leave the mailbox without expunging, whatever the relay believes;
	// the answer checks the belief (see CleanupCommand).
	cmd, want := rl.up.CleanupCommand(selected)
	status, err := rl.internalCommand(cmd)
	rl.mu.Lock()
	dirty := rl.dirty
	rl.mu.Unlock()
	// upAbort: the stream is in doubt, and a LOGOUT would only wait.
	switch {
	case dirty != "":
		return dirty, upLogout
	case err != nil:
		return "cleanup failed: " + err.Error(), upAbort
	case status != want:
		return "cleanup answered " + status, upLogout
	case rl.up.Reader().Buffered() > 0:
		return "unread data", upAbort
	case rl.sess.srv.Host.KickedSince(rl.user, rl.born):
		return "user kicked by an operator", upLogout
	}
	return "", upCache
}

// upEnd is what becomes of the backend connection when its session is
// done with it.
type upEnd int

const (
	upCache  upEnd = iota // clean: cached for the user's next login
	upLogout              // closed with a LOGOUT, in the background
	upAbort               // closed at once: its stream is in doubt, or it has logged out
)

// giveBack hands the backend connection and its slot of the budget back to
// the pool: the one place a session does once it has a relay. The lease
// settles once, so a second call does nothing.
func (rl *relay) giveBack(how upEnd) {
	switch how {
	case upCache:
		// Once cached the connection is the pool's: an eviction of
		// this session must no longer find it.
		rl.sess.rl.Store(nil)
		rl.lease.Put(rl.user, rl.digest, rl.up, rl.born)
		if rl.sess.srv.Host.KickedSince(rl.user, rl.born) {
			// A kick that came between the check in clean and the
			// Put found neither this session nor the cached
			// connection.
			rl.lease.Table().CloseUser(rl.user)
		}
	case upLogout:
		rl.lease.Discard(rl.up)
	default:
		rl.lease.Abort(rl.up)
	}
}

// internalCommand sends a command of the proxy's own and lets the pump
// stop after its tagged reply, so the proxy again owns the reader.
func (rl *relay) internalCommand(cmd string) (string, error) {
	tag := rl.up.NextTag()
	rl.mu.Lock()
	rl.seq++
	rl.inflight = append(rl.inflight, pending{tag: tag, kind: kindInternal, seq: rl.seq})
	rl.stopping = true
	rl.mu.Unlock()
	rl.up.WriteCommand(tag, cmd)
	if err := rl.flushUp(); err != nil {
		rl.up.Abort()
		<-rl.pumpDone
		return "", err
	}
	<-rl.pumpDone
	rl.up.NetConn().SetDeadline(time.Time{})
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.internal == "" {
		if rl.pumpErr == nil {
			return "", upstream.ErrUnexpected
		}
		return "", rl.pumpErr
	}
	return rl.internal, nil
}

// close logs the upstream connection out when that can be done cleanly,
// else cuts it off; the caller then gives it back with upAbort.
func (rl *relay) close() {
	select {
	case <-rl.pumpDone:
		return
	default:
	}
	rl.mu.Lock()
	idling := rl.idling
	busy := rl.owedLocked()
	rl.mu.Unlock()
	if busy {
		// The pump waits on the backend: cut it off to end the pump.
		rl.up.Abort()
		<-rl.pumpDone
		return
	}
	if idling {
		rl.up.Writer().WriteString("DONE\r\n")
	}
	rl.internalCommand("LOGOUT")
}

// pump copies backend responses to the client.
func (rl *relay) pump() {
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				rl.log.Error("relay panic", "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				err = fmt.Errorf("panic: %v", p)
				rl.setDirty("panic")
			}
		}()
		err = rl.pumpLoop()
	}()
	rl.mu.Lock()
	rl.pumpErr = err
	stopping, evicted := rl.stopping, rl.evictMsg.Load() != nil
	rl.mu.Unlock()
	if err != nil && !stopping && !evicted {
		var ne net.Error
		switch {
		case rl.ending.Load():
			// The session ended on the client's side and closed
			// sockets under the pump: no news about the backend.
			rl.log.Debug("backend connection closed with the session", "error", err)
		case errors.Is(err, errClientGone):
			rl.log.Debug("client connection lost", "error", err)
			rl.say(replyTo(errBackendLost, loggedIn, ""))
		case errors.As(err, &ne) && ne.Timeout():
			rl.log.Warn("backend not responding; session ended", "timeout", rl.sess.srv.options().responseTimeout())
			rl.say(replyTo(errBackendTimeout, loggedIn, ""))
		default:
			rl.log.Warn("backend connection lost", "error", err)
			rl.say(replyTo(errBackendLost, loggedIn, ""))
		}
		// Wake the client reader.
		rl.sess.conn.Close()
	}
	close(rl.pumpDone)
}

func (rl *relay) pumpLoop() error {
	r := rl.up.Reader()
	for {
		rl.mu.Lock()
		rl.armLocked(false)
		rl.mu.Unlock()
		if err := r.Wait(); err != nil {
			return err
		}
		line, more, lit, err := r.ReadPart()
		if err != nil {
			return err
		}
		if tr := rl.trace.Load(); tr != nil {
			tr.line(rl.sess.id, rl.backend.ID, "S", line, lit)
		}
		forward, stop, text := true, false, false
		switch {
		case line[0] == '+':
			rl.continuation()
			text = true
		case line[0] == '*':
			l := imapwire.TrimEOL(line)
			switch {
			case hasPrefixFold(l, "* BYE"):
				rl.setDirty("server said BYE")
				text = true
			case hasPrefixFold(l, "* ENABLED"):
				rl.setDirty("ENABLE")
			case hasPrefixFold(l, "* OK"), hasPrefixFold(l, "* CAPABILITY"):
				text = true
				if hasPrefixFold(l, "* OK [CLOSED]") {
					// The mailbox is left, even when the command
					// that left it then fails (Dovecot: a SELECT
					// refused with BAD for a bad modifier).
					rl.mu.Lock()
					rl.selected = false
					rl.mu.Unlock()
				}
				if !more {
					line = filterCaps(line)
				}
			case hasPrefixFold(l, "* BAD"):
				// A command line the backend could not even place: what
				// it then ran, and what it answers, is guesswork.
				rl.setDirty("untagged BAD")
				text = true
			case hasPrefixFold(l, "* NO"), hasPrefixFold(l, "* PREAUTH"):
				text = true
			}
		default:
			forward, stop = rl.tagged(line)
			text = true
			if !more && forward {
				line = filterCaps(line)
			}
		}
		if err := rl.forward(line, more, lit, forward, text); err != nil {
			return err
		}
		rl.mu.Lock()
		if rl.passing {
			// Again, for waitQuiet: the answer is at the client now.
			rl.passing = false
			select {
			case rl.progress <- struct{}{}:
			default:
			}
		}
		rl.mu.Unlock()
		if stop {
			return nil
		}
	}
}

// armLocked keeps a read deadline on the backend while it owes an answer:
// a command is in flight, other than an IDLE it has acknowledged. The
// deadline moves with every sign of progress (fresh, or at most once a
// second or a quarter of the timeout otherwise), so a long answer that
// keeps flowing is never cut, and a backend that stops mid-answer (a
// stopped process, an NFS stall, a black-holed route) cannot hold the
// session, its client and its slot for ever. A backend that owes nothing
// may stay silent: a session in IDLE waits as long as its client does.
// So may one waiting for a client's literal: the client has the literal
// timeout, and the backend's writes their own deadlines (copyLiteralUp).
// The caller holds mu: the deadline always matches what is in flight,
// whichever goroutine changed that.
func (rl *relay) armLocked(fresh bool) {
	if rl.stopping {
		// The proxy's own last command has its deadline.
		return
	}
	if !rl.owedLocked() || rl.uploading {
		if rl.armedAt != 0 {
			rl.armedAt = 0
			rl.up.NetConn().SetReadDeadline(time.Time{})
		}
		return
	}
	now := time.Now()
	timeout := rl.sess.srv.options().responseTimeout()
	// Moving the deadline costs a syscall, so progress moves it at most
	// once a second; but always several times per timeout, or a short
	// timeout would cut an answer that keeps flowing.
	if every := min(time.Second, timeout/4); !fresh && rl.armedAt != 0 && now.UnixNano()-rl.armedAt < int64(every) {
		return
	}
	rl.armedAt = now.UnixNano()
	rl.up.NetConn().SetReadDeadline(now.Add(timeout))
}

func (rl *relay) idleInFlightLocked() bool {
	for _, p := range rl.inflight {
		if p.kind == kindIdle {
			return true
		}
	}
	return false
}

// owedLocked reports whether the backend owes an answer: a command is in
// flight other than an IDLE it has acknowledged.
func (rl *relay) owedLocked() bool {
	for _, p := range rl.inflight {
		if p.kind != kindIdle || !rl.idling || !rl.idleAcked {
			return true
		}
	}
	return false
}

// progressed re-arms the backend's deadline during a long answer.
func (rl *relay) progressed() {
	rl.mu.Lock()
	rl.armLocked(false)
	rl.mu.Unlock()
}

// continuation takes a "+" from the backend: the go-ahead for the
// literal the client loop waits on, or the IDLE's acknowledgement.
// Anything else is a "+" nobody asked for, and the stream is in doubt.
func (rl *relay) continuation() {
	rl.mu.Lock()
	defer rl.mu.Unlock()
	switch {
	case rl.litSeq != 0:
		rl.litSeq = 0
		rl.signalLit(true)
	case !rl.idleAcked && rl.idleInFlightLocked():
		// Also when the client sent DONE before the "+" came.
		rl.idleAcked = true
	default:
		rl.dirtyLocked("unexpected continuation request")
	}
}

// tagged updates the state for a command's completion. It reports
// whether to pass the line on and whether the pump must stop now.
func (rl *relay) tagged(line []byte) (forward, stop bool) {
	tag, rest, ok := imapwire.CutTag(line)
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if !ok {
		rl.dirtyLocked("malformed response")
		return true, false
	}
	st, _ := imapwire.CutAtom(rest)
	status := string(bytes.ToUpper(st))
	// The oldest command with the tag: a client that reuses tags has
	// made the connection uncacheable already (sendLocked), and the
	// relay only needs the answer to reach the client.
	i := -1
	for j, p := range rl.inflight {
		if p.tag == string(tag) {
			i = j
			break
		}
	}
	if i < 0 {
		rl.dirtyLocked("response to unknown tag")
		return true, false
	}
	p := rl.inflight[i]
	rl.inflight = append(rl.inflight[:i], rl.inflight[i+1:]...)
	rl.passing = true
	if rl.litSeq != 0 && p.seq == rl.litSeq {
		// A command whose literal waits for "+" was refused; no
		// other command with its tag is in flight (awaitTagFree).
		rl.litSeq = 0
		rl.signalLit(false)
	}
	select {
	case rl.progress <- struct{}{}:
	default:
	}
	if status == "BAD" && p.nonSync {
		// A command refused before its {n+} literal was read as one:
		// Dovecot skips to the end of the line it failed on and runs
		// the literal's bytes as commands the relay never saw.
		rl.dirtyLocked("BAD to a command with a non-synchronising literal")
	}
	switch p.kind {
	case kindSelect:
		// OK selects; NO deselects (RFC 3501 6.3.1); BAD was not
		// executed and changes nothing.
		switch status {
		case "OK":
			rl.selected = true
		case "NO":
			rl.selected = false
		}
	case kindDeselect:
		if status == "OK" {
			rl.selected = false
		}
	case kindIdle:
		rl.idling, rl.idleAcked = false, false
	case kindInternal:
		rl.internal = status
		return false, rl.stopping
	}
	return true, false
}

func (rl *relay) dirtyLocked(why string) {
	if rl.dirty == "" {
		rl.dirty = why
	}
}

func (rl *relay) signalLit(ok bool) {
	select {
	case rl.litCh <- ok:
	default:
	}
}

// forward passes one response, long lines and literals and all, to the
// client, or swallows it once the client has been said goodbye to.
// Literal bytes are copied in bulk, never looked at, and a line longer
// than the buffer is passed on part by part: IMAP responses have no
// length limit. A status response (text) has free text at its end, where
// a literal announcement is not one, and which only a confused or hostile
// backend would make look like one.
func (rl *relay) forward(line []byte, more bool, lit *imapwire.Literal, pass, text bool) error {
	sess := rl.sess
	up := rl.up
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	out := pass && !sess.silenced
	for {
		if out {
			if _, err := sess.w.Write(line); err != nil {
				return clientGone(err)
			}
			rl.sent += int64(len(line))
		}
		if more {
			rl.progressed()
			var err error
			if line, more, lit, err = up.Reader().ReadPart(); err != nil {
				return err
			}
			continue
		}
		if lit != nil && text {
			rl.setDirty("literal announced in response text")
			lit = nil
		}
		if lit == nil {
			break
		}
		if out {
			// The literal's first bytes came in with its line: they go
			// out in the same write as the line, and a small literal
			// (a header, a flag list) costs no write of its own.
			head := up.Reader().Take(int(min(lit.Size, int64(sess.w.Available()))))
			if _, err := sess.w.Write(head); err != nil {
				return clientGone(err)
			}
			rl.sent += lit.Size // or near it, if the copy fails
			if rest := lit.Size - int64(len(head)); rest > 0 {
				if err := sess.flush(); err != nil {
					return clientGone(err)
				}
				if err := rl.copyToClient(rest); err != nil {
					return err
				}
			}
		} else if err := rl.discardLiteral(lit.Size); err != nil {
			return err
		}
		var err error
		line, more, lit, err = up.Reader().ReadPart()
		if err != nil {
			return err
		}
		if tr := rl.trace.Load(); tr != nil {
			tr.line(sess.id, rl.backend.ID, "S", line, lit)
		}
		text = false
	}
	if out && up.Reader().Buffered() == 0 {
		// Counted per burst, not per line: the counter is the whole
		// server's.
		sess.srv.Stats.BytesDown.Add(uint64(rl.sent))
		rl.sent = 0
		if err := sess.flush(); err != nil {
			return clientGone(err)
		}
	}
	return nil
}

// literalChunk is how much of a literal must get through within one
// timeout: a peer that stops is cut off after the timeout, however big
// the literal, and a slow one only needs to keep moving.
const literalChunk = 1 << 20

// copyToClient copies n literal bytes from the backend to the client in
// bulk (splice where the kernel can), chunk by chunk under the write
// timeout toward the client and the response timeout toward the backend.
func (rl *relay) copyToClient(n int64) error {
	sess, up := rl.sess, rl.up
	for n > 0 {
		k := min(n, literalChunk)
		rl.progressed()
		deadline := time.Now().Add(sess.srv.options().writeTimeout())
		sess.conn.SetWriteDeadline(deadline)
		m, err := up.Reader().CopyLiteral(sess.conn, k, up.NetConn())
		n -= m
		if err != nil {
			return attribute(err, deadline, up.NetConn())
		}
	}
	return nil
}

// discardLiteral skips a literal for a client that has been said goodbye
// to, under the same deadline as one passed on.
func (rl *relay) discardLiteral(n int64) error {
	for n > 0 {
		k := min(n, literalChunk)
		rl.progressed()
		if err := rl.up.Reader().DiscardLiteral(k); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// attribute tells whose fault a failed copy from the backend to the
// client was, for the log and the client's last words. The kernel's splice
// names neither side. A broken pipe is what writing to a client that left
// gives. A reset comes from either side: it is the backend's if its socket
// now fails a read too. A timeout is the backend's read deadline if the
// client's write deadline has not passed; if both have (a backend silent
// for timeouts.response outlasts a chunk's timeouts.write, 60s of 120s by
// default), it is the backend's if the backend has nothing to give.
func attribute(err error, clientDeadline time.Time, backend net.Conn) error {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.EPIPE):
		return clientGone(err)
	case errors.Is(err, syscall.ECONNRESET):
		if probe(backend) == probeBroken {
			return err
		}
		return clientGone(err)
	case errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(clientDeadline):
		if probe(backend) != probeData {
			return err
		}
		return clientGone(err)
	}
	return err
}

// What a read of a connection the session is giving up on finds.
const (
	probeData   = iota // bytes were waiting: the peer is alive and sending
	probeIdle          // nothing within probeWait
	probeBroken        // an error at once: reset or closed
)

// probe reads a byte of c, which the session is giving up on (what is
// read is lost, as is the connection), to tell how its peer is.
func probe(c net.Conn) int {
	c.SetReadDeadline(time.Now().Add(probeWait))
	var b [1]byte
	n, err := c.Read(b[:])
	var ne net.Error
	switch {
	case n > 0:
		return probeData
	case errors.As(err, &ne) && ne.Timeout():
		return probeIdle
	}
	return probeBroken
}

// probeWait is how long probe waits on a connection that is idle.
const probeWait = 5 * time.Millisecond

var errClientGone = errors.New("client connection lost")

func clientGone(err error) error { return errors.Join(errClientGone, err) }
