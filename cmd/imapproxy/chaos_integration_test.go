package main

// The chaos soak: the real daemon in front of three real Dovecots found in
// a real Consul, each behind a fault injector (internal/faultnet), with
// webmail, IDLE and aborted sessions running while faults are applied at
// random: stalls and drips in either direction, a stall inside a FETCH
// literal, resets, black holes, refused connects, a Dovecot frozen by
// SIGSTOP, Consul maintenance flips and configuration reloads. It lives
// here, not in proxy/, because what it checks is the whole process: the
// Consul watch, SIGHUP, and the daemon's own goroutines, descriptors and
// pool as it exports them.
//
// Invariants, checked while it runs:
//   - no session sees another user's mail (every subject of every FETCH
//     names the logged-in user), and a login served from the cache
//     (XPROXYREUSE) starts with no mailbox selected;
//   - no client waits longer than the configured timeouts allow without a
//     byte of progress: a login is answered within loginBound, every later
//     read makes progress within stallBound, or the client gets a clear
//     NO [UNAVAILABLE] or BYE;
//   - the daemon's backend set (admin API) equals Consul's passing set
//     within consulBound of every change;
//   - no error answer the faults cannot explain, no panic in the log.
//
// And once the faults are cleared and the traffic stops: every user logs in
// and reads its own mail, sessions return to 0, every backend connection
// the daemon counts is cached (none pinned, none closing) and matches the
// sockets the injectors see, and after a cache flush goroutines and open
// descriptors return to their baseline.
//
// IMAPPROXY_CHAOS sets the duration (default 25s, the CI budget;
// scripts/chaos.sh runs it for minutes). IMAPPROXY_CHAOS_SEED replays a
// fault schedule: the seed is logged at the start of every run and the
// schedule on failure (the interleaving with traffic is not replayed).
//
//	IMAPPROXY_CHAOS=10m go test -count=1 -v -run '^TestChaos$' -timeout 2h ./cmd/imapproxy/

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/consultest"
	"github.com/imapproxy/imapproxy/internal/dovecottest"
	"github.com/imapproxy/imapproxy/internal/faultnet"
	"github.com/imapproxy/imapproxy/internal/testkit"
)

const (
	chaosDefault  = 25 * time.Second
	chaosUsers    = 30
	chaosMessages = 5

	// The daemon's timeouts under chaos: short, so that every fault
	// resolves within a soak of seconds.
	chaosDial          = 1 * time.Second
	chaosBackendLogin  = 2 * time.Second
	chaosCheck         = 1 * time.Second
	chaosResponse      = 3 * time.Second
	chaosWrite         = 3 * time.Second
	chaosCachedPerUser = 4 // cache.max_cached_per_user, the default

	// chaosSlack covers scheduling on a loaded two-core machine.
	chaosSlack = 3 * time.Second
	// loginBound: a login may check every cached connection of its user
	// (each up to timeouts.check) and then try every backend (a dial
	// without retries, then greeting and LOGIN within backend_login).
	loginBound = chaosCachedPerUser*chaosCheck + 3*(chaosDial+chaosBackendLogin) + chaosSlack
	// stallBound: after login the backend owes an answer for at most
	// timeouts.response of silence before the client gets BYE.
	stallBound = chaosResponse + chaosSlack
	// consulBound: how long the daemon's set may differ from Consul's.
	consulBound = 5 * time.Second

	chaosWorkersWebmail = 6
	chaosWorkersIdle    = 3
	chaosWorkersAbort   = 1
)

