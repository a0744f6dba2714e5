package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/imapwire"
	"github.com/imapproxy/imapproxy/pool"
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

type pending struct {
	tag  string
	kind cmdKind
}

// relay runs an authenticated session: the session goroutine copies
// client commands to the backend (clientLoop), the pump goroutine copies
// responses back. Both keep just enough state to know, at logout, whether
// the backend connection is back where a fresh login would leave it.
type relay struct {
	sess    *session
	up      *upstream
	backend Backend
	table   *pool.Table
	user    string
	digest  pool.Digest
	born    time.Time
	log     hclog.Logger

	mu       sync.Mutex // guards the fields below
	inflight []pending
	selected bool
	idling   bool   // IDLE sent and DONE not yet
	dirty    string // why the connection cannot be cached; "" if it can
	litTag   string // a synchronising literal of this command awaits "+"
	// logoutTag is the tag of the client's LOGOUT, answered at the end.
	// Only the session goroutine uses it.
	logoutTag string
	stopping  bool   // the pump ends after the next internal reply
	internal  string // status of the internal command

	// trace, when an operator traces the user, records the protocol.
	trace atomic.Pointer[tracer]
	sent  int64 // relayed to the client since the last flush; the pump's

	// running is set, under the session's wmu, once the relay owns the
	// client writer; before that only the session goroutine writes.
	running atomic.Bool

	litCh    chan bool     // "+" arrived (true) or the command was refused (false)
	quiet    chan struct{} // nothing in flight any more (edge, cap 1)
	pumpDone chan struct{}
	pumpErr  error
}

