package proxy

// A property test of the relay's framing against a real Dovecot (issue 12,
// "a framing fuzz/property test"): random client sessions, from a grammar
// of commands with reused tags, literals of every kind (also on commands
// that take none), IDLE, pipelining and disconnects at random bytes, run
// through the proxy one after the other. After each, the same user logs in
// again and probes the connection it gets (a cached one if the proxy kept
// it) side by side with a fresh session directly on Dovecot: the two must
// read the same. The invariants:
//
//   - no session sees an answer that is not its own: every tagged answer
//     has a tag the session has a command in flight with, no "+" comes
//     unasked, no line names another user or another session's marker,
//     and every command is answered;
//   - a connection handed on (XPROXYREUSE) is indistinguishable from a new
//     login: nothing pending, no mailbox selected, no extension enabled;
//   - at the end no session is left, every open backend connection is a
//     cached one, and goroutines are back near their baseline.
//
// The seed is logged; a failure prints it with the session's script and
// transcript. IMAPPROXY_FRAMING_SEED=N replays a run,
// IMAPPROXY_FRAMING_SESSIONS=5000 runs a long one (default 150, about 15 s):
//
//	IMAPPROXY_FRAMING_SESSIONS=5000 go test -run TestFramingProperty -v ./proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

const (
	fpUsers    = 6
	fpMessages = 3
	// fpReadTimeout bounds every wait for an answer: Dovecot on loopback
	// answers these commands in milliseconds, so a wait this long means
	// the relay lost the framing.
	fpReadTimeout = 5 * time.Second
)

func TestFramingProperty(t *testing.T) {
	sessions := fpEnvUint(t, "IMAPPROXY_FRAMING_SESSIONS", 150)
	seed := fpEnvUint(t, "IMAPPROXY_FRAMING_SEED", uint64(time.Now().UnixNano()))
	t.Logf("seed %d (IMAPPROXY_FRAMING_SEED=%d replays it), %d sessions", seed, seed, sessions)

	dc := dovecottest.StartT(t, dovecottest.Options{Name: "framing", Users: fpUsers, Messages: fpMessages, BigMessages: 1})
	users := make([]fpUser, fpUsers)
	for i := range users {
		name := dovecottest.UserName(i + 1)
		users[i] = fpUser{name: name, pass: dc.PasswordOf(name)}
		// APPENDs go to Scratch, so that INBOX keeps its fixed messages
		// and CLOSE (never a \Deleted flag) expunges nothing anywhere.
		c := testkit.Dial(t, dc.Addr)
		c.MustLogin(name, users[i].pass)
		if res := c.Cmd("CREATE Scratch"); !res.OK() {
			t.Fatalf("CREATE Scratch for %s: %s", name, res)
		}
		c.Logout()
	}
	// Debug, not trace: hundreds of sessions at trace level would be
	// most of the test's memory; debug says why a connection was not
	// cached, which is what a failure needs.
	logs := &testkit.SyncBuffer{}
	p := startProxy(t, []*dovecottest.Server{dc}, func(o *Options) {
		o.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Debug, Output: logs})
		o.Pool = pool.New(pool.Options{Logger: o.Logger.Named("pool")})
	})
	runtime.GC()
	baseGoroutines := runtime.NumGoroutine()

	fail := func(i int, sc *fpScript, transcript string, err error) {
		t.Helper()
		log := logs.String()
		if len(log) > 20000 {
			log = "...\n" + log[len(log)-20000:]
		}
		t.Fatalf("seed %d, session %d (IMAPPROXY_FRAMING_SEED=%d replays it): %v\nscript:\n%s\ntranscript:\n%s\nproxy log (tail):\n%s",
			seed, i, seed, err, sc, transcript, log)
	}
	var st fpStats
	start := time.Now()
	for i := 0; i < int(sessions); i++ {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		sc := fpGenerate(rng, i, users[rng.IntN(len(users))])
		res := fpRun(p.addr, sc)
		if res.err != nil {
			fail(i, sc, res.transcript, res.err)
		}
		st.count(sc, res)
		// The session's connection is back in the pool (or closed)
		// once the proxy has let go of the session.
		p.waitIdle(t)
		reused, transcript, err := fpProbe(p.addr, dc.Addr, sc.user, sc.pass, i)
		if err != nil {
			fail(i, sc, res.transcript+"--- probe of the next login ---\n"+transcript, err)
		}
		if reused {
			st.probesReused++
			if sc.wild {
				st.wildReused++
			}
		}
		p.waitIdle(t)
	}
	elapsed := time.Since(start)
	t.Logf("%d sessions in %v (%.1f sessions/s, each with its probe): %s",
		sessions, elapsed.Round(time.Millisecond), float64(sessions)/elapsed.Seconds(), st)

	if n := p.srv.Stats().Sessions; n != 0 {
		t.Errorf("after all sessions: %d sessions open, want 0", n)
	}
	if ps := p.srv.Pool().Stats(); ps.Open != ps.Cached {
		t.Errorf("after all sessions: pool open = %d, cached = %d; want equal", ps.Open, ps.Cached)
	}
	// Goroutines end a moment after their sessions: poll.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > baseGoroutines+5 {
		if time.Now().After(deadline) {
			t.Errorf("goroutines: %d, baseline %d", runtime.NumGoroutine(), baseGoroutines)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A run where no connection is ever handed on proves nothing about
	// handing on: fail it rather than pass it. A wild session's connection
	// is handed on only when its trick left it clean, about 3 in 100 of
	// them: a short run may see none by chance (CI's 150 did, once), a
	// long one must.
	if sessions >= 50 && (st.probesReused == 0 || st.sessionsReused == 0) ||
		sessions >= 500 && st.wildReused == 0 {
		t.Errorf("too few reuses to test anything: %s", st)
	}
}

