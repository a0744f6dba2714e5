package main

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// pipeClient returns a client on one end of a net.Pipe whose other end
// writes script and closes. The client expects replies tagged a1.
func pipeClient(t *testing.T, bufSize int, script string) *client {
	t.Helper()
	cl, srv := net.Pipe()
	var wg sync.WaitGroup
	wg.Go(func() {
		_, _ = io.WriteString(srv, script)
		srv.Close()
	})
	t.Cleanup(func() {
		cl.Close()
		srv.Close()
		wg.Wait()
	})
	c := newClient(bufSize, 5*time.Second)
	c.attach(cl)
	c.begin() // tag a1, nothing sent
	return c
}

type resp struct {
	kind respKind
	text string
}

func TestReadResp(t *testing.T) {
	big := strings.Repeat("x", keepLiteral+10)
	tests := []struct {
		name    string
		bufSize int
		script  string
		want    []resp
		lit     int64            // literal octets counted
		wantErr func(error) bool // for the read after want; nil: io.EOF-like end is not checked
		errName string
	}{
		{
			name:   "untagged then tagged",
			script: "* OK hello\r\n* 3 EXISTS\r\na1 OK done\r\n",
			want:   []resp{{respUntagged, "* OK hello"}, {respUntagged, "* 3 EXISTS"}, {respTagged, "a1 OK done"}},
		},
		{
			name:   "literal holding CRLF and literal-like text",
			script: "* 1 FETCH (UID 1 BODY[] {12}\r\nab\r\n}\r\n{3}\r\n)\r\na1 OK\r\n",
			want:   []resp{{respUntagged, "* 1 FETCH (UID 1 BODY[] {12}\r\nab\r\n}\r\n{3}\r\n)"}, {respTagged, "a1 OK"}},
			lit:    12,
		},
		{
			name:   "several literals, one empty, in an envelope",
			script: "* 2 FETCH (ENVELOPE ({5}\r\nhello {0}\r\n NIL))\r\na1 OK\r\n",
			want:   []resp{{respUntagged, "* 2 FETCH (ENVELOPE ({5}\r\nhello {0}\r\n NIL))"}, {respTagged, "a1 OK"}},
			lit:    5,
		},
		{
			name:   "big literal counted, not kept",
			script: "* 3 FETCH (BODY[] {" + itoa(len(big)) + "}\r\n" + big + ")\r\na1 OK\r\n",
			want:   []resp{{respUntagged, "* 3 FETCH (BODY[] {" + itoa(len(big)) + "}\r\n)"}, {respTagged, "a1 OK"}},
			lit:    int64(len(big)),
		},
		{
			name:    "big literal through a tiny buffer",
			bufSize: 16,
			script:  "* 3 FETCH (BODY[] {" + itoa(len(big)) + "}\r\n" + big + ")\r\na1 OK\r\n",
			want:    []resp{{respUntagged, "* 3 FETCH (BODY[] {" + itoa(len(big)) + "}\r\n)"}, {respTagged, "a1 OK"}},
			lit:     int64(len(big)),
		},
		{
			name:    "long line and literal through a tiny buffer",
			bufSize: 16,
			script:  "* OK " + strings.Repeat("y", 100) + "\r\n* 4 FETCH (X {20}\r\n0123456789abcdefghij)\r\na1 NO nope\r\n",
			want:    []resp{{respUntagged, "* OK " + strings.Repeat("y", 100)}, {respUntagged, "* 4 FETCH (X {20}\r\n0123456789abcdefghij)"}, {respTagged, "a1 NO nope"}},
			lit:     20,
		},
		{
			name:   "literal8 and non-synchronizing form",
			script: "* 5 FETCH (BINARY[] ~{4}\r\nabcd X {2+}\r\nzz)\r\na1 OK\r\n",
			want:   []resp{{respUntagged, "* 5 FETCH (BINARY[] ~{4}\r\nabcd X {2+}\r\nzz)"}, {respTagged, "a1 OK"}},
			lit:    6,
		},
		{
			name:   "continuations",
			script: "+ idling\r\n+\r\n",
			want:   []resp{{respCont, "+ idling"}, {respCont, "+"}},
		},
		{
			name:   "not a literal: braces inside text",
			script: "* OK {x}\r\n* OK a{12}b\r\na1 OK\r\n",
			want:   []resp{{respUntagged, "* OK {x}"}, {respUntagged, "* OK a{12}b"}, {respTagged, "a1 OK"}},
		},
		{
			name:    "foreign tag",
			script:  "a2 OK not ours\r\n",
			wantErr: func(err error) bool { var pe *protoError; return errors.As(err, &pe) },
			errName: "protocol error",
		},
		{
			name:    "EOF inside a literal",
			script:  "* 1 FETCH (BODY[] {10}\r\nabc",
			wantErr: func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) },
			errName: "unexpected EOF",
		},
		{
			name:    "EOF inside a big literal",
			script:  "* 1 FETCH (BODY[] {100000}\r\nabc",
			wantErr: func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) },
			errName: "unexpected EOF",
		},
		{
			name:    "EOF before CRLF",
			script:  "* OK partial",
			wantErr: func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) },
			errName: "unexpected EOF",
		},
		{
			name:    "absurd literal",
			script:  "* 1 FETCH (BODY[] {99999999999999999}\r\n",
			wantErr: func(err error) bool { var pe *protoError; return errors.As(err, &pe) },
			errName: "protocol error",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			size := tt.bufSize
			if size == 0 {
				size = readBufSize
			}
			c := pipeClient(t, size, tt.script)
			for i, w := range tt.want {
				kind, err := c.readResp()
				if err != nil {
					t.Fatalf("response %d: %v", i, err)
				}
				if kind != w.kind || string(c.resp) != w.text {
					t.Fatalf("response %d = (%d, %q), want (%d, %q)", i, kind, clip(c.resp), w.kind, clip([]byte(w.text)))
				}
			}
			if c.litBytes != tt.lit {
				t.Errorf("literal bytes = %d, want %d", c.litBytes, tt.lit)
			}
			if tt.wantErr != nil {
				_, err := c.readResp()
				if !tt.wantErr(err) {
					t.Errorf("readResp error = %v, want %s", err, tt.errName)
				}
			}
		})
	}
}