func TestChaos(t *testing.T) {
	dur := chaosDefault
	if s := os.Getenv("IMAPPROXY_CHAOS"); s != "" {
		var err error
		if dur, err = time.ParseDuration(s); err != nil || dur <= 0 || dur > 24*time.Hour {
			t.Fatalf("IMAPPROXY_CHAOS=%q: want a duration up to 24h", s)
		}
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("IMAPPROXY_CHAOS_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("IMAPPROXY_CHAOS_SEED=%q: %v", s, err)
		}
	}
	requireDovecot(t)
	requireConsul(t)
	t.Logf("chaos: %v, seed %d (IMAPPROXY_CHAOS_SEED=%d replays the fault schedule)", dur, seed, seed)

	c := &cluster{byName: map[string]*clusterBackend{}}
	var (
		wg       sync.WaitGroup
		buildErr error
	)
	binDir := t.TempDir()
	wg.Go(func() { c.bin, buildErr = buildDaemon(binDir) })
	c.startBackends(t, []int{1, 1, 2}, dovecottest.Options{Users: chaosUsers, Messages: chaosMessages})
	wg.Wait()
	if buildErr != nil {
		t.Fatal(buildErr)
	}

	// Each backend is announced in Consul at its injector's address, so
	// that every byte between daemon and Dovecot passes a fault point.
	agent := consultest.StartT(t)
	ch := &chaos{c: c, agent: agent, faults: map[string]int{}, outcomes: map[string]int{}, perBackend: map[string]int{}}
	for _, b := range c.backends {
		p := faultnet.ListenT(t, b.srv.Addr)
		ch.nets = append(ch.nets, p)
		_, port, _ := net.SplitHostPort(p.Addr())
		n, _ := strconv.Atoi(port)
		if err := agent.Register(consultest.Service{Name: serviceName, ID: b.id, Address: "127.0.0.1", Port: n, Weight: b.weight}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "all backends passing in Consul", func() (bool, string) {
		n, err := passing(agent)
		return err == nil && n == len(c.backends), fmt.Sprintf("passing=%d err=%v", n, err)
	})
	ch.d = c.startDaemon(t, agent, daemonOptions{
		cache:      true,
		drain:      "2s",
		rejoinHold: "2s",
		upstream:   fmt.Sprintf("dial_timeout = %q\n  dial_retries = 0", chaosDial),
		timeouts: fmt.Sprintf("backend_login = %q\n  check = %q\n  response = %q\n  write = %q\n  drain = \"5s\"",
			chaosBackendLogin, chaosCheck, chaosResponse, chaosWrite),
	})
	// Runs before the daemon's SIGTERM: a frozen Dovecot or a stalled
	// injector left by a failed test must not hold up the shutdown.
	t.Cleanup(ch.clearAll)
	defer func() {
		if t.Failed() {
			t.Logf("chaos seed %d; fault schedule:\n%s", seed, strings.Join(ch.schedule, "\n"))
		}
	}()

	base := ch.resources(t)
	g0, fd0 := base.get("go_goroutines"), base.get("process_open_fds")

	// The soak.
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	ch.start = time.Now()
	monCtx, stopMonitor := context.WithCancel(context.Background())
	monDone := make(chan struct{})
	go func() { defer close(monDone); ch.monitor(monCtx) }()
	defer func() { stopMonitor(); <-monDone }()

	var traffic sync.WaitGroup
	kinds := slices.Concat(slices.Repeat([]string{"webmail"}, chaosWorkersWebmail),
		slices.Repeat([]string{"idle"}, chaosWorkersIdle), slices.Repeat([]string{"abort"}, chaosWorkersAbort))
	for w, kind := range kinds {
		traffic.Go(func() { ch.worker(ctx, kind, rand.New(rand.NewPCG(seed, uint64(w+1)))) })
	}
	faultsDone := make(chan struct{})
	schedule := plan(rand.New(rand.NewPCG(seed, 0)), dur, len(c.backends))
	go func() { defer close(faultsDone); ch.inject(ctx, schedule) }()
	traffic.Wait()
	<-faultsDone
	soaked := time.Since(ch.start)

	// Faults cleared, traffic stopped: the cluster is whole again, in
	// Consul and in the daemon.
	waitFor(t, "every backend back in the daemon's set and in service", func() (bool, string) {
		m := ch.d.metrics(t)
		ok := m.get("imapproxy_backends") == float64(len(c.backends))
		for _, b := range c.backends {
			ok = ok && m.get(fmt.Sprintf(`imapproxy_backend_in_service{backend=%q}`, b.id)) == 1
		}
		return ok, m.summary()
	})
	stopMonitor()
	<-monDone

	// Every user logs in and reads its own mail.
	for i := 1; i <= chaosUsers; i++ {
		u := dovecottest.UserName(i)
		if err := ch.webmail(u, false, rand.New(rand.NewPCG(seed, 1000))); err != nil {
			t.Errorf("after the chaos, %s: %v", u, err)
		}
	}
	ch.settled(t, "after the chaos")
	peak := ch.d.metrics(t)

	// The cache emptied, the process is back where it started.
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Post("http://"+ch.d.admin+"/api/v1/cache/flush", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	ch.d.waitMetric(t, "imapproxy_upstream_connections", 0)
	ch.settled(t, "after a cache flush")
	var end metrics
	settle := time.Now().Add(bound)
	for {
		end = ch.resources(t)
		if end.get("go_goroutines") <= g0+3 && end.get("process_open_fds") <= fd0+3 || time.Now().After(settle) {
			break
		}
		time.Sleep(pollEvery)
	}
	if g := end.get("go_goroutines"); g > g0+3 {
		t.Errorf("daemon goroutines %v after the chaos and a cache flush, baseline %v: a leak\n%s", g, g0, ch.goroutines())
	}
	if fd := end.get("process_open_fds"); fd > fd0+3 {
		t.Errorf("daemon open descriptors %v after the chaos and a cache flush, baseline %v: a leak", fd, fd0)
	}
	if n := end.get(`imapproxy_config_reloads_total{result="success"}`); n != float64(ch.reloads.Load()) {
		t.Errorf("%v successful reloads, %d made", n, ch.reloads.Load())
	}
	if n := end.get(`imapproxy_config_reloads_total{result="failure"}`); n > 0 {
		t.Errorf("%v failed reloads", n)
	}
	log := ch.d.log()
	if i := strings.Index(log, "panic"); i >= 0 {
		t.Errorf("the daemon logged a panic:\n%s", log[i:min(len(log), i+2000)])
	}
	// A warning that blames a backend with the error of a socket the
	// daemon closed itself (a client leaving mid-answer) is noise that
	// hides real backend trouble: one per aborted client, before.
	for l := range strings.Lines(log) {
		if strings.Contains(l, "[WARN]") && strings.Contains(l, "use of closed network connection") {
			t.Errorf("the daemon blamed a socket it closed itself: %s", strings.TrimSpace(l))
			break
		}
	}

	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, v := range ch.violations {
		t.Error(v)
	}
	if n := ch.nViolations - len(ch.violations); n > 0 {
		t.Errorf("and %d more violations", n)
	}
	if ch.cycles == 0 {
		t.Error("no webmail cycle completed")
	}
	t.Logf("chaos %v (seed %d): %d webmail cycles (%d reused), %d IDLE sessions, %d aborted; outcomes %s; logins by backend %s",
		soaked.Round(time.Millisecond), seed, ch.cycles, ch.reused, ch.idles, ch.aborts, fmtCounts(ch.outcomes), fmtCounts(ch.perBackend))
	applied := 0
	for _, n := range ch.faults {
		applied += n
	}
	t.Logf("chaos faults: %d applied: %s; longest client operation %v", applied, fmtCounts(ch.faults), ch.slowest.Round(time.Millisecond))
	t.Logf("chaos Consul: %d changes, daemon lag p50 %v max %v (bound %v)", len(ch.lags), quantile(ch.lags, 0.5), quantile(ch.lags, 1), consulBound)
	t.Logf("chaos resources: goroutines %v -> %v, open fds %v -> %v (cached %v before the flush), peak sessions %v, peak backend connections %v",
		g0, end.get("go_goroutines"), fd0, end.get("process_open_fds"), peak.get("imapproxy_cached_connections"), ch.peakSessions, ch.peakUpstream)
}

// chaos is the state of one soak.
type chaos struct {
	c     *cluster
	agent *consultest.Agent
	d     *daemonProc
	nets  []*faultnet.Proxy // by backend index
	start time.Time

	reloads atomic.Int64

	mu           sync.Mutex
	schedule     []string       // every fault applied, with its time
	faults       map[string]int // applied, by kind
	outcomes     map[string]int // client operations, by outcome
	perBackend   map[string]int // logins, by the backend the ID reply names
	violations   []string       // the first 30
	nViolations  int
	cycles       int
	reused       int
	idles        int
	aborts       int
	slowest      time.Duration
	lags         []time.Duration
	peakSessions float64
	peakUpstream float64
}

func (ch *chaos) violate(format string, a ...any) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.nViolations++
	if len(ch.violations) < 30 {
		ch.violations = append(ch.violations, fmt.Sprintf("%.3fs: ", time.Since(ch.start).Seconds())+fmt.Sprintf(format, a...))
	}
}

func (ch *chaos) count(m map[string]int, key string) {
	ch.mu.Lock()
	m[key]++
	ch.mu.Unlock()
}

// ---------------------------------------------------------------------
// Traffic

// errUnavailable is a login refused with NO [UNAVAILABLE]: what a client
// is told while its backends are in trouble.
var errUnavailable = errors.New("login refused: unavailable")

// byeError is a connection the proxy ended, with the BYE it said first.
type byeError struct{ line string }

func (e *byeError) Error() string { return "ended with " + e.line }

// stallError is a wait without progress past its bound: a violation.
type stallError struct {
	what  string
	bound time.Duration
	err   error
}

func (e *stallError) Error() string {
	return fmt.Sprintf("no progress for %v %s: %v", e.bound, e.what, e.err)
}

func (ch *chaos) worker(ctx context.Context, kind string, rnd *rand.Rand) {
	for ctx.Err() == nil {
		user := dovecottest.UserName(1 + rnd.IntN(chaosUsers))
		t0 := time.Now()
		var err error
		switch kind {
		case "webmail":
			err = ch.webmail(user, true, rnd)
		case "idle":
			err = ch.idle(user, rnd)
		case "abort":
			err = ch.abort(user, rnd)
		}
		took := time.Since(t0)
		ch.mu.Lock()
		ch.slowest = max(ch.slowest, took)
		ch.mu.Unlock()
		var bye *byeError
		var stall *stallError
		switch {
		case err == nil:
			ch.count(ch.outcomes, "ok")
		case errors.Is(err, errUnavailable):
			ch.count(ch.outcomes, "unavailable")
		case errors.As(err, &bye):
			ch.count(ch.outcomes, "bye")
		case errors.As(err, &stall):
			ch.count(ch.outcomes, "stalled")
			ch.violate("%s %s: %v", kind, user, err)
		default:
			ch.count(ch.outcomes, "error")
			ch.violate("%s %s: %v", kind, user, err)
		}
	}
}

// webmail is one page view: login, ID, SELECT, the subjects, sometimes a
// whole message, LOGOUT. Every subject must be the user's own; a login
// from the cache must start with no mailbox selected. count is false for
// the check after the chaos.
func (ch *chaos) webmail(user string, count bool, rnd *rand.Rand) error {
	cc, reused, err := ch.login(user)
	if err != nil {
		return err
	}
	defer cc.conn.Close()
	if reused {
		// The cached connection was cleaned up: no mailbox is selected,
		// so a FETCH is refused as in a fresh session.
		res, err := cc.cmd("FETCH 1 (FLAGS)")
		if err != nil {
			return err
		}
		if strings.Contains(res.Tagged, " OK") || len(res.Untagged) > 0 {
			return fmt.Errorf("session from the cache had a mailbox selected: FETCH gave %s", res)
		}
	}
	res, err := cc.cmd("ID NIL")
	if err != nil {
		return err
	}
	backend := "?"
	for _, l := range res.Untagged {
		if m := idNameRE.FindStringSubmatch(l); m != nil {
			backend = m[1]
		}
	}
	if err := cc.selectInbox(user); err != nil {
		return err
	}
	if res, err = cc.cmd("UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"); err != nil {
		return err
	}
	if err := ownMail(user, res, chaosMessages); err != nil {
		return err
	}
	if rnd.IntN(2) == 0 {
		n := 1 + rnd.IntN(chaosMessages)
		if res, err = cc.cmd("FETCH %d BODY.PEEK[]", n); err != nil {
			return err
		}
		if err := ownMail(user, res, 1); err != nil {
			return err
		}
		if want := fmt.Sprintf("Hello %s,", user); !strings.Contains(res.String(), want) {
			return fmt.Errorf("FETCH %d BODY[] has no %q: %.200s", n, want, res)
		}
	}
	if err := cc.logout(); err != nil {
		return err
	}
	if count {
		ch.mu.Lock()
		ch.cycles++
		if reused {
			ch.reused++
		}
		ch.perBackend[backend]++
		ch.mu.Unlock()
	}
	return nil
}

// idle logs in, selects INBOX, idles for up to 3 s, ends IDLE and logs out.
func (ch *chaos) idle(user string, rnd *rand.Rand) error {
	cc, _, err := ch.login(user)
	if err != nil {
		return err
	}
	defer cc.conn.Close()
	if err := cc.selectInbox(user); err != nil {
		return err
	}
	tag := cc.nextTag()
	if err := cc.send(tag + " IDLE\r\n"); err != nil {
		return err
	}
	l, err := cc.line(stallBound, "waiting for IDLE's continuation")
	if err != nil {
		return err
	}
	if !strings.HasPrefix(l, "+") {
		return fmt.Errorf("IDLE: %q, want a continuation", l)
	}
	// The idle time itself: the backend owes nothing, updates may come.
	hold := time.Duration(200+rnd.IntN(2800)) * time.Millisecond
	until := time.Now().Add(hold)
	for {
		l, err := cc.line(time.Until(until), "")
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			break
		}
		if err != nil {
			return cc.ended(err)
		}
		if strings.HasPrefix(l, "* BYE") {
			cc.bye = l
		}
	}
	if err := cc.send("DONE\r\n"); err != nil {
		return cc.ended(err)
	}
	if _, err := cc.readTagged(tag, stallBound, "ending IDLE"); err != nil {
		return err
	}
	ch.mu.Lock()
	ch.idles++
	ch.mu.Unlock()
	return cc.logout()
}