func (sess *session) newRelay(up *upstream, b Backend, t *pool.Table, user string, d pool.Digest, born time.Time, log hclog.Logger) *relay {
	return &relay{
		sess: sess, up: up, backend: b, table: t, user: user, digest: d, born: born,
		log:      log,
		litCh:    make(chan bool, 1),
		quiet:    make(chan struct{}, 1),
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
	sess.wmu.Lock()
	err := sess.flush()
	rl.running.Store(true)
	sess.wmu.Unlock()
	defer sess.rl.Store(nil)
	if err != nil {
		rl.up.abort()
		rl.release()
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
)

func (rl *relay) clientLoop() endKind {
	sess := rl.sess
	o := sess.srv.options()
	r := sess.r
	for {
		if sess.draining.Load() {
			return rl.drainClient()
		}
		rl.mu.Lock()
		idling := rl.idling
		rl.mu.Unlock()
		timeout := o.authIdleTimeout()
		if idling {
			timeout = o.idleTimeout()
		}
		sess.conn.SetReadDeadline(time.Now().Add(timeout))
		// Waiting here rather than in ReadLine keeps an idle session's
		// stack small (see imapwire.Reader.Wait).
		if err := r.Wait(); err != nil {
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
				rl.answer("* BAD Error in IMAP command: " + se.Msg)
				continue
			case errors.Is(err, imapwire.ErrLineTooLong):
				rl.answer("* BAD Command line too long")
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
	r := sess.r
	var err error
	if idling {
		// The server waits for DONE and nothing else.
		if !bytes.EqualFold(imapwire.TrimEOL(line), []byte("DONE")) {
			rl.setDirty("unexpected line in IDLE")
		}
		rl.mu.Lock()
		rl.idling = false
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
		rl.answer("* BAD Invalid tag")
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
			rl.answer(tag + " BAD LOGOUT takes no arguments")
			return 0, false
		}
		return rl.logout(tag), true
	case "STARTTLS", "COMPRESS", "UNAUTHENTICATE", "LOGIN", "AUTHENTICATE":
		// TLS and authentication are the proxy's; a compressed or
		// unauthenticated stream cannot be relayed.
		if !rl.skipLiterals(lit) {
			return endClient, true
		}
		rl.answer(tag + " BAD Command not available in authenticated state")
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
	if lit != nil && lit.Size > o.maxLiteral() {
		if lit.NonSync {
			rl.answer("* BYE [TOOBIG] Literal too big")
			return endClient, true
		}
		rl.answer(tag + " NO [TOOBIG] Literal too big")
		return 0, false
	}
	rl.scan(cmd, line)
	rl.mu.Lock()
	rl.inflight = append(rl.inflight, pending{tag: tag, kind: kind})
	if kind == kindIdle {
		rl.idling = true
	}
	rl.expectLiteralLocked(tag, lit)
	rl.mu.Unlock()
	if err := rl.toUpstream(line, false); err != nil {
		return rl.upstreamError(err), true
	}
	for lit != nil {
		if !lit.NonSync {
			if err := rl.flushUp(); err != nil {
				return rl.upstreamError(err), true
			}
			wait := time.NewTimer(o.literalTimeout())
			select {
			case ok := <-rl.litCh:
				wait.Stop()
				if !ok {
					// Refused: the client sends no literal.
					lit = nil
					continue
				}
			case <-rl.pumpDone:
				wait.Stop()
				return endPump, true
			case <-wait.C:
				// Neither accepted nor refused: the stream cannot be
				// trusted any more.
				return rl.upstreamError(errors.New("no continuation for a literal")), true
			}
		}
		if err := rl.flushUp(); err != nil {
			return rl.upstreamError(err), true
		}
		// A big APPEND over a slow link gets 1s more per 64 KiB.
		litDeadline := time.Now().Add(o.literalTimeout() + time.Duration(lit.Size>>16)*time.Second)
		sess.conn.SetReadDeadline(litDeadline)
		rl.up.conn.SetWriteDeadline(litDeadline)
		var n int64
		n, err = r.CopyLiteral(rl.up.conn, lit.Size, sess.conn)
		sess.srv.stats.bytesUp.Add(uint64(n))
		if err != nil {
			rl.setDirty("literal interrupted")
			return rl.clientError(err), true
		}
		rl.up.conn.SetWriteDeadline(time.Time{})
		line, lit, err = r.ReadLine()
		if err != nil {
			rl.setDirty("command interrupted")
			return rl.clientError(err), true
		}
		if tr := rl.trace.Load(); tr != nil {
			tr.line(sess.id, rl.backend.ID, "C", line, lit)
		}
		if lit != nil && lit.Size > o.maxLiteral() {
			// Half the command is with the server already.
			rl.setDirty("oversized literal")
			rl.answer("* BYE [TOOBIG] Literal too big")
			return endClient, true
		}
		rl.scan(cmd, line)
		rl.mu.Lock()
		rl.expectLiteralLocked(tag, lit)
		rl.mu.Unlock()
		if _, err := rl.up.w.Write(line); err != nil {
			return rl.upstreamError(err), true
		}
	}
	// Pipelined commands go out in one write.
	if r.Buffered() == 0 {
		if err := rl.flushUp(); err != nil {
			return rl.upstreamError(err), true
		}
	}
	return 0, false
}

// expectLiteralLocked notes, before a line announcing a synchronising
// literal goes out, that the server's "+" or refusal must be passed to the
// client loop: the server may answer before the loop starts waiting.
func (rl *relay) expectLiteralLocked(tag string, lit *imapwire.Literal) {
	if lit != nil && !lit.NonSync {
		rl.litTag = tag
	}
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
	if _, err := rl.up.w.Write(line); err != nil {
		return err
	}
	if flush || rl.sess.r.Buffered() == 0 {
		return rl.flushUp()
	}
	return nil
}

// flushUp sends what is buffered for the backend, bounded by the write
// timeout so that a backend that stops reading cannot hold the session.
func (rl *relay) flushUp() error {
	if rl.up.w.Buffered() == 0 {
		return nil
	}
	rl.up.conn.SetWriteDeadline(time.Now().Add(rl.sess.srv.options().writeTimeout()))
	// Counted per flush, not per line: the counter is the whole server's.
	rl.sess.srv.stats.bytesUp.Add(uint64(rl.up.w.Buffered()))
	return rl.up.w.Flush()
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
			rl.answer("* BYE [TOOBIG] Literal too big")
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
func (rl *relay) answer(line string) {
	sess := rl.sess
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.silenced {
		return
	}
	sess.w.WriteString(line)
	sess.w.WriteString("\r\n")
	sess.flush()
}

// say writes the session's last words to the client and silences the
// relay, so nothing from the backend follows them.
func (rl *relay) say(lines ...string) {
	sess := rl.sess
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	if sess.silenced {
		return
	}
	sess.silenced = true
	for _, l := range lines {
		sess.w.WriteString(l)
		sess.w.WriteString("\r\n")
	}
	sess.flush()
}

func (rl *relay) clientError(err error) endKind {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if rl.sess.draining.Load() {
			return rl.drainClient()
		}
		rl.say("* BYE Autologout; idle for too long")
		rl.log.Debug("client timed out")
	} else {
		rl.log.Debug("client connection ended", "error", err)
	}
	return endClient
}

func (rl *relay) upstreamError(err error) endKind {
	rl.setDirty("backend write failed")
	rl.say("* BYE Connection to IMAP server lost")
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
		n := len(rl.inflight)
		rl.mu.Unlock()
		if n == 0 {
			return true
		}
		select {
		case <-rl.quiet:
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
	rl.mu.Unlock()
	if idling {
		rl.up.w.WriteString("DONE\r\n")
		rl.flushUp()
	}
	rl.waitQuiet(rl.sess.srv.options().logoutWait())
	rl.say("* BYE Server shutting down")
	return endDraining
}

func (rl *relay) drain() {
	// Wake the client reader; it sees draining and ends at a boundary.
	rl.sess.raw.SetReadDeadline(time.Now())
}

// finish decides the fate of the upstream connection: back to the pool
// only if provably clean, else logged out and closed.
func (rl *relay) finish(end endKind) {
	reason, selected := rl.uncacheable(end)
	// A clean session that logged out keeps its client until the backend
	// connection is back in the pool, so that the same user's next login,
	// often a moment later, finds it. Otherwise the client goes first.
	holdClient := end == endLogout && reason == ""
	if !holdClient {
		rl.bye()
	}
	if reason != "" {
		rl.log.Debug("not caching backend connection", "reason", reason)
		rl.close()
		return
	}
	rl.cleanAndPut(selected)
	if holdClient {
		rl.bye()
	}
}

// bye gives the client its last words, if any are due, and closes it.
func (rl *relay) bye() {
	rl.sess.srv.leaveUser(rl.sess)
	if rl.logoutTag != "" {
		rl.say("* BYE Logging out", rl.logoutTag+" OK LOGOUT completed")
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
	if reason == "" && !rl.sess.srv.backends.Load().serves(rl.backend) {
		reason = "backend left the set"
	}
	return reason, selected
}

// cleanAndPut brings the backend connection back to the state of a fresh
// login and caches it, or closes it if that cannot be proven.
func (rl *relay) cleanAndPut(selected bool) {
	// Leave the mailbox without expunging (never CLOSE), so the next
	// session starts unselected as on a fresh login.
	cmd, want := "NOOP", "OK"
	if selected {
		if hasCap(rl.up.postCaps, "UNSELECT") {
			cmd = "UNSELECT"
		} else {
			// A failed EXAMINE leaves no mailbox selected (RFC 3501 6.3.1).
			cmd, want = "EXAMINE \"imapproxy/\\\"nonexistent\\\"/"+rl.up.nextTag()+"\"", "NO"
		}
	}
	status, err := rl.internalCommand(cmd)
	rl.mu.Lock()
	dirty := rl.dirty
	rl.mu.Unlock()
	switch {
	case dirty != "":
		rl.log.Debug("not caching backend connection", "reason", dirty)
		rl.up.Close()
		rl.release()
	case err != nil:
		rl.log.Debug("not caching backend connection", "reason", "cleanup failed", "error", err)
		rl.up.abort()
		rl.release()
	case status != want:
		rl.log.Debug("not caching backend connection", "reason", "cleanup refused", "status", status)
		rl.up.Close()
		rl.release()
	case rl.up.r.Buffered() > 0:
		rl.log.Debug("not caching backend connection", "reason", "unread data")
		rl.up.abort()
		rl.release()
	case rl.sess.srv.kickedSince(rl.user, rl.born):
		rl.log.Debug("not caching backend connection", "reason", "user kicked by an operator")
		rl.up.Close()
		rl.release()
	default:
		// Once cached the connection is the pool's: an eviction of
		// this session must no longer find it.
		rl.sess.rl.Store(nil)
		rl.table.Put(rl.user, rl.digest, rl.up, rl.born)
	}
}

// internalCommand sends a command of the proxy's own and lets the pump
// stop after its tagged reply, so the proxy again owns the reader.
func (rl *relay) internalCommand(cmd string) (string, error) {
	tag := rl.up.nextTag()
	rl.mu.Lock()
	rl.inflight = append(rl.inflight, pending{tag: tag, kind: kindInternal})
	rl.stopping = true
	rl.mu.Unlock()
	rl.up.conn.SetDeadline(time.Now().Add(rl.up.checkLimit))
	rl.up.w.WriteString(tag + " " + cmd + "\r\n")
	if err := rl.flushUp(); err != nil {
		rl.up.abort()
		<-rl.pumpDone
		return "", err
	}
	<-rl.pumpDone
	rl.up.conn.SetDeadline(time.Time{})
	rl.mu.Lock()
	defer rl.mu.Unlock()
	if rl.internal == "" {
		if rl.pumpErr == nil {
			return "", errUnexpected
		}
		return "", rl.pumpErr
	}
	return rl.internal, nil
}

// close logs the upstream connection out when that can be done cleanly,
// else drops it, and gives its slot back.
func (rl *relay) close() {
	select {
	case <-rl.pumpDone:
		rl.up.abort()
		rl.release()
		return
	default:
	}
	rl.mu.Lock()
	idling := rl.idling
	busy := len(rl.inflight) > 0 && !(idling && len(rl.inflight) == 1)
	rl.mu.Unlock()
	if busy {
		rl.up.abort()
		<-rl.pumpDone
		rl.release()
		return
	}
	if idling {
		rl.up.w.WriteString("DONE\r\n")
	}
	rl.internalCommand("LOGOUT")
	rl.up.abort()
	rl.release()
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
	stopping, evicted := rl.stopping, rl.dirty == "evicted"
	rl.mu.Unlock()
	if err != nil && !stopping && !evicted {
		if errors.Is(err, errClientGone) {
			rl.log.Debug("client connection lost", "error", err)
		} else {
			rl.log.Warn("backend connection lost", "error", err)
		}
		rl.say("* BYE Connection to IMAP server lost")
		// Wake the client reader.
		rl.sess.conn.Close()
	}
	close(rl.pumpDone)
}

func (rl *relay) pumpLoop() error {
	r := rl.up.r
	for {
		if err := r.Wait(); err != nil {
			return err
		}
		line, lit, err := r.ReadLine()
		if err != nil {
			return err
		}
		if tr := rl.trace.Load(); tr != nil {
			tr.line(rl.sess.id, rl.backend.ID, "S", line, lit)
		}
		forward := true
		stop := false
		switch {
		case line[0] == '+':
			rl.mu.Lock()
			if rl.litTag != "" {
				rl.litTag = ""
				rl.signalLit(true)
			}
			rl.mu.Unlock()
		case line[0] == '*':
			l := imapwire.TrimEOL(line)
			if hasPrefixFold(l, "* BYE") {
				rl.setDirty("server said BYE")
			} else if hasPrefixFold(l, "* ENABLED") {
				rl.setDirty("ENABLE")
			}
		default:
			forward, stop = rl.tagged(line)
		}
		if err := rl.forward(line, lit, forward); err != nil {
			return err
		}
		if stop {
			return nil
		}
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
	i := -1
	for j, p := range rl.inflight {
		if p.tag == string(tag) {
			i = j
			break
		}
	}
	if rl.litTag == string(tag) {
		rl.litTag = ""
		rl.signalLit(false)
	}
	if i < 0 {
		rl.dirtyLocked("response to unknown tag")
		return true, false
	}
	p := rl.inflight[i]
	rl.inflight = append(rl.inflight[:i], rl.inflight[i+1:]...)
	if len(rl.inflight) == 0 {
		select {
		case rl.quiet <- struct{}{}:
		default:
		}
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
		rl.idling = false
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

// forward passes one response, literals and all, to the client, or
// swallows it once the client has been said goodbye to. Literal bytes are
// copied in bulk, never looked at.
func (rl *relay) forward(line []byte, lit *imapwire.Literal, pass bool) error {
	sess := rl.sess
	up := rl.up
	sess.wmu.Lock()
	defer sess.wmu.Unlock()
	out := pass && !sess.silenced
	if out {
		if _, err := sess.w.Write(line); err != nil {
			return clientGone(err)
		}
		rl.sent += int64(len(line))
	}
	for lit != nil {
		if out {
			// The literal's first bytes came in with its line: they go
			// out in the same write as the line, and a small literal
			// (a header, a flag list) costs no write of its own.
			head := up.r.Take(int(min(lit.Size, int64(sess.w.Available()))))
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
		} else if err := up.r.DiscardLiteral(lit.Size); err != nil {
			return err
		}
		var err error
		line, lit, err = up.r.ReadLine()
		if err != nil {
			return err
		}
		if tr := rl.trace.Load(); tr != nil {
			tr.line(sess.id, rl.backend.ID, "S", line, lit)
		}
		if out {
			if _, err := sess.w.Write(line); err != nil {
				return clientGone(err)
			}
			rl.sent += int64(len(line))
		}
	}
	if out && up.r.Buffered() == 0 {
		// Counted per burst, not per line: the counter is the whole
		// server's.
		sess.srv.stats.bytesDown.Add(uint64(rl.sent))
		rl.sent = 0
		if err := sess.flush(); err != nil {
			return clientGone(err)
		}
	}
	return nil
}

// literalChunk is how much of a literal must reach the client within one
// write timeout: a client that stops reading is cut off after the timeout,
// however big the literal, and a slow one only needs to keep moving.
const literalChunk = 1 << 20

// copyToClient copies n literal bytes from the backend to the client in
// bulk (splice where the kernel can), chunk by chunk under the write
// timeout.
func (rl *relay) copyToClient(n int64) error {
	sess, up := rl.sess, rl.up
	for n > 0 {
		k := min(n, literalChunk)
		sess.conn.SetWriteDeadline(time.Now().Add(sess.srv.options().writeTimeout()))
		m, err := up.r.CopyLiteral(sess.conn, k, up.conn)
		n -= m
		if err != nil {
			// The backend side has no deadline in the relay: a
			// timeout is the client's.
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return clientGone(err)
			}
			return err
		}
	}
	return nil
}

var errClientGone = errors.New("client connection lost")

func clientGone(err error) error { return errors.Join(errClientGone, err) }

// release gives back the connection budget slot of a dropped upstream.
func (rl *relay) release() { rl.sess.srv.pool.Release() }