func itoa(n int) string { return string(appendInt(nil, n)) }

func appendInt(b []byte, n int) []byte {
	if n >= 10 {
		b = appendInt(b, n/10)
	}
	return append(b, byte('0'+n%10))
}

// step is one command of a script: the server scripted starts reads one
// command per Read on the server end of a pipe, checks it, and writes the
// reply. net.Pipe hands a Read at most one Write, so an exact match also
// proves one write per command.
type step struct {
	want  string // the exact bytes of one write
	reply string
}

func scripted(t *testing.T, greeting string, steps []step) (*client, func()) {
	t.Helper()
	cl, srv := net.Pipe()
	var wg sync.WaitGroup
	wg.Go(func() {
		defer srv.Close()
		if _, err := io.WriteString(srv, greeting); err != nil {
			t.Errorf("write greeting: %v", err)
			return
		}
		buf := make([]byte, 4096)
		for i, s := range steps {
			n, err := srv.Read(buf)
			if err != nil {
				t.Errorf("step %d: read: %v", i, err)
				return
			}
			if got := string(buf[:n]); got != s.want {
				t.Errorf("step %d: read %q, want %q in one write", i, got, s.want)
				return
			}
			if _, err := io.WriteString(srv, s.reply); err != nil {
				t.Errorf("step %d: write: %v", i, err)
				return
			}
		}
	})
	c := newClient(readBufSize, 5*time.Second)
	c.attach(cl)
	return c, func() {
		c.close()
		srv.Close()
		wg.Wait()
	}
}