func fpEnvUint(t *testing.T, name string, def uint64) uint64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, s, err)
	}
	return n
}

type fpUser struct{ name, pass string }

// fpPiece is part of a command as the client writes it. With await, the
// client first waits for the server's "+" (a synchronising literal, IDLE's
// DONE) and sends nothing more of the command if it is answered instead.
type fpPiece struct {
	await bool
	data  string
}

type fpCmd struct {
	tag    string
	pieces []fpPiece
	// hidden are the tags of commands smuggled inside a literal on a
	// command that takes none: Dovecot runs and answers them too.
	hidden []string
}

// fpStep is written in one go: several commands are pipelined.
type fpStep []fpCmd

type fpScript struct {
	id, user, pass string
	wild           bool // may leave state a fresh login would not have
	steps          []fpStep
	// How the session ends: LOGOUT; or the client closes after writing
	// cut bytes (>= 0, counted after login), or right after writing step
	// closeAfter without reading its answers (>= 0); else it closes at a
	// command boundary.
	logout     bool
	pipeLogout bool
	cut        int
	closeAfter int
}

func (sc *fpScript) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "user %s, id %s, wild %v, logout %v (pipelined %v), cut %d, closeAfter %d\n", sc.user, sc.id, sc.wild, sc.logout, sc.pipeLogout, sc.cut, sc.closeAfter)
	for i, st := range sc.steps {
		fmt.Fprintf(&b, "step %d:\n", i)
		for _, c := range st {
			b.WriteString("  ")
			for _, pc := range c.pieces {
				if pc.await {
					b.WriteString("<await +>")
				}
				b.WriteString(strconv.Quote(pc.data))
			}
			if len(c.hidden) > 0 {
				fmt.Fprintf(&b, " hidden %q", c.hidden)
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

// size is the number of bytes the script writes after login if every
// literal is accepted.
func (sc *fpScript) size() int {
	n := 0
	for _, st := range sc.steps {
		for _, c := range st {
			for _, pc := range c.pieces {
				n += len(pc.data)
			}
		}
	}
	return n
}

// fpGen holds what command generation needs across a session.
type fpGen struct {
	rng  *rand.Rand
	id   string
	user string
	wild bool
	// noSync: no synchronising literal and no IDLE, whose "+" the proxy
	// expects in reply to the command it last saw with the tag, which a
	// hidden command sharing the tag answers instead.
	noSync bool
	trick  int
	n      int
}

// The tricks a wild session plays, each of which leaves the connection
// other than a fresh login would.
const (
	fpTrickHidden       = iota // a command smuggled in a literal on NOOP
	fpTrickHiddenShared        // the same, sharing the NOOP's tag
	fpTrickEnable              // ENABLE CONDSTORE or QRESYNC
	fpTrickModseq              // CONDSTORE switched on implicitly
	fpTrickJunkLiteral         // a literal on CHECK, run as a command
	fpTrickIdleJunk            // IDLE ended by something else than DONE
	fpTrickSearchRes           // SEARCH RETURN (SAVE)
	fpTrickTagInFlight         // two commands with one tag in flight
	fpTrickSyncNoArgs          // a synchronising literal on NOOP, refused
	fpTricks
)

func (g *fpGen) next() string { g.n++; return strconv.Itoa(g.n) }

func fpGenerate(rng *rand.Rand, i int, u fpUser) *fpScript {
	sc := &fpScript{id: fmt.Sprintf("s%dx", i), user: u.name, pass: u.pass, cut: -1, closeAfter: -1}
	// Half the sessions stay within what a well-behaved client does, so
	// that connections get cached and handed on; the other half try to
	// leave state behind.
	sc.wild = rng.IntN(2) == 0
	g := &fpGen{rng: rng, id: sc.id, user: u.name, wild: sc.wild}
	// A wild session plays one trick (among harmless commands), so that a
	// relay that misses that trick, and only that one, caches the
	// connection it leaves behind.
	if sc.wild {
		g.trick = rng.IntN(fpTricks)
	}
	// Smuggled commands that share their carrier's tag confuse any
	// tracking by tag (the relay's and this client's): the session then
	// makes do without synchronising literals.
	shareHidden := sc.wild && g.trick == fpTrickHiddenShared
	g.noSync = shareHidden
	var tagOf func() string
	switch rng.IntN(3) {
	case 0: // a fresh tag for every command
		tagOf = func() string { return sc.id + "." + g.next() }
	case 1: // one tag for everything, also while in flight
		tagOf = func() string { return sc.id }
	default: // a few tags, reused at random
		tagOf = func() string { return sc.id + "." + string(rune('a'+rng.IntN(2))) }
	}
	hiddenTag := func(tag string) string {
		if shareHidden {
			return tag
		}
		return sc.id + ".h" + g.next()
	}
	steps := 1 + rng.IntN(8)
	for s := 0; s < steps; s++ {
		n := 1
		if rng.IntN(3) == 0 {
			n = 2 + rng.IntN(3)
		}
		var st fpStep
		for k := 0; k < n; k++ {
			st = append(st, g.command(tagOf, hiddenTag)...)
		}
		sc.steps = append(sc.steps, st)
	}
	if sc.wild {
		s := rng.IntN(len(sc.steps))
		k := rng.IntN(len(sc.steps[s]) + 1)
		trick := g.play(tagOf, hiddenTag)
		sc.steps[s] = append(sc.steps[s][:k], append(trick, sc.steps[s][k:]...)...)
	}
	switch r := rng.IntN(8); {
	case r < 2:
		sc.cut = rng.IntN(sc.size() + 1)
	case r == 2:
		sc.closeAfter = rng.IntN(len(sc.steps))
	case r == 3:
		// closed at a command boundary
	default:
		sc.logout = true
		// Sometimes in the same write as the last step: the proxy
		// must answer what came before first.
		sc.pipeLogout = rng.IntN(3) == 0
	}
	return sc
}

// command generates one command, or a wild session's trick.
func (g *fpGen) command(tagOf func() string, hiddenTag func(string) string) []fpCmd {
	rng := g.rng
	tag := tagOf()
	line := func(s string) []fpCmd {
		return []fpCmd{{tag: tag, pieces: []fpPiece{{data: tag + " " + s + "\r\n"}}}}
	}
	// lit returns a command with one literal, synchronising or not
	// ({n+}, also when the session may not wait for "+"), binary (~{n},
	// RFC 3516: Dovecot has BINARY) or not.
	lit := func(head, body, tail string, nonSync, binary bool) []fpCmd {
		mark := ""
		if binary {
			mark = "~"
		}
		if nonSync || g.noSync {
			return []fpCmd{{tag: tag, pieces: []fpPiece{{data: fmt.Sprintf("%s %s%s{%d+}\r\n%s%s\r\n", tag, head, mark, len(body), body, tail)}}}}
		}
		return []fpCmd{{tag: tag, pieces: []fpPiece{
			{data: fmt.Sprintf("%s %s%s{%d}\r\n", tag, head, mark, len(body))},
			{await: true, data: body + tail + "\r\n"},
		}}}
	}
	message := func() string {
		return fmt.Sprintf("From: %s <%s@example.org>\r\nSubject: app %s.%s for %s\r\n\r\nbody\r\n", g.user, g.user, g.id, g.next(), g.user)
	}
	nx := "nx-" + g.id
	for {
		switch r := rng.IntN(30); r {
		case 0:
			return line("NOOP")
		case 1:
			return line("CAPABILITY")
		case 2:
			return line([]string{"SELECT INBOX", "EXAMINE INBOX", "SELECT Scratch", "EXAMINE Scratch"}[rng.IntN(4)])
		case 3:
			return line([]string{"SELECT ", "EXAMINE "}[rng.IntN(2)] + nx)
		case 4:
			// The mailbox name as a literal of either kind.
			return lit([]string{"SELECT ", "EXAMINE "}[rng.IntN(2)], "INBOX", "", rng.IntN(2) == 0, false)
		case 5:
			return line("UNSELECT")
		case 6:
			return line("CLOSE")
		case 7:
			return line([]string{"STATUS INBOX (MESSAGES UIDNEXT)", "STATUS " + nx + " (MESSAGES)", "STATUS Scratch (MESSAGES UNSEEN)"}[rng.IntN(3)])
		case 8:
			return lit("STATUS ", "Scratch", " (MESSAGES)", rng.IntN(2) == 0, false)
		case 9:
			return line(`LIST "" "*"`)
		case 10:
			return line("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])")
		case 11:
			return line([]string{"UID SEARCH ALL", "SEARCH SUBJECT \"for " + g.user + "\"", "UID FETCH 1:* (UID RFC822.SIZE)"}[rng.IntN(3)])
		case 12:
			return lit("UID SEARCH SUBJECT ", g.user, "", rng.IntN(2) == 0, false)
		case 13:
			return line([]string{`STORE 1 +FLAGS (\Flagged)`, `STORE 1 -FLAGS (\Flagged)`, `UID STORE 1:* +FLAGS.SILENT (\Seen)`, `STORE 2 -FLAGS.SILENT (\Seen)`}[rng.IntN(4)])
		case 14, 15:
			return lit("APPEND Scratch ", message(), "", rng.IntN(2) == 0, false)
		case 16:
			// A binary literal may hold NUL.
			return lit("APPEND Scratch ", message()+"\x00nul\r\n", "", rng.IntN(2) == 0, true)
		case 17:
			// Two messages in one APPEND (MULTIAPPEND), each literal
			// synchronising or not.
			m1, m2 := message(), message()
			if g.noSync || rng.IntN(2) == 0 {
				return line(fmt.Sprintf("APPEND Scratch {%d+}\r\n%s {%d+}\r\n%s", len(m1), m1, len(m2), m2))
			}
			return []fpCmd{{tag: tag, pieces: []fpPiece{
				{data: fmt.Sprintf("%s APPEND Scratch {%d}\r\n", tag, len(m1))},
				{await: true, data: fmt.Sprintf("%s (\\Seen) {%d}\r\n", m1, len(m2))},
				{await: true, data: m2 + "\r\n"},
			}}}
		case 18:
			if g.noSync {
				continue
			}
			return []fpCmd{{tag: tag, pieces: []fpPiece{{data: tag + " IDLE\r\n"}, {await: true, data: "DONE\r\n"}}}}
		case 19:
			return line("EXAMINE Scratch")
		case 20:
			// A command proxy answers itself.
			return line([]string{"LOGIN a b", "STARTTLS", "COMPRESS DEFLATE"}[rng.IntN(3)])
		case 21, 22, 23, 24, 25, 26:
			if g.wild && rng.IntN(2) == 0 {
				return g.play(tagOf, hiddenTag)
			}
			// Big: a response of 1 MiB, which a client may leave in
			// the middle of.
			return line([]string{"EXAMINE Big", "SELECT Big", "FETCH 1 (BODY.PEEK[])"}[rng.IntN(3)])
		case 27:
			return line([]string{"NAMESPACE", "CHECK", "ID NIL"}[rng.IntN(3)])
		case 28:
			return line(`STATUS {5+}` + "\r\nINBOX (UIDNEXT)")
		case 29:
			return line(`UID FETCH 1 (BODY.PEEK[])`)
		}
	}
}

// play generates the session's trick.
func (g *fpGen) play(tagOf func() string, hiddenTag func(string) string) []fpCmd {
	rng := g.rng
	tag := tagOf()
	line := func(s string) []fpCmd {
		return []fpCmd{{tag: tag, pieces: []fpPiece{{data: tag + " " + s + "\r\n"}}}}
	}
	switch g.trick {
	case fpTrickHidden, fpTrickHiddenShared:
		h := hiddenTag(tag)
		inner := h + " " + []string{"ENABLE CONDSTORE", "SELECT INBOX", "EXAMINE Scratch", "STATUS INBOX (HIGHESTMODSEQ)", "FETCH 1 (MODSEQ)", "UNSELECT", "NOOP"}[rng.IntN(7)]
		if rng.IntN(3) > 0 {
			// The command's own CRLF ends the smuggled line.
			return []fpCmd{{tag: tag, hidden: []string{h}, pieces: []fpPiece{{data: fmt.Sprintf("%s NOOP {%d+}\r\n%s\r\n", tag, len(inner), inner)}}}}
		}
		// The smuggled line ends inside the literal: what the client
		// sends next is, to the proxy, the rest of the NOOP's line, and
		// to Dovecot a command of its own, as hidden from the proxy as
		// the first, so it needs a tag of its own too. Hidden, the
		// proxy cannot wait for its answer either before it answers a
		// LOGOUT pipelined behind it: it is one command, with two
		// hidden ones, to the proxy and to this client alike.
		inner += "\r\n"
		tag2 := hiddenTag(tagOf())
		return []fpCmd{{tag: tag, hidden: []string{h, tag2}, pieces: []fpPiece{
			{data: fmt.Sprintf("%s NOOP {%d+}\r\n%s", tag, len(inner), inner)},
			{data: tag2 + " NOOP\r\n"},
		}}}
	case fpTrickEnable:
		return line([]string{"ENABLE CONDSTORE", "ENABLE QRESYNC"}[rng.IntN(2)])
	case fpTrickModseq:
		// FETCH and SEARCH need a mailbox: one is selected first.
		cmds := []string{"SELECT INBOX (CONDSTORE)", "STATUS INBOX (HIGHESTMODSEQ)",
			"SELECT INBOX|FETCH 1 (FLAGS MODSEQ)", "EXAMINE Scratch|UID SEARCH MODSEQ 1",
			"SELECT INBOX|UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)"}[rng.IntN(5)]
		var out []fpCmd
		for _, c := range strings.Split(cmds, "|") {
			out = append(out, line(c)...)
		}
		return out
	case fpTrickSyncNoArgs:
		// Dovecot answers at once and never says "+".
		return []fpCmd{{tag: tag, pieces: []fpPiece{{data: tag + " NOOP {4}\r\n"}, {await: true, data: "abcd\r\n"}}}}
	case fpTrickJunkLiteral:
		h := hiddenTag(tag)
		inner := h + " XYZZY"
		return []fpCmd{{tag: tag, hidden: []string{h}, pieces: []fpPiece{{data: fmt.Sprintf("%s CHECK {%d+}\r\n%s\r\n", tag, len(inner), inner)}}}}
	case fpTrickIdleJunk:
		return []fpCmd{{tag: tag, pieces: []fpPiece{{data: tag + " IDLE\r\n"}, {await: true, data: tag + " NOOP\r\n"}}}}
	case fpTrickSearchRes:
		return line("SEARCH RETURN (SAVE) ALL")
	default: // fpTrickTagInFlight
		first := []string{"SELECT INBOX", "EXAMINE Big", "FETCH 1:* (BODY.PEEK[])", "STATUS Big (MESSAGES)", "SELECT nx-" + g.id}[rng.IntN(5)]
		second := []string{"STATUS nx-" + g.id + " (MESSAGES)", "LIST \"\" *", "UNSELECT", "SELECT INBOX", "NOOP"}[rng.IntN(5)]
		return []fpCmd{
			{tag: tag, pieces: []fpPiece{{data: tag + " " + first + "\r\n"}}},
			{tag: tag, pieces: []fpPiece{{data: tag + " " + second + "\r\n"}}},
		}
	}
}

// fpStats counts what the run covered.
type fpStats struct {
	sessions, wild, logouts, cuts, closes int
	sessionsReused, probesReused          int
	wildReused                            int // probes that got the connection of a wild session
	commands, literals, syncRefused       int
}

func (st *fpStats) count(sc *fpScript, res fpResult) {
	st.sessions++
	if sc.wild {
		st.wild++
	}
	switch {
	case sc.logout && !res.cut:
		st.logouts++
	case res.cut:
		st.cuts++
	default:
		st.closes++
	}
	if res.reused {
		st.sessionsReused++
	}
	st.commands += res.commands
	st.literals += res.literals
	st.syncRefused += res.refused
}

func (st fpStats) String() string {
	return fmt.Sprintf("%d sessions (%d wild; %d LOGOUT, %d cut mid-stream, %d closed), %d commands, %d literals awaited (%d refused); %d sessions and %d probes on a reused connection (%d of them after a wild session)",
		st.sessions, st.wild, st.logouts, st.cuts, st.closes, st.commands, st.literals, st.syncRefused, st.sessionsReused, st.probesReused, st.wildReused)
}

type fpResult struct {
	transcript string
	reused     bool
	cut        bool
	commands   int
	literals   int // synchronising literals (and IDLEs) awaited
	refused    int
	err        error
}

// fpConn is the client side of one session: it knows which answers it is
// owed, by tag, and checks every line it reads against that.
type fpConn struct {
	conn     net.Conn
	r        *bufio.Reader
	id, user string
	owed     map[string]int
	// hidden counts the answers owed to smuggled commands, which the
	// proxy cannot wait for before it answers LOGOUT.
	hidden     map[string]int
	tr         strings.Builder
	written    int
	cut        int
	loggingOut bool
	res        *fpResult
}

var (
	errFPCut   = errors.New("cut by the client")
	fpUserRE   = regexp.MustCompile(`user\d{4}`)
	fpMarkerRE = regexp.MustCompile(`nx-(s\d+x)`)
)

func fpRun(addr string, sc *fpScript) (res fpResult) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return fpResult{err: err}
	}
	defer conn.Close()
	c := &fpConn{conn: conn, r: bufio.NewReader(conn), id: sc.id, user: sc.user, owed: map[string]int{}, hidden: map[string]int{}, cut: -1, res: &res}
	defer func() { res.transcript = c.tr.String() }()
	if _, err := c.readLine(); err != nil {
		res.err = fmt.Errorf("greeting: %w", err)
		return res
	}
	login := sc.id + ".login"
	c.owed[login] = 1
	if err := c.write(fmt.Sprintf("%s LOGIN %s %s\r\n", login, testkit.Quote(sc.user), testkit.Quote(sc.pass))); err != nil {
		res.err = err
		return res
	}
	lines, err := c.drain()
	if err != nil {
		res.err = fmt.Errorf("login: %w", err)
		return res
	}
	if !strings.HasPrefix(lines[len(lines)-1], login+" OK") {
		res.err = fmt.Errorf("login refused: %q", lines)
		return res
	}
	for _, l := range lines {
		if strings.Contains(l, "[XPROXYREUSE]") {
			res.reused = true
		}
	}
	c.written, c.cut = 0, sc.cut
	logoutTag := sc.id + ".logout"
	for i, st := range sc.steps {
		if i == len(sc.steps)-1 && sc.pipeLogout {
			st = append(st[:len(st):len(st)], fpCmd{tag: logoutTag, pieces: []fpPiece{{data: logoutTag + " LOGOUT\r\n"}}})
			c.loggingOut = true
		}
		err := c.step(st)
		if errors.Is(err, errFPCut) {
			res.cut = true
			return res
		}
		if err != nil {
			res.err = fmt.Errorf("step %d: %w", i, err)
			return res
		}
		if i == sc.closeAfter {
			c.tr.WriteString("C: <close before reading>\n")
			res.cut = true
			return res
		}
		if lines, err = c.drain(); err != nil {
			res.err = fmt.Errorf("step %d: %w", i, err)
			return res
		}
	}
	if !sc.logout {
		c.tr.WriteString("C: <close>\n")
		return res
	}
	if !sc.pipeLogout {
		c.owed[logoutTag]++
		c.loggingOut = true
		if err := c.write(logoutTag + " LOGOUT\r\n"); err != nil {
			res.err = err
			return res
		}
		if lines, err = c.drain(); err != nil {
			res.err = fmt.Errorf("LOGOUT: %w", err)
			return res
		}
	}
	// The proxy answers LOGOUT last, after everything before it.
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, logoutTag+" OK") {
		res.err = fmt.Errorf("LOGOUT answered %q", last)
		return res
	}
	conn.SetReadDeadline(time.Now().Add(fpReadTimeout))
	if l, err := c.r.ReadString('\n'); err != io.EOF {
		res.err = fmt.Errorf("after LOGOUT: read %q, %v; want EOF", l, err)
	}
	return res
}

