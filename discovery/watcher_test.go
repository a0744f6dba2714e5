package discovery

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"

	"github.com/imapproxy/imapproxy/internal/testkit"
)

// fakeConsul answers /v1/health/service/NAME in lock step with the test:
// each request is handed to the test (watchTest.next, registerTest.next),
// which answers it (fakeReq.answer / fail) or leaves it hanging like a
// blocking query.
type fakeConsul struct {
	reqs chan *fakeReq
}

type fakeReq struct {
	path  string
	query url.Values
	token string
	index uint64    // the index parameter, 0 when absent
	at    time.Time // arrival
	reply chan fakeReply
}

type fakeReply struct {
	status  int // 0 = 200
	index   uint64
	entries []*api.ServiceEntry
	body    string // instead of entries, when set
}

func newFakeConsul() *fakeConsul {
	return &fakeConsul{reqs: make(chan *fakeReq)}
}

func (f *fakeConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req := &fakeReq{
		path:  r.URL.Path,
		query: r.URL.Query(),
		token: r.Header.Get("X-Consul-Token"),
		at:    time.Now(),
		reply: make(chan fakeReply, 1),
	}
	if s := req.query.Get("index"); s != "" {
		req.index, _ = strconv.ParseUint(s, 10, 64)
	}
	select {
	case f.reqs <- req:
	case <-r.Context().Done():
		return
	}
	var rep fakeReply
	select {
	case rep = <-req.reply:
	case <-r.Context().Done():
		return
	}
	if rep.status != 0 && rep.status != http.StatusOK {
		http.Error(w, "injected failure", rep.status)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Consul-Index", strconv.FormatUint(rep.index, 10))
	h.Set("X-Consul-LastContact", "0")
	h.Set("X-Consul-KnownLeader", "true")
	if rep.body != "" {
		io.WriteString(w, rep.body)
		return
	}
	entries := rep.entries
	if entries == nil {
		entries = []*api.ServiceEntry{}
	}
	json.NewEncoder(w).Encode(entries)
}

func (r *fakeReq) answer(index uint64, entries ...*api.ServiceEntry) {
	r.reply <- fakeReply{index: index, entries: entries}
}

func (r *fakeReq) fail(status int) {
	r.reply <- fakeReply{status: status}
}

// watchTest runs a Watcher against a fakeConsul.
type watchTest struct {
	t       testing.TB
	fake    *fakeConsul
	w       *Watcher
	log     *testkit.SyncBuffer
	updates chan []Backend
	bound   time.Duration // how long next and nextUpdate wait
	cancel  context.CancelFunc
	done    chan error
}

// transport is how the watcher reaches the fake: over loopback TCP
// (httptest) or, inside a synctest bubble, over net.Pipe.
type transport int

const (
	loopback transport = iota
	pipe
)

// startWatch serves a fakeConsul, points a Watcher with opts at it and
// runs it until the test ends.
func startWatch(t testing.TB, tr transport, opts ConsulOptions) *watchTest {
	t.Helper()
	wt := &watchTest{
		t:       t,
		fake:    newFakeConsul(),
		log:     &testkit.SyncBuffer{},
		updates: make(chan []Backend, 16),
		done:    make(chan error, 1),
	}
	if opts.Service == "" {
		opts.Service = "imap"
	}
	opts.Logger = hclog.New(&hclog.LoggerOptions{
		Name:   "discovery",
		Level:  hclog.Debug,
		Output: io.MultiWriter(wt.log, t.Output()),
	})
	if err := opts.validate(); err != nil {
		t.Fatal(err)
	}
	cfg := opts.apiConfig()
	switch tr {
	case loopback:
		srv := httptest.NewServer(wt.fake) // 127.0.0.1
		t.Cleanup(srv.Close)
		cfg.Address = srv.Listener.Addr().String()
		cfg.Scheme = "http"
		wt.bound = 10 * time.Second
	case pipe:
		servePipe(t, wt.fake, cfg)
		wt.bound = time.Hour // of fake time: only passes if all else is stuck
	}
	w, err := newWatcher(opts, cfg)
	if err != nil {
		t.Fatal(err)
	}
	wt.w = w
	ctx, cancel := context.WithCancel(context.Background())
	wt.cancel = cancel
	go func() {
		wt.done <- w.Run(ctx, func(bs []Backend) { wt.updates <- bs })
	}()
	t.Cleanup(wt.stop)
	return wt
}

// stop cancels Run and checks that it returns nil.
func (wt *watchTest) stop() {
	wt.t.Helper()
	if wt.cancel == nil {
		return
	}
	wt.cancel()
	wt.cancel = nil
	timer := time.NewTimer(wt.bound)
	defer timer.Stop()
	select {
	case err := <-wt.done:
		if err != nil {
			wt.t.Errorf("Run = %v, want nil after cancel", err)
		}
	case <-timer.C:
		wt.t.Fatalf("Run did not return within %v of cancel", wt.bound)
	}
}

// next returns the watcher's next request.
func (wt *watchTest) next() *fakeReq {
	wt.t.Helper()
	timer := time.NewTimer(wt.bound)
	defer timer.Stop()
	select {
	case r := <-wt.fake.reqs:
		return r
	case err := <-wt.done:
		wt.t.Fatalf("Run returned %v while a request was expected", err)
	case <-timer.C:
		wt.t.Fatalf("no request from the watcher within %v", wt.bound)
	}
	return nil
}

// nextUpdate returns the next set delivered.
func (wt *watchTest) nextUpdate() []Backend {
	wt.t.Helper()
	timer := time.NewTimer(wt.bound)
	defer timer.Stop()
	select {
	case bs := <-wt.updates:
		return bs
	case <-timer.C:
		wt.t.Fatalf("no update within %v", wt.bound)
	}
	return nil
}

// noUpdate checks that nothing was delivered. Run calls update before it
// sends its next query, so once the test holds that query this is exact.
func (wt *watchTest) noUpdate(why string) {
	wt.t.Helper()
	select {
	case bs := <-wt.updates:
		wt.t.Errorf("%s: update(%v), want none", why, bs)
	default:
	}
}

func (wt *watchTest) wantUpdate(want []Backend) {
	wt.t.Helper()
	if got := wt.nextUpdate(); got == nil || !Equal(got, want) {
		wt.t.Errorf("update(%v), want update(%v)", got, want)
	}
}

// pipeListener is an in-memory net.Listener whose connections are
// net.Pipe pairs: usable inside a synctest bubble, where loopback TCP is
// not (a goroutine blocked on a real socket is not durably blocked, so
// the bubble's clock would never move).
type pipeListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

func (l *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// servePipe serves h on a pipeListener until the test ends and points
// cfg at it.
func servePipe(t testing.TB, h http.Handler, cfg *api.Config) {
	l := newPipeListener()
	srv := &http.Server{Handler: h}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(l)
	}()
	tr := &http.Transport{DialContext: l.dial}
	t.Cleanup(func() {
		srv.Close()
		tr.CloseIdleConnections()
		<-served
	})
	cfg.Address = "consul.test:8500"
	cfg.Scheme = "http"
	cfg.Transport = tr
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

var (
	beA = Backend{ID: "imap-a", Addr: "10.0.0.1:143", Weight: 1}
	beB = Backend{ID: "imap-b", Addr: "10.0.0.2:143", Weight: 2, TLS: TLSStartTLS}
)

func entryA() *api.ServiceEntry { return entry("imap-a", "10.0.0.1", 143, 1, nil) }
func entryB() *api.ServiceEntry {
	return entry("imap-b", "10.0.0.2", 143, 1, map[string]string{"imap_weight": "2", "imap_tls": "starttls"})
}

func TestWatcherQuery(t *testing.T) {
	wt := startWatch(t, loopback, ConsulOptions{
		Service: "imap", Tag: "primary", Token: "s3cret", Datacenter: "dc9",
		Namespace: "mail", Partition: "part", WaitTime: 90 * time.Second,
	})
	wt.w.minInterval = 0
	r := wt.next()
	checks := []struct{ name, got, want string }{
		{"path", r.path, "/v1/health/service/imap"},
		{"passing", r.query.Get("passing"), "1"},
		{"tag", r.query.Get("tag"), "primary"},
		{"dc", r.query.Get("dc"), "dc9"},
		{"ns", r.query.Get("ns"), "mail"},
		{"partition", r.query.Get("partition"), "part"},
		{"wait", r.query.Get("wait"), "90000ms"},
		{"index", r.query.Get("index"), ""},
		{"token", r.token, "s3cret"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("first query %s = %q, want %q", c.name, c.got, c.want)
		}
	}
	r.answer(10, entryA())
	wt.wantUpdate([]Backend{beA})
	if r := wt.next(); r.index != 10 || r.query.Get("wait") != "90000ms" {
		t.Errorf("second query index=%d wait=%s, want index=10 wait=90000ms", r.index, r.query.Get("wait"))
	}
}

func TestWatcherDelivery(t *testing.T) {
	wt := startWatch(t, loopback, ConsulOptions{})
	wt.w.minInterval = 0

	// The first answer is delivered even when empty.
	r := wt.next()
	if r.index != 0 {
		t.Errorf("first query index = %d, want 0", r.index)
	}
	r.answer(10)
	if got := wt.nextUpdate(); got == nil || len(got) != 0 {
		t.Errorf("first update(%#v), want an empty non-nil set", got)
	}

	// Same index, same result (a wait timeout): nothing.
	r = wt.next()
	if r.index != 10 {
		t.Errorf("query index = %d, want 10", r.index)
	}
	r.answer(10)
	r = wt.next()
	wt.noUpdate("same index, same set")

	// A change is delivered, normalized.
	r.answer(11, entryB(), entryA())
	wt.wantUpdate([]Backend{beA, beB})

	// New index, same set in another order: dropped.
	r = wt.next()
	if r.index != 11 {
		t.Errorf("query index = %d, want 11", r.index)
	}
	r.answer(12, entryA(), entryB())
	r = wt.next()
	wt.noUpdate("new index, same set")

	// The index goes backwards: the next query starts over from 0.
	if r.index != 12 {
		t.Errorf("query index = %d, want 12", r.index)
	}
	r.answer(5, entryA(), entryB())
	r = wt.next()
	wt.noUpdate("index backwards, same set")
	if r.index != 0 {
		t.Errorf("query after the index went backwards has index=%d, want 0", r.index)
	}
	r.answer(6, entryA())
	wt.wantUpdate([]Backend{beA})
	r = wt.next()
	if r.index != 6 {
		t.Errorf("query index = %d, want 6", r.index)
	}

	r.answer(7, entryA())
	r = wt.next()
	wt.noUpdate("same set after index 6")

	st := wt.w.Status()
	if !st.Healthy || st.Backends != 1 || st.Failures != 0 || st.LastChange.IsZero() || st.LastSuccess.Before(st.LastChange) {
		t.Errorf("Status = %+v, want healthy with 1 backend and no failures", st)
	}

	// A second Run of the same Watcher is refused.
	if err := wt.w.Run(t.Context(), func([]Backend) {}); err != ErrRunning {
		t.Errorf("second Run = %v, want ErrRunning", err)
	}
}

func TestWatcherUpdateMayKeepSlice(t *testing.T) {
	wt := startWatch(t, loopback, ConsulOptions{})
	wt.w.minInterval = 0
	wt.next().answer(3, entryA(), entryB())
	got := wt.nextUpdate()
	got[0].Addr = "scribbled:1" // the caller owns what it got
	wt.next().answer(4, entryA(), entryB())
	wt.next()
	wt.noUpdate("caller changed its copy")
}

func TestWatcherErrors(t *testing.T) {
	wt := startWatch(t, loopback, ConsulOptions{MinBackoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond})
	wt.w.minInterval = 0

	// Failures before any success: no update, not healthy.
	wt.next().fail(http.StatusInternalServerError)
	r := wt.next()
	wt.noUpdate("first query failed")
	st := wt.w.Status()
	if st.Healthy || st.Failures != 1 || !strings.Contains(st.LastError, "500") || !st.LastSuccess.IsZero() {
		t.Errorf("Status after a failure = %+v, want unhealthy, 1 failure, a 500 error", st)
	}
	if r.index != 0 {
		t.Errorf("retry index = %d, want 0", r.index)
	}
	r.fail(http.StatusInternalServerError)
	r = wt.next()
	wt.noUpdate("second query failed")
	if st := wt.w.Status(); st.Healthy || st.Failures != 2 {
		t.Errorf("Status after two failures = %+v, want unhealthy, 2 failures", st)
	}

	// Recovery delivers the first set.
	r.answer(20, entryA(), entryB())
	wt.wantUpdate([]Backend{beA, beB})
	r = wt.next()
	st = wt.w.Status()
	if !st.Healthy || st.Failures != 0 || st.Backends != 2 || st.LastError == "" {
		t.Errorf("Status after recovery = %+v, want healthy, 0 failures, 2 backends, last error kept", st)
	}

	// A failure later keeps the set (no update) and the index.
	r.fail(http.StatusServiceUnavailable)
	r = wt.next()
	wt.noUpdate("query failed after a success")
	if st := wt.w.Status(); st.Healthy || st.Failures != 1 || st.Backends != 2 || !strings.Contains(st.LastError, "503") {
		t.Errorf("Status after a new failure = %+v, want unhealthy, 1 failure, 2 backends kept", st)
	}
	if r.index != 0 {
		t.Errorf("retry after a failure has index %d, want 0 (no blocking after lost contact)", r.index)
	}
	// Consul answering again with the same set changes nothing.
	r.answer(21, entryB(), entryA())
	r = wt.next()
	wt.noUpdate("same set after a failure")
	if st := wt.w.Status(); !st.Healthy || st.Failures != 0 {
		t.Errorf("Status = %+v, want healthy again", st)
	}
	// Garbage in a 200 is a failure too.
	r.reply <- fakeReply{index: 22, body: `[{"Service": `}
	r = wt.next()
	wt.noUpdate("undecodable answer")
	if st := wt.w.Status(); st.Healthy || st.Failures != 1 || st.Backends != 2 {
		t.Errorf("Status after an undecodable answer = %+v, want unhealthy, 2 backends kept", st)
	}
	if r.index != 0 {
		t.Errorf("retry after an undecodable answer has index %d, want 0", r.index)
	}
	wt.stop()

	log := wt.log.String()
	if n := strings.Count(log, "[WARN]  discovery: consul query failed"); n != 3 {
		t.Errorf("%d warnings for 3 failure streaks, want 3:\n%s", n, log)
	}
	if n := strings.Count(log, "[DEBUG] discovery: consul query failed again"); n != 1 {
		t.Errorf("%d debug lines for repeated failures, want 1:\n%s", n, log)
	}
	if n := strings.Count(log, "consul query succeeded again"); n != 2 {
		t.Errorf("%d recovery lines, want 2:\n%s", n, log)
	}
}

func TestWatcherUnreachable(t *testing.T) {
	// A closed port: every query fails at once, the watcher backs off.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	w, err := NewWatcher(ConsulOptions{Service: "imap", Address: addr, MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	statuses := make(chan Status, 1)
	w.afterQuery = func(st Status) {
		select {
		case statuses <- st:
		default:
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	updated := make(chan []Backend, 1)
	go func() { done <- w.Run(ctx, func(bs []Backend) { updated <- bs }) }()
	for i := 0; i < 3; i++ {
		st := <-statuses
		if st.Healthy || st.Failures == 0 || st.LastError == "" {
			t.Errorf("Status = %+v, want unhealthy with an error", st)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if len(updated) != 0 {
		t.Errorf("update called while Consul was unreachable: %v", <-updated)
	}
}