func TestSessionScripted(t *testing.T) {
	c, done := scripted(t, "* OK [CAPABILITY IMAP4rev1 ID] Dovecot ready (backend-7).\r\n", []step{
		{`a1 LOGIN "us\"er" "p\\w"` + "\r\n", "* OK [XPROXYREUSE] IMAP connection reused by imapproxy\r\na1 OK [CAPABILITY IMAP4rev1] Logged in\r\n"},
		{"a2 ID NIL\r\n", "* ID (\"version\" \"2.3\" \"name\" {9}\r\nbackend-2)\r\na2 OK ID completed\r\n"},
		{`a3 SELECT "INBOX"` + "\r\n", "* FLAGS (\\Seen)\r\n* 20 EXISTS\r\n* 0 RECENT\r\na3 OK [READ-WRITE] Select completed\r\n"},
		{"a4 UID FETCH 1:2 (FLAGS)\r\n", "* 1 FETCH (UID 1 FLAGS (\\Seen) ENVELOPE (\"d\" {3}\r\nabc NIL))\r\n* 2 fetch (UID 2 FLAGS ())\r\na4 OK Fetch completed\r\n"},
		{"a5 LOGOUT\r\n", "* BYE Logging out\r\na5 OK Logout completed\r\n"},
	})
	defer done()
	if err := c.greeting(); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	if string(c.greetName) != "backend-7" {
		t.Errorf("greeting name = %q, want backend-7", c.greetName)
	}
	login := appendQuoted([]byte("LOGIN "), `us"er`)
	login = appendQuoted(append(login, ' '), `p\w`)
	if err := c.run(login); err != nil {
		t.Fatalf("LOGIN: %v", err)
	}
	if !c.reused {
		t.Error("XPROXYREUSE not noticed")
	}
	if err := c.run(cmdID); err != nil {
		t.Fatalf("ID: %v", err)
	}
	if string(c.idName) != "backend-2" {
		t.Errorf("ID name = %q, want backend-2", c.idName)
	}
	if err := c.run([]byte(`SELECT "INBOX"`)); err != nil {
		t.Fatalf("SELECT: %v", err)
	}
	if c.exists != 20 {
		t.Errorf("exists = %d, want 20", c.exists)
	}
	if err := c.run([]byte("UID FETCH 1:2 (FLAGS)")); err != nil {
		t.Fatalf("FETCH: %v", err)
	}
	if c.fetches != 2 || c.litBytes != 9+3 {
		t.Errorf("fetches, literal bytes = %d, %d; want 2, 12 (ID and FETCH literals)", c.fetches, c.litBytes)
	}
	if c.bye {
		t.Error("BYE seen before LOGOUT")
	}
	if err := c.logout(); err != nil {
		t.Fatalf("LOGOUT: %v", err)
	}
}

func TestIdleScripted(t *testing.T) {
	c, done := scripted(t, "* OK ready\r\n", []step{
		{"a1 IDLE\r\n", "* 3 EXISTS\r\n+ idling\r\n"},
		{"DONE\r\n", "* 4 EXISTS\r\na1 OK Idle completed\r\n"},
	})
	defer done()
	if err := c.greeting(); err != nil {
		t.Fatal(err)
	}
	if len(c.greetName) != 0 {
		t.Errorf("greeting name = %q, want none", c.greetName)
	}
	if err := c.idle(); err != nil {
		t.Fatalf("IDLE: %v", err)
	}
	if err := c.done(); err != nil {
		t.Fatalf("DONE: %v", err)
	}
	if c.exists != 4 {
		t.Errorf("exists = %d, want 4", c.exists)
	}
}

// TestErrorKinds runs one command against scripted replies and checks
// how the failure is classified.
func TestErrorKinds(t *testing.T) {
	tests := []struct {
		name  string
		stage errKind
		reply string // then the server closes
		want  errKind
	}{
		{"login NO", kindLoginNO, "a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", kindLoginNO},
		{"login BAD", kindLoginNO, "a1 BAD Error in IMAP command\r\n", kindLoginBAD},
		{"select NO", kindSelect, "a1 NO Mailbox doesn't exist\r\n", kindSelect},
		{"select BAD is select", kindSelect, "a1 BAD no\r\n", kindSelect},
		{"bye then close", kindFetch, "* BYE Server shutting down.\r\n", kindBye},
		{"close without a word", kindSelect, "", kindSelect},
		{"garbage", kindFetch, "hello\r\n", kindProtocol},
		{"unknown status", kindFetch, "a1 MAYBE\r\n", kindProtocol},
		{"continuation to a plain command", kindFetch, "+ go on\r\n", kindProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, done := scripted(t, "* OK hi\r\n", []step{{"a1 CMD\r\n", tt.reply}})
			defer done()
			if err := c.greeting(); err != nil {
				t.Fatal(err)
			}
			err := c.run([]byte("CMD"))
			if err == nil {
				t.Fatal("run: no error")
			}
			if got := kindOf(stepErr(tt.stage, err)); got != tt.want {
				t.Errorf("kind of %v = %s, want %s", err, got, tt.want)
			}
		})
	}
}