// abort vanishes in the middle of a FETCH or of IDLE: the proxy must clean
// up after it and not cache a connection with an answer still coming.
func (ch *chaos) abort(user string, rnd *rand.Rand) error {
	cc, _, err := ch.login(user)
	if err != nil {
		return err
	}
	defer cc.conn.Close()
	if err := cc.selectInbox(user); err != nil {
		return err
	}
	if rnd.IntN(2) == 0 {
		cc.send(cc.nextTag() + " FETCH 1:* BODY.PEEK[]\r\n")
	} else {
		cc.send(cc.nextTag() + " IDLE\r\n")
	}
	ch.mu.Lock()
	ch.aborts++
	ch.mu.Unlock()
	return nil
}

var chaosSubjectRE = regexp.MustCompile(`Subject: msg (\d+) for (user\d+)`)

// ownMail checks that res shows exactly want subjects, all of user's.
func ownMail(user string, res testkit.Response, want int) error {
	ms := chaosSubjectRE.FindAllStringSubmatch(res.String(), -1)
	for _, m := range ms {
		if m[2] != user {
			return fmt.Errorf("CROSS-USER DATA: the session of %s got mail of %s: %q", user, m[2], m[0])
		}
	}
	if len(ms) != want {
		return fmt.Errorf("%d subjects, want %d: %.300s", len(ms), want, res)
	}
	return nil
}

