package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Read buffer per connection: a webmail FETCH of 20 envelopes is ~7 KiB;
// idle sessions are many and read little.
const (
	readBufSize     = 8 << 10
	idleReadBufSize = 4 << 10
	dialErrorPause  = 10 * time.Millisecond // so a refused target is not spun on
)

var cmdID = []byte("ID NIL")

// user is one login: the name and its ready-made `LOGIN "name" "pw"`.
type user struct {
	name  string
	login []byte
}

// bench is one run of a workload. Workers share only the ticket counter
// and the stop flag.
type bench struct {
	cfg    config
	users  []user
	stderr io.Writer
	dialer net.Dialer

	selectCmd    []byte // SELECT "mailbox"
	fetchCmd     []byte // UID FETCH set (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)
	bigSelectCmd []byte // SELECT "big mailbox"
	bulkCmd      []byte // UID FETCH 1:* BODY.PEEK[]

	stop    atomic.Bool  // no new cycles: duration over or interrupted
	tickets atomic.Int64 // cycles started, against -count
}

func newBench(cfg config, stderr io.Writer) *bench {
	b := &bench{cfg: cfg, stderr: stderr}
	b.dialer = net.Dialer{Timeout: cfg.timeout, KeepAlive: -1}
	for _, name := range cfg.users {
		login := appendQuoted([]byte("LOGIN "), name)
		login = append(login, ' ')
		login = appendQuoted(login, cfg.passwordOf(name))
		b.users = append(b.users, user{name: name, login: login})
	}
	b.selectCmd = appendQuoted([]byte("SELECT "), cfg.mailbox)
	b.fetchCmd = []byte("UID FETCH " + cfg.fetch + " (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
	b.bigSelectCmd = appendQuoted([]byte("SELECT "), cfg.bigMailbox)
	b.bulkCmd = []byte("UID FETCH 1:* BODY.PEEK[]")
	return b
}

// take claims the next cycle; false once the run is over.
func (b *bench) take() bool {
	if b.stop.Load() {
		return false
	}
	return b.cfg.count <= 0 || b.tickets.Add(1) <= b.cfg.count
}

// dial connects to the target. TCP_NODELAY is on: Go sets it on every
// TCP connection (net.TCPConn.SetNoDelay: "the default is true"); setting
// it again would cost a syscall per cycle. KeepAlive -1 saves two more.
func (b *bench) dial() (net.Conn, error) {
	return b.dialer.Dial("tcp", b.cfg.addr)
}

// run runs the configured workload and summarises it.
func run(ctx context.Context, cfg config, stderr io.Writer) (*summary, error) {
	b := newBench(cfg, stderr)
	start := time.Now()
	cpu0 := cpuTime()
	var (
		st  *stats
		err error
	)
	switch cfg.workload {
	case "webmail":
		st = b.runWorkers(ctx, (*worker).webmailLoop)
	case "login":
		st = b.runWorkers(ctx, (*worker).loginLoop)
	case "bulk":
		st = b.runWorkers(ctx, (*worker).bulkLoop)
	case "idle":
		st, err = b.runIdle(ctx)
	default:
		return nil, fmt.Errorf("unknown workload %q", cfg.workload)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	if err != nil {
		return nil, err
	}
	return b.summarize(st, elapsed, cpu), nil
}

// runWorkers runs -c workers of loop until -count cycles or -duration.
// Cycles in flight when the time is up finish (bounded by -timeout).
func (b *bench) runWorkers(ctx context.Context, loop func(*worker)) *stats {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.duration)
	defer cancel()
	stopWatch := context.AfterFunc(ctx, func() { b.stop.Store(true) })
	defer stopWatch()

	workers := make([]*worker, b.cfg.conc)
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{id: i, b: b, c: newClient(readBufSize, b.cfg.timeout)}
		workers[i] = w
		wg.Go(func() { loop(w) })
	}
	wg.Wait()
	for _, w := range workers {
		w.st.bytes += w.c.litBytes
	}
	return mergeWorkers(workers)
}

func mergeWorkers(workers []*worker) *stats {
	total := new(stats)
	for _, w := range workers {
		total.merge(&w.st)
	}
	return total
}