func TestGreetingErrors(t *testing.T) {
	tests := []struct {
		greeting string
		want     errKind
	}{
		{"* BYE Too many connections\r\n", kindBye},
		{"* PREAUTH welcome\r\n", kindProtocol},
		{"a1 OK what\r\n", kindProtocol},
		{"", kindGreeting},
	}
	for _, tt := range tests {
		c, done := scripted(t, tt.greeting, nil)
		err := c.greeting()
		if got := kindOf(stepErr(kindGreeting, err)); err == nil || got != tt.want {
			t.Errorf("greeting %q: error %v (kind %s), want kind %s", tt.greeting, err, got, tt.want)
		}
		done()
	}
}

func TestTimeout(t *testing.T) {
	cl, srv := net.Pipe()
	defer srv.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { _, _ = io.Copy(io.Discard, srv) }) // reads, never answers
	c := newClient(readBufSize, 20*time.Millisecond)
	c.attach(cl)
	defer c.close()
	err := c.run([]byte("NOOP"))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("run = %v, want deadline exceeded", err)
	}
	if got := kindOf(stepErr(kindSelect, err)); got != kindTimeout {
		t.Errorf("kind = %s, want timeout", got)
	}
}

func TestLogoutWithoutBye(t *testing.T) {
	c, done := scripted(t, "* OK hi\r\n", []step{{"a1 LOGOUT\r\n", "a1 OK bye-less\r\n"}})
	defer done()
	if err := c.greeting(); err != nil {
		t.Fatal(err)
	}
	if err := c.logout(); kindOf(stepErr(kindLogout, err)) != kindProtocol {
		t.Errorf("logout = %v, want a protocol error", err)
	}
}

func TestGreetingName(t *testing.T) {
	tests := []struct{ text, want string }{
		{"Dovecot ready (backend-1).", "backend-1"},
		{"[CAPABILITY IMAP4rev1 (X)] Dovecot ready (backend-2).", "backend-2"},
		{"[CAPABILITY IMAP4rev1] imapproxy ready.", ""},
		{"Dovecot ready.", ""},
		{"hi (two words)", ""},
		{"odd ) order (", ""},
	}
	for _, tt := range tests {
		if got := string(greetingName([]byte(tt.text))); got != tt.want {
			t.Errorf("greetingName(%q) = %q, want %q", tt.text, got, tt.want)
		}
	}
}

func TestIDName(t *testing.T) {
	tests := []struct{ list, want string }{
		{`("name" "backend-1")`, "backend-1"},
		{`("version" "2.3" "NAME" "b2")`, "b2"},
		{`("name" {4}` + "\r\nb-{3})", "b-{3"},
		{`("vendor" "x\"y" "name" "z")`, "z"},
		{`("name" NIL)`, ""},
		{`NIL`, ""},
		{`("version" "1")`, ""},
		{`("name" "unterminated)`, ""},
		{`("name" {99}` + "\r\nshort)", ""},
	}
	for _, tt := range tests {
		if got := string(idName([]byte(tt.list))); got != tt.want {
			t.Errorf("idName(%q) = %q, want %q", tt.list, got, tt.want)
		}
	}
}

func TestLiteralSize(t *testing.T) {
	tests := []struct {
		line string
		n    int64
		ok   bool
	}{
		{"* 1 FETCH (BODY[] {123}\r\n", 123, true},
		{"X {0}\r\n", 0, true},
		{"X {7+}\r\n", 7, true},
		{"X ~{9}\n", 9, true},
		{"X {}\r\n", 0, false},
		{"X {+}\r\n", 0, false},
		{"X 12}\r\n", 0, false},
		{"}\r\n", 0, false},
		{"X {1}2}\r\n", 0, false},
		{"* OK done\r\n", 0, false},
	}
	for _, tt := range tests {
		n, ok, err := literalSize([]byte(tt.line))
		if err != nil || n != tt.n || ok != tt.ok {
			t.Errorf("literalSize(%q) = %d, %v, %v; want %d, %v, nil", tt.line, n, ok, err, tt.n, tt.ok)
		}
	}
}