// chaosConn is a client connection whose every read must make progress
// within its bound.
type chaosConn struct {
	conn net.Conn
	r    *bufio.Reader
	pr   *progressReader
	n    int
	bye  string // the BYE the proxy said, once seen
}

// progressReader sets a fresh read deadline before every read: a slow
// answer that keeps coming is progress, silence is not.
type progressReader struct {
	conn  net.Conn
	bound time.Duration
}

func (p *progressReader) Read(b []byte) (int, error) {
	p.conn.SetReadDeadline(time.Now().Add(p.bound))
	return p.conn.Read(b)
}

// login connects and logs user in. It returns errUnavailable for a NO
// [UNAVAILABLE] and a byeError when the proxy ended the connection.
func (ch *chaos) login(user string) (*chaosConn, bool, error) {
	conn, err := net.DialTimeout("tcp", ch.d.addr, 5*time.Second)
	if err != nil {
		return nil, false, fmt.Errorf("dial the proxy: %w", err)
	}
	conn.SetWriteDeadline(time.Now().Add(bound))
	pr := &progressReader{conn: conn}
	cc := &chaosConn{conn: conn, pr: pr, r: bufio.NewReader(pr)}
	g, err := cc.line(stallBound, "waiting for the greeting")
	if err != nil {
		conn.Close()
		return nil, false, err
	}
	if !strings.HasPrefix(g, "* OK") {
		conn.Close()
		return nil, false, fmt.Errorf("greeting %q", g)
	}
	tag := cc.nextTag()
	if err := cc.send(fmt.Sprintf("%s LOGIN %s %s\r\n", tag, user, testkit.Quote(ch.c.password(user)))); err != nil {
		conn.Close()
		return nil, false, cc.ended(err)
	}
	res, err := cc.readTagged(tag, loginBound, "waiting for the LOGIN answer")
	if err != nil {
		conn.Close()
		return nil, false, err
	}
	if !res.OK() {
		conn.Close()
		if strings.Contains(res.Tagged, "NO [UNAVAILABLE]") {
			return nil, false, errUnavailable
		}
		return nil, false, fmt.Errorf("LOGIN: %s", res)
	}
	return cc, res.HasPrefix("* OK [XPROXYREUSE]"), nil
}