// step writes the commands of one step, pipelined, waiting only where a
// piece awaits the server's "+".
func (c *fpConn) step(st fpStep) error {
	var buf strings.Builder
	for _, cmd := range st {
		c.res.commands++
		c.owed[cmd.tag]++
		for _, h := range cmd.hidden {
			c.owed[h]++
			c.hidden[h]++
		}
		for _, pc := range cmd.pieces {
			if pc.await {
				if err := c.write(buf.String()); err != nil {
					return err
				}
				buf.Reset()
				c.res.literals++
				ok, err := c.await(cmd.tag)
				if err != nil {
					return err
				}
				if !ok {
					// Answered instead: the rest is not sent.
					c.res.refused++
					break
				}
			}
			buf.WriteString(pc.data)
		}
	}
	return c.write(buf.String())
}

func (c *fpConn) write(s string) error {
	if s == "" {
		return nil
	}
	if c.cut >= 0 && c.written+len(s) > c.cut {
		s = s[:c.cut-c.written]
		c.conn.Write([]byte(s))
		fmt.Fprintf(&c.tr, "C: %q <cut>\n", s)
		c.conn.Close()
		return errFPCut
	}
	c.written += len(s)
	fmt.Fprintf(&c.tr, "C: %q\n", s)
	if _, err := io.WriteString(c.conn, s); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// readLine reads one response line with its literals inlined and checks
// it names no other user and no other session.
func (c *fpConn) readLine() (string, error) {
	var b strings.Builder
	for {
		c.conn.SetReadDeadline(time.Now().Add(fpReadTimeout))
		l, err := c.r.ReadString('\n')
		if err != nil {
			fmt.Fprintf(&c.tr, "S: %q <%v>\n", l, err)
			return "", fmt.Errorf("read: %w (owed %v)", err, c.owed)
		}
		l = strings.TrimSuffix(l, "\r\n")
		b.WriteString(l)
		n, ok := testkit.LiteralSize(l)
		if !ok {
			break
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return "", fmt.Errorf("read literal: %w", err)
		}
		b.Write(buf)
	}
	l := b.String()
	if len(l) > 300 {
		fmt.Fprintf(&c.tr, "S: %q... (%d bytes)\n", l[:300], len(l))
	} else {
		fmt.Fprintf(&c.tr, "S: %q\n", l)
	}
	for _, u := range fpUserRE.FindAllString(l, -1) {
		if u != c.user {
			return "", fmt.Errorf("a session of %s got a line naming %s: %q", c.user, u, l)
		}
	}
	for _, m := range fpMarkerRE.FindAllStringSubmatch(l, -1) {
		if m[1] != c.id {
			return "", fmt.Errorf("session %s got a line of session %s: %q", c.id, m[1], l)
		}
	}
	return l, nil
}

// next reads one line and accounts for it: a tagged answer must be owed.
// It reports a "+" to the caller, who must have asked for one.
func (c *fpConn) next() (l string, cont bool, err error) {
	l, err = c.readLine()
	if err != nil {
		return "", false, err
	}
	switch {
	case strings.HasPrefix(l, "+"):
		return l, true, nil
	case strings.HasPrefix(l, "* "):
		if strings.HasPrefix(strings.ToUpper(l), "* BYE") && !c.loggingOut {
			return "", false, fmt.Errorf("unexpected BYE: %q", l)
		}
		return l, false, nil
	}
	tag, _, _ := strings.Cut(l, " ")
	if c.owed[tag] <= 0 {
		return "", false, fmt.Errorf("tagged answer %q, but nothing with its tag is in flight (owed %v)", l, c.owed)
	}
	c.owed[tag]--
	if c.loggingOut && strings.HasPrefix(l, c.id+".logout OK") {
		for h, n := range c.hidden {
			c.owed[h] -= min(n, c.owed[h])
		}
	}
	return l, false, nil
}

// await waits for the "+" to the command with tag that is last in flight.
// The proxy holds such a command back until no other with its tag is in
// flight, so the answers before the "+" that the session is owed with the
// tag belong to earlier commands, and the last one refuses it.
func (c *fpConn) await(tag string) (accepted bool, err error) {
	for {
		l, cont, err := c.next()
		if err != nil {
			return false, err
		}
		if cont {
			return true, nil
		}
		if strings.HasPrefix(l, tag+" ") && c.owed[tag] == 0 {
			return false, nil
		}
	}
}

// drain reads until nothing is owed, failing on a "+" nobody asked for.
func (c *fpConn) drain() ([]string, error) {
	var lines []string
	for {
		n := 0
		for _, k := range c.owed {
			n += k
		}
		if n == 0 {
			return lines, nil
		}
		l, cont, err := c.next()
		if err != nil {
			return lines, err
		}
		if cont {
			return lines, fmt.Errorf("continuation request nobody asked for: %q", l)
		}
		lines = append(lines, l)
	}
}

// fpProbeCmds show what a session inherits from its connection: pending
// output (answers before NOOP's), a selected mailbox (FETCH not refused,
// or EXAMINE reporting [CLOSED]), an enabled CONDSTORE or QRESYNC (MODSEQ
// in the FETCH that a STORE changing a flag sends back: Dovecot shows it
// nowhere else, not in FETCH FLAGS), an IDLE in progress (NOOP refused).
// The STOREs leave the flags as they found them.
var fpProbeCmds = []string{"NOOP", "FETCH 1 (FLAGS)", "EXAMINE INBOX", "SELECT INBOX",
	`STORE 1 +FLAGS (\Answered)`, `STORE 1 -FLAGS (\Answered)`, "NOOP"}

// fpProbe logs user in through the proxy and directly on Dovecot, runs the
// same probe on both and compares the answers, normalised for what may
// differ between two fresh sessions.
func fpProbe(proxyAddr, directAddr, user, pass string, i int) (reused bool, transcript string, err error) {
	via, reused, err := fpProbeOne(proxyAddr, user, pass, i)
	if err != nil {
		return reused, strings.Join(via, "\n"), fmt.Errorf("probe through the proxy: %w", err)
	}
	direct, _, err := fpProbeOne(directAddr, user, pass, i)
	if err != nil {
		return reused, strings.Join(direct, "\n"), fmt.Errorf("probe on Dovecot: %w", err)
	}
	a, b := fpNormalise(via), fpNormalise(direct)
	if strings.Join(a, "\n") != strings.Join(b, "\n") {
		return reused, "through the proxy (reused " + strconv.FormatBool(reused) + "):\n" + strings.Join(via, "\n") + "\ndirectly on Dovecot:\n" + strings.Join(direct, "\n"),
			errors.New("the next login's session differs from a fresh one on Dovecot")
	}
	return reused, "", nil
}

func fpProbeOne(addr, user, pass string, i int) (lines []string, reused bool, err error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, false, err
	}
	defer conn.Close()
	c := &fpConn{conn: conn, r: bufio.NewReader(conn), id: fmt.Sprintf("p%dx", i), user: user, owed: map[string]int{}, hidden: map[string]int{}, cut: -1, res: &fpResult{}}
	defer func() {
		if err != nil {
			lines = append(lines, c.tr.String())
		}
	}()
	if _, err := c.readLine(); err != nil {
		return nil, false, err
	}
	run := func(tag, cmd string) ([]string, error) {
		c.owed[tag]++
		if err := c.write(tag + " " + cmd + "\r\n"); err != nil {
			return nil, err
		}
		return c.drain()
	}
	res, err := run("P0", fmt.Sprintf("LOGIN %s %s", testkit.Quote(user), testkit.Quote(pass)))
	if err != nil {
		return nil, false, err
	}
	for _, l := range res {
		reused = reused || strings.Contains(l, "[XPROXYREUSE]")
	}
	for k, cmd := range fpProbeCmds {
		res, err := run("P"+strconv.Itoa(k+1), cmd)
		if err != nil {
			return lines, reused, err
		}
		lines = append(lines, res...)
	}
	c.loggingOut = true
	if _, err := run("P9", "LOGOUT"); err != nil {
		return lines, reused, err
	}
	return lines, reused, nil
}

var (
	fpTimingRE = regexp.MustCompile(` \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)`)
	fpDigitsRE = regexp.MustCompile(`\d+`)
	fpRecentRE = regexp.MustCompile(` ?\\Recent\b`)
)

// fpNormalise drops what differs between two fresh sessions: Dovecot's
// timings, counts and numbers, and \Recent, which goes to whichever session
// looks first.
func fpNormalise(lines []string) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		l = fpTimingRE.ReplaceAllString(l, "")
		l = fpRecentRE.ReplaceAllString(l, "")
		out[i] = fpDigitsRE.ReplaceAllString(l, "N")
	}
	return out
}