func TestQuoted(t *testing.T) {
	if got := string(appendQuoted(nil, `a"b\c d`)); got != `"a\"b\\c d"` {
		t.Errorf("appendQuoted = %s", got)
	}
	for s, want := range map[string]bool{"secret": true, `p"w\`: true, "a\r\nb": false, "pässwort": false, "a\x00": false} {
		if got := quotable(s); got != want {
			t.Errorf("quotable(%q) = %v, want %v", s, got, want)
		}
	}
}

// replayConn answers each written command with a canned reply, without
// allocating, so that AllocsPerRun sees only the client.
type replayConn struct {
	net.Conn // nil: methods not overridden are not used
	replies  map[string]string
	out      []byte
	pending  []byte
}

func (r *replayConn) Write(p []byte) (int, error) {
	// "aN CMD ..." : the reply is keyed by CMD and tagged aN.
	sp := 0
	for sp < len(p) && p[sp] != ' ' {
		sp++
	}
	tag := p[:sp]
	rest := p[min(sp+1, len(p)):]
	end := 0
	for end < len(rest) && rest[end] != ' ' && rest[end] != '\r' {
		end++
	}
	reply := r.replies[string(rest[:end])]
	r.out = r.out[:0]
	for i := 0; i < len(reply); i++ {
		if reply[i] == '@' {
			r.out = append(r.out, tag...)
			continue
		}
		r.out = append(r.out, reply[i])
	}
	r.pending = r.out
	return len(p), nil
}

func (r *replayConn) Read(p []byte) (int, error) {
	if len(r.pending) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

func (r *replayConn) SetDeadline(time.Time) error { return nil }
func (r *replayConn) Close() error                { return nil }

// TestCycleAllocs: once warm, a whole webmail conversation (greeting,
// LOGIN, ID, SELECT, FETCH with literals, LOGOUT) allocates nothing in
// the client.
func TestCycleAllocs(t *testing.T) {
	var fetch strings.Builder
	for i := 1; i <= 20; i++ {
		fetch.WriteString("* " + itoa(i) + " FETCH (UID " + itoa(i) + " FLAGS (\\Seen) RFC822.SIZE 500 ENVELOPE (\"Tue, 2 Jan 2024\" {13}\r\nmsg x for you NIL NIL))\r\n")
	}
	conn := &replayConn{replies: map[string]string{
		"LOGIN":  "* OK [XPROXYREUSE] reused\r\n@ OK Logged in\r\n",
		"ID":     "* ID (\"name\" \"backend-1\")\r\n@ OK ID completed\r\n",
		"SELECT": "* 20 EXISTS\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n@ OK [READ-WRITE] Select completed\r\n",
		"UID":    fetch.String() + "@ OK Fetch completed\r\n",
		"LOGOUT": "* BYE Logging out\r\n@ OK Logout completed\r\n",
	}}
	c := newClient(readBufSize, time.Minute)
	var st stats
	login := []byte(`LOGIN "user0001" "secret"`)
	sel := []byte(`SELECT "INBOX"`)
	fetchCmd := []byte("UID FETCH 1:20 (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
	cycle := func() {
		conn.pending = append(conn.out[:0], "* OK Dovecot ready (backend-1).\r\n"...)
		c.attach(conn)
		for _, err := range []error{c.greeting(), c.run(login), c.run(cmdID), c.run(sel), c.run(fetchCmd), c.logout()} {
			if err != nil {
				t.Fatal(err)
			}
		}
		st.addBackend(c.idName)
		st.cycle.record(time.Millisecond)
	}
	cycle()
	if c.fetches != 20 || !c.reused || string(c.idName) != "backend-1" {
		t.Fatalf("fetches %d, reused %v, id name %q: the replay is wrong", c.fetches, c.reused, c.idName)
	}
	if allocs := testing.AllocsPerRun(100, cycle); allocs != 0 {
		t.Errorf("allocations per cycle = %v, want 0", allocs)
	}
}

func TestHistogram(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Millisecond)
	}
	for _, tt := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Millisecond}, {0.9, 900 * time.Millisecond}, {0.99, 990 * time.Millisecond}, {1, time.Second}} {
		got := h.quantile(tt.q)
		if d := got - tt.want; d < -tt.want/100 || d > tt.want/100 {
			t.Errorf("quantile(%v) = %v, want %v within 1%%", tt.q, got, tt.want)
		}
	}
	if h.max != uint64(time.Second) {
		t.Errorf("max = %d, want 1s", h.max)
	}
	// Buckets are monotone and each value lies in its bucket's range.
	prev := -1
	for v := uint64(0); v < 1<<20; v += 37 {
		b := histBucket(v)
		if b < prev {
			t.Fatalf("bucket(%d) = %d < previous %d", v, b, prev)
		}
		prev = b
		if mid := histValue(b); float64(mid) < float64(v)*0.98 || float64(mid) > float64(v)*1.02+1 {
			t.Fatalf("value of bucket(%d) = %d, not within 2%%", v, mid)
		}
	}
	if b := histBucket(^uint64(0)); b >= histBuckets {
		t.Fatalf("bucket(max) = %d, out of %d", b, histBuckets)
	}
	var m histogram
	m.merge(&h)
	m.merge(&h)
	if m.n != 2000 || m.quantile(0.5) != h.quantile(0.5) {
		t.Errorf("merged n = %d, p50 %v; want 2000, %v", m.n, m.quantile(0.5), h.quantile(0.5))
	}
	var empty histogram
	if empty.quantile(0.99) != 0 {
		t.Error("quantile of an empty histogram is not 0")
	}
}

func TestParseUsers(t *testing.T) {
	tests := []struct {
		spec    string
		want    []string
		wantErr bool
	}{
		{"user0001-user0003", []string{"user0001", "user0002", "user0003"}, false},
		{"user0009-0011", []string{"user0009", "user0010", "user0011"}, false},
		{"u8-u10", []string{"u8", "u9", "u10"}, false},
		{"mail-user01-mail-user02", []string{"mail-user01", "mail-user02"}, false},
		{"alice", []string{"alice"}, false},
		{"alice-bob", []string{"alice-bob"}, false},
		{"user0005-user0001", nil, true},
		{"", nil, true},
	}
	for _, tt := range tests {
		got, err := parseUsers(tt.spec)
		if (err != nil) != tt.wantErr || strings.Join(got, ",") != strings.Join(tt.want, ",") {
			t.Errorf("parseUsers(%q) = %q, %v; want %q, error %v", tt.spec, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string // substring; "" for success
		check   func(config) string
	}{
		{"defaults", nil, "", func(c config) string {
			if c.duration != 10*time.Second || c.count != 0 || len(c.users) != 50 || c.sessions != 8 || c.passwordOf("u") != "secret" {
				return "unexpected defaults"
			}
			return ""
		}},
		{"count alone runs up to the cap", []string{"-count", "5"}, "", func(c config) string {
			if c.duration != maxDuration {
				return "duration " + c.duration.String()
			}
			return ""
		}},
		{"password pattern", []string{"-password-pattern", "pw-%s", "-sessions", "3"}, "", func(c config) string {
			if c.passwordOf("user0002") != "pw-user0002" || c.sessions != 3 {
				return "pattern not applied"
			}
			return ""
		}},
		{"duration cap", []string{"-duration", "11m"}, "-duration", nil},
		{"count cap", []string{"-count", "10000001"}, "-count", nil},
		{"workload", []string{"-workload", "fast"}, "-workload", nil},
		{"fetch set", []string{"-fetch", "1:20 BODY[]"}, "-fetch", nil},
		{"password with CRLF", []string{"-password", "a\r\nb"}, "password", nil},
		{"several problems at once", []string{"-c", "0", "-timeout", "0s"}, "-timeout", nil},
		{"stray argument", []string{"x"}, "unexpected", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := parseFlags(tt.args, io.Discard)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseFlags(%q) error = %v, want one mentioning %q", tt.args, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseFlags(%q): %v", tt.args, err)
			}
			if msg := tt.check(cfg); msg != "" {
				t.Errorf("parseFlags(%q): %s", tt.args, msg)
			}
		})
	}
}