func (cc *chaosConn) nextTag() string {
	cc.n++
	return "c" + strconv.Itoa(cc.n)
}

func (cc *chaosConn) send(s string) error {
	_, err := io.WriteString(cc.conn, s)
	return err
}

// line reads one line with its literals inlined; every read must make
// progress within limit. what names the wait for a stall report; "" makes
// a timeout an ordinary error.
func (cc *chaosConn) line(limit time.Duration, what string) (string, error) {
	cc.pr.bound = limit
	var b strings.Builder
	for {
		l, err := cc.r.ReadString('\n')
		if err != nil {
			return "", cc.readErr(err, limit, what)
		}
		l = strings.TrimRight(l, "\r\n")
		b.WriteString(l)
		n, ok := testkit.LiteralSize(l)
		if !ok {
			return b.String(), nil
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(cc.r, buf); err != nil {
			return "", cc.readErr(err, limit, what+" (in a literal)")
		}
		b.Write(buf)
	}
}

func (cc *chaosConn) readErr(err error, limit time.Duration, what string) error {
	var ne net.Error
	if what != "" && errors.As(err, &ne) && ne.Timeout() {
		return &stallError{what: what, bound: limit, err: err}
	}
	if what == "" {
		return err
	}
	return cc.ended(err)
}

// ended classifies a failed read or write: after a BYE it is the proxy's
// clear answer, otherwise the connection was lost without one.
func (cc *chaosConn) ended(err error) error {
	if cc.bye != "" {
		return &byeError{line: cc.bye}
	}
	return fmt.Errorf("connection lost without a BYE: %w", err)
}

// readTagged reads up to the tagged reply to tag, noting a BYE on the way.
func (cc *chaosConn) readTagged(tag string, limit time.Duration, what string) (testkit.Response, error) {
	var res testkit.Response
	for {
		l, err := cc.line(limit, what)
		if err != nil {
			return res, err
		}
		if strings.HasPrefix(l, tag+" ") {
			res.Tagged = l
			return res, nil
		}
		if strings.HasPrefix(l, "* BYE") {
			cc.bye = l
		}
		res.Untagged = append(res.Untagged, l)
	}
}

// cmd sends one command and reads its answer. A BAD or NO is returned in
// res for the caller to judge.
func (cc *chaosConn) cmd(format string, a ...any) (testkit.Response, error) {
	tag := cc.nextTag()
	cmd := fmt.Sprintf(format, a...)
	if err := cc.send(tag + " " + cmd + "\r\n"); err != nil {
		return testkit.Response{}, cc.ended(err)
	}
	name, _, _ := strings.Cut(cmd, " ")
	return cc.readTagged(tag, stallBound, "waiting for the answer to "+name)
}

// selectInbox selects INBOX and wants the seeded number of messages.
func (cc *chaosConn) selectInbox(user string) error {
	res, err := cc.cmd("SELECT INBOX")
	if err != nil {
		return err
	}
	if !res.OK() {
		return fmt.Errorf("SELECT INBOX of %s: %s", user, res)
	}
	if want := fmt.Sprintf("* %d EXISTS", chaosMessages); !res.HasPrefix(want) {
		return fmt.Errorf("SELECT INBOX of %s: no %q in %s", user, want, res)
	}
	return nil
}

// logout wants BYE, the tagged OK and then the end of the connection.
func (cc *chaosConn) logout() error {
	tag := cc.nextTag()
	if err := cc.send(tag + " LOGOUT\r\n"); err != nil {
		return cc.ended(err)
	}
	res, err := cc.readTagged(tag, stallBound, "waiting for the answer to LOGOUT")
	if err != nil {
		return err
	}
	if !res.OK() || !res.HasPrefix("* BYE") {
		return fmt.Errorf("LOGOUT: %s", res)
	}
	if _, err := cc.r.ReadByte(); err != io.EOF {
		return fmt.Errorf("after LOGOUT: got %v, want EOF", err)
	}
	return nil
}

// ---------------------------------------------------------------------
// Faults

// A fault is applied to one backend (or, for a reload, to the daemon) and,
// unless it is instantaneous, undone after a while.
type fault struct {
	kind    string
	instant bool // nothing to undo
	apply   func(ch *chaos, i int) (undo func() error, err error)
}

var chaosFaults = []fault{
	{"pause-up", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Pause(faultnet.Up)
		return func() error { ch.nets[i].Resume(faultnet.Up); return nil }, nil
	}},
	{"pause-down", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Pause(faultnet.Down)
		return func() error { ch.nets[i].Resume(faultnet.Down); return nil }, nil
	}},
	{"drip-down", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Drip(faultnet.Down, 16, 50*time.Millisecond)
		return func() error { ch.nets[i].Resume(faultnet.Down); return nil }, nil
	}},
	{"drip-up", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Drip(faultnet.Up, 4, 50*time.Millisecond)
		return func() error { ch.nets[i].Resume(faultnet.Up); return nil }, nil
	}},
	// A stall just inside the first message body the backend sends.
	{"stall-in-literal", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].PauseOn(faultnet.Down, []byte("BODY[] {"))
		return func() error { ch.nets[i].Resume(faultnet.Down); return nil }, nil
	}},
	{"reset", true, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Reset()
		return nil, nil
	}},
	{"black-hole", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].BlackHole(true)
		return func() error { ch.nets[i].BlackHole(false); return nil }, nil
	}},
	{"refuse", false, func(ch *chaos, i int) (func() error, error) {
		ch.nets[i].Refuse(true)
		return func() error { ch.nets[i].Refuse(false); return nil }, nil
	}},
	{"sigstop", false, func(ch *chaos, i int) (func() error, error) {
		srv := ch.c.backends[i].srv
		if err := srv.Pause(); err != nil {
			return nil, err
		}
		return srv.Resume, nil
	}},
	{"consul-maintenance", false, func(ch *chaos, i int) (func() error, error) {
		id := ch.c.backends[i].id
		if err := ch.agent.Maintenance(id, true); err != nil {
			return nil, err
		}
		return func() error { return ch.agent.Maintenance(id, false) }, nil
	}},
	{"reload", true, func(ch *chaos, _ int) (func() error, error) {
		// A harmless change, so that every reload applies something.
		n := ch.reloads.Add(1)
		conf := ch.d.conf + fmt.Sprintf("limits {\n  max_clients = %d\n}\n", 5000-n%2)
		if err := os.WriteFile(ch.d.confPath, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		return nil, ch.d.cmd.Process.Signal(syscall.SIGHUP)
	}},
}