// worker runs cycles one after another on its own client.
type worker struct {
	id int
	b  *bench
	c  *client
	st stats
}

// fail records a failed cycle; after a failed dial it pauses briefly.
func (w *worker) fail(err error) {
	w.st.fail(err)
	if kindOf(err) == kindDial {
		time.Sleep(dialErrorPause)
	}
}

// open dials, reads the greeting, logs in (timed as login_ms), sends ID
// NIL with -id, and counts the backend reached: the ID reply's name, else
// the greeting's "(NAME)".
func (w *worker) open(u *user) error {
	conn, err := w.b.dial()
	if err != nil {
		return stepErr(kindDial, err)
	}
	c := w.c
	c.attach(conn)
	if err := c.greeting(); err != nil {
		return stepErr(kindGreeting, err)
	}
	t := time.Now()
	if err := c.run(u.login); err != nil {
		return stepErr(kindLoginNO, err)
	}
	w.st.login.record(time.Since(t))
	if c.reused {
		w.st.reused++
	}
	if w.b.cfg.id {
		if err := c.run(cmdID); err != nil {
			return stepErr(kindID, err)
		}
	}
	name := c.greetName
	if len(c.idName) > 0 {
		name = c.idName
	}
	w.st.addBackend(name)
	return nil
}

// cycles runs cycle round-robin over the worker's own users, timing each
// cycle from connect to close. With at least as many users as workers,
// worker i takes users i, i+W, i+2W, ... (W workers), so no user has two
// sessions at once, as a person with one webmail tab has not. Users
// shared by all workers drifted into convoys: workers that met on one
// user stayed together, and each user had up to W sessions at once.
func (w *worker) cycles(cycle func(*worker, *user) error) {
	users := w.b.users
	stride := w.b.cfg.conc
	if len(users) < stride {
		stride = 1 // fewer users than workers: they must be shared
	}
	mine := (len(users) - w.id%len(users) + stride - 1) / stride // users i, i+stride, ... below len
	for k := 0; w.b.take(); k++ {
		u := &users[(w.id%len(users)+(k%mine)*stride)%len(users)]
		t0 := time.Now()
		err := cycle(w, u)
		w.c.close()
		if err != nil {
			w.fail(err)
			continue
		}
		w.st.cycle.record(time.Since(t0))
		w.st.cycles++
	}
}

func (w *worker) webmailLoop() { w.cycles((*worker).webmail) }
func (w *worker) loginLoop()   { w.cycles((*worker).login) }

// webmail is one page view: connect, LOGIN, SELECT, UID FETCH of the
// headers list, LOGOUT.
func (w *worker) webmail(u *user) error {
	if err := w.open(u); err != nil {
		return err
	}
	c := w.c
	if err := c.run(w.b.selectCmd); err != nil {
		return stepErr(kindSelect, err)
	}
	c.fetches = 0
	if err := c.run(w.b.fetchCmd); err != nil {
		return stepErr(kindFetch, err)
	}
	w.st.messages += c.fetches
	if err := c.logout(); err != nil {
		return stepErr(kindLogout, err)
	}
	return nil
}

// login is connect, LOGIN, LOGOUT.
func (w *worker) login(u *user) error {
	if err := w.open(u); err != nil {
		return err
	}
	if err := w.c.logout(); err != nil {
		return stepErr(kindLogout, err)
	}
	return nil
}

// bulkLoop keeps one session (worker i logs in as user i) with the big
// mailbox selected and fetches every message in it per cycle. A failed
// session is replaced at the next cycle; the cycle time is the FETCH
// alone.
func (w *worker) bulkLoop() {
	u := &w.b.users[w.id%len(w.b.users)]
	c := w.c
	if !w.b.cfg.noSplice {
		if err := c.useSplice(); err != nil {
			fmt.Fprintf(w.b.stderr, "no splice: %v\n", err)
		}
		defer c.release()
	}
	open := false
	for w.b.take() {
		if !open {
			if err := w.openBig(u); err != nil {
				c.close()
				w.fail(err)
				continue
			}
			open = true
		}
		t0 := time.Now()
		c.fetches = 0
		err := c.run(w.b.bulkCmd)
		if err == nil && c.fetches == 0 {
			err = errors.New("UID FETCH 1:* returned no message")
		}
		if err != nil {
			c.close()
			open = false
			w.fail(stepErr(kindFetch, err))
			continue
		}
		w.st.cycle.record(time.Since(t0))
		w.st.cycles++
		w.st.messages += c.fetches
	}
	if open {
		if err := c.logout(); err != nil {
			w.st.fail(stepErr(kindLogout, err))
		}
		c.close()
	}
}