// plannedFault is one fault of the schedule: kind applied to backend at
// its offset from the start and, unless instantaneous, undone hold later.
type plannedFault struct {
	at, hold time.Duration
	fault    *fault
	backend  int
}

// plan draws the schedule for dur from rnd alone, on the schedule's own
// clock, so that a seed gives the same schedule however the run goes: a
// fault every 0.2-1 s on a backend without one, at most two backends under
// a fault at once. Most faults last 0.3-3 s, less than the timeouts, so
// the backend recovers before the proxy gives up on it; one in five lasts
// past stallBound, so the proxy's timeouts must end what waits on it.
func plan(rnd *rand.Rand, dur time.Duration, backends int) []plannedFault {
	var out []plannedFault
	busyUntil := make([]time.Duration, backends)
	for at := time.Duration(0); at < dur; at += time.Duration(200+rnd.IntN(800)) * time.Millisecond {
		f := &chaosFaults[rnd.IntN(len(chaosFaults))]
		var free []int
		for i, u := range busyUntil {
			if u <= at {
				free = append(free, i)
			}
		}
		i := -1
		if len(free) > 0 {
			i = free[rnd.IntN(len(free))]
		}
		hold := time.Duration(300+rnd.IntN(2700)) * time.Millisecond
		if rnd.IntN(5) == 0 {
			hold = stallBound + time.Duration(1000+rnd.IntN(4000))*time.Millisecond
		}
		if f.instant {
			hold = 0
		}
		if f.kind == "reload" {
			out = append(out, plannedFault{at: at, fault: f})
			continue
		}
		if len(free) < backends-1 {
			continue
		}
		busyUntil[i] = at + hold
		out = append(out, plannedFault{at: at, hold: hold, fault: f, backend: i})
	}
	return out
}

// inject applies the schedule until ctx ends, then undoes what is still
// in place.
func (ch *chaos) inject(ctx context.Context, schedule []plannedFault) {
	type event struct {
		at   time.Duration
		pf   *plannedFault
		undo bool
	}
	var events []event
	for i := range schedule {
		pf := &schedule[i]
		events = append(events, event{at: pf.at, pf: pf})
		if pf.hold > 0 {
			events = append(events, event{at: pf.at + pf.hold, pf: pf, undo: true})
		}
	}
	// At the same instant an undo goes first: it frees its backend.
	slices.SortStableFunc(events, func(a, b event) int {
		if a.at != b.at {
			return cmp.Compare(a.at, b.at)
		}
		return cmp.Compare(btoi(!a.undo), btoi(!b.undo))
	})
	undos := map[*plannedFault]func() error{}
	undo := func(pf *plannedFault) {
		u := undos[pf]
		if u == nil {
			return
		}
		delete(undos, pf)
		if err := u(); err != nil {
			ch.violate("undo %s on %s: %v", pf.fault.kind, ch.c.backends[pf.backend].id, err)
		}
		ch.note("-%s %s", pf.fault.kind, ch.c.backends[pf.backend].id)
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for _, ev := range events {
		// The wait is the schedule, not a wait for something.
		timer.Reset(time.Until(ch.start.Add(ev.at)))
		select {
		case <-ctx.Done():
			for pf := range undos {
				undo(pf)
			}
			return
		case <-timer.C:
		}
		if ev.undo {
			undo(ev.pf)
			continue
		}
		pf := ev.pf
		id := ch.c.backends[pf.backend].id
		u, err := pf.fault.apply(ch, pf.backend)
		if err != nil {
			ch.violate("apply %s on %s: %v", pf.fault.kind, id, err)
		}
		ch.count(ch.faults, pf.fault.kind)
		switch {
		case pf.fault.kind == "reload":
			ch.note("reload")
		case pf.hold == 0:
			ch.note("%s %s", pf.fault.kind, id)
		default:
			ch.note("+%s %s for %v", pf.fault.kind, id, pf.hold)
			if u != nil {
				undos[pf] = u
			}
		}
	}
	<-ctx.Done()
	for pf := range undos {
		undo(pf)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (ch *chaos) note(format string, a ...any) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.schedule = append(ch.schedule, fmt.Sprintf("%8.3fs ", time.Since(ch.start).Seconds())+fmt.Sprintf(format, a...))
}

// clearAll undoes every fault whatever state a failed test left.
func (ch *chaos) clearAll() {
	for i, p := range ch.nets {
		p.Resume(faultnet.Up)
		p.Resume(faultnet.Down)
		p.BlackHole(false)
		p.Refuse(false)
		ch.c.backends[i].srv.Resume()
		ch.agent.Maintenance(ch.c.backends[i].id, false)
	}
}

// ---------------------------------------------------------------------
// Observing the daemon

// monitor compares, every poll, the daemon's backend set (admin API: in
// the set, held back or marked down alike) with Consul's passing set. A
// change in Consul starts a clock that stops when the daemon has the same
// set; its reading is the lag. It also records peak sessions and backend
// connections.
func (ch *chaos) monitor(ctx context.Context) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	var (
		last    string
		pending time.Time // Consul changed then; the daemon not yet there
		failing time.Time // the first of a run of failed looks
	)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		want, err1 := consulPassing(hc, ch.agent.Addr)
		have, sessions, upstream, err2 := daemonSet(hc, ch.d.admin)
		if err := errors.Join(err1, err2); err != nil {
			if failing.IsZero() {
				failing = now
			} else if now.Sub(failing) > bound {
				ch.violate("monitor: no answer for %v: %v", bound, err)
				failing = time.Time{}
			}
			continue
		}
		failing = time.Time{}
		ch.mu.Lock()
		ch.peakSessions = max(ch.peakSessions, sessions)
		ch.peakUpstream = max(ch.peakUpstream, upstream)
		ch.mu.Unlock()
		if want != last {
			if last != "" && pending.IsZero() {
				pending = now
			}
			last = want
		}
		switch {
		case pending.IsZero():
		case have == want:
			ch.mu.Lock()
			ch.lags = append(ch.lags, time.Since(pending))
			ch.mu.Unlock()
			pending = time.Time{}
		case now.Sub(pending) > consulBound:
			ch.violate("the daemon's backend set is [%s] %v after Consul's became [%s]", have, now.Sub(pending).Round(time.Millisecond), want)
			pending = time.Time{}
		}
	}
}