func (w *worker) openBig(u *user) error {
	if err := w.open(u); err != nil {
		return err
	}
	if err := w.c.run(w.b.bigSelectCmd); err != nil {
		return stepErr(kindSelect, err)
	}
	if w.c.exists == 0 {
		return stepErr(kindSelect, fmt.Errorf("mailbox %q is empty", w.b.cfg.bigMailbox))
	}
	return nil
}

// runIdle opens -sessions sessions with -c dialers (each LOGIN, SELECT,
// IDLE until "+"), holds them all for -idle-hold with no goroutine per
// session, then ends each with DONE and LOGOUT. A cycle is a session that
// went all the way; cycle_ms is the time to reach IDLE.
func (b *bench) runIdle(ctx context.Context) (*stats, error) {
	stopWatch := context.AfterFunc(ctx, func() { b.stop.Store(true) })
	defer stopWatch()

	n := b.cfg.sessions
	sessions := make([]*client, n)
	workers := make([]*worker, b.cfg.conc)
	for i := range workers {
		workers[i] = &worker{id: i, b: b}
	}

	var next atomic.Int64
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(func() {
			for !b.stop.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				w.c = newClient(idleReadBufSize, b.cfg.timeout)
				t0 := time.Now()
				if err := w.openIdle(&b.users[i%len(b.users)]); err != nil {
					w.st.bytes += w.c.litBytes
					w.c.close()
					w.fail(err)
					continue
				}
				w.st.cycle.record(time.Since(t0))
				w.st.held++
				sessions[i] = w.c
			}
		})
	}
	wg.Wait()

	var held int64
	for _, w := range workers {
		held += w.st.held
		w.c = nil
	}
	if err := b.hold(ctx, held); err != nil {
		closeAll(sessions)
		return nil, err
	}

	next.Store(0)
	for _, w := range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c := sessions[i]
				if c == nil {
					continue
				}
				err := endIdle(c)
				w.st.bytes += c.litBytes
				c.close()
				if err != nil {
					w.st.fail(err)
					continue
				}
				w.st.cycles++
			}
		})
	}
	wg.Wait()
	return mergeWorkers(workers), nil
}

func (w *worker) openIdle(u *user) error {
	if err := w.open(u); err != nil {
		return err
	}
	if err := w.c.run(w.b.selectCmd); err != nil {
		return stepErr(kindSelect, err)
	}
	if err := w.c.idle(); err != nil {
		return stepErr(kindIdle, err)
	}
	return nil
}

func endIdle(c *client) error {
	if err := c.done(); err != nil {
		return stepErr(kindIdle, err)
	}
	if err := c.logout(); err != nil {
		return stepErr(kindLogout, err)
	}
	return nil
}

func closeAll(sessions []*client) {
	for _, c := range sessions {
		if c != nil {
			c.close()
		}
	}
}

// hold announces the held sessions (stderr line, and the -idle-signal
// file while holding) and waits -idle-hold or until ctx ends.
func (b *bench) hold(ctx context.Context, held int64) error {
	fmt.Fprintf(b.stderr, "holding %d sessions for %v\n", held, b.cfg.idleHold)
	if f := b.cfg.idleSignal; f != "" {
		if err := os.WriteFile(f, fmt.Appendf(nil, "held %d\n", held), 0o644); err != nil {
			return fmt.Errorf("idle signal: %w", err)
		}
		defer os.Remove(f)
	}
	timer := time.NewTimer(b.cfg.idleHold)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	}
	return nil
}