// consulPassing is Consul's passing set of service IDs, sorted and joined.
func consulPassing(hc *http.Client, addr string) (string, error) {
	resp, err := hc.Get("http://" + addr + "/v1/health/service/" + serviceName + "?passing")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var entries []struct{ Service struct{ ID string } }
	if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
		return "", err
	}
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Service.ID)
	}
	slices.Sort(ids)
	return strings.Join(ids, ","), nil
}

// daemonSet is the daemon's backend set from its admin API, sorted and
// joined, with its sessions and open backend connections.
func daemonSet(hc *http.Client, admin string) (string, float64, float64, error) {
	resp, err := hc.Get("http://" + admin + "/api/v1/status")
	if err != nil {
		return "", 0, 0, err
	}
	defer resp.Body.Close()
	var st struct {
		Sessions float64
		Cache    struct{ Open float64 }
		Backends []struct{ ID string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return "", 0, 0, err
	}
	var ids []string
	for _, b := range st.Backends {
		ids = append(ids, b.ID)
	}
	slices.Sort(ids)
	return strings.Join(ids, ","), st.Sessions, st.Cache.Open, nil
}

// settled waits until no session is open, nothing is being closed, every
// backend connection the daemon counts is cached, and the injectors see
// no connection from the daemon beyond those: a socket the daemon lost
// count of but kept open would show there. (They may see fewer: a cached
// connection reset by the network stays cached, dead, until a login's
// check or the sweeper finds it.)
func (ch *chaos) settled(t *testing.T, when string) {
	t.Helper()
	waitFor(t, when+": sessions 0, every backend connection cached, none unaccounted for", func() (bool, string) {
		m := ch.d.metrics(t)
		conns := 0
		for _, p := range ch.nets {
			conns += p.Conns()
		}
		open, cached := m.get("imapproxy_upstream_connections"), m.get("imapproxy_cached_connections")
		ok := m.get("imapproxy_sessions") == 0 && m.get("imapproxy_cache_closing") == 0 && open == cached && float64(conns) <= open
		return ok, fmt.Sprintf("sessions=%v closing=%v open=%v cached=%v injector conns=%d",
			m.get("imapproxy_sessions"), m.get("imapproxy_cache_closing"), open, cached, conns)
	})
}

// resources scrapes the daemon's metrics over a fresh connection, so that
// the test's own idle HTTP connections (a goroutine and a descriptor each
// in the daemon) count the same before and after.
func (ch *chaos) resources(t *testing.T) metrics {
	t.Helper()
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	return ch.d.metrics(t)
}

// goroutines is the daemon's goroutine profile, for a leak report.
func (ch *chaos) goroutines() string {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + ch.d.admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return string(b)
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))].Round(time.Millisecond)
}

func fmtCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%d ", k, m[k])
	}
	return strings.TrimSpace(b.String())
}
