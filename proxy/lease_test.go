package proxy

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/testkit"
	"github.com/imapproxy/imapproxy/pool"
)

// waitSlotsBack waits until every session has given its backend
// connection back to the pool: no lease out, nothing closing, every open
// connection a cached one; and then wants cached of them (any number if
// cached is negative).
func (p *testProxy) waitSlotsBack(t *testing.T, cached int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := p.srv.Pool().Stats()
		if st.InUse == 0 && st.Closing == 0 && st.Open == st.Cached {
			if cached >= 0 && st.Cached != cached {
				t.Fatalf("pool stats %+v, want %d cached", st, cached)
			}
			return
		}
		if st.InUse < 0 || st.Open < 0 {
			t.Fatalf("pool stats %+v: a slot given back twice", st)
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool stats %+v: a slot not given back", st)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestSessionEndsGiveSlotsBack: however a session ends, before, during or
// after its login, its slot of the connection budget comes back to the
// pool, once.
func TestSessionEndsGiveSlotsBack(t *testing.T) {
	tests := []struct {
		name        string
		hook        func(c *fakeConn, tag, cmd, line string) bool
		mod         func(*Options)
		unreachable bool // the backend's address refuses connections
		run         func(t *testing.T, p *testProxy)
		cached      int
		logouts     int32 // the backend connections closed with LOGOUT, not cut off
	}{
		{name: "login refused", logouts: 1, run: func(t *testing.T, p *testProxy) {
			c := testkit.Dial(t, p.addr)
			if res := c.Login("alice", "wrong"); !strings.Contains(res.Tagged, "NO [AUTHENTICATIONFAILED]") {
				t.Fatalf("wrong password: %q", res.Tagged)
			}
			c.NetConn.Close()
		}},
		{name: "backend ends the login",
			hook: func(c *fakeConn, tag, cmd, line string) bool {
				if cmd == "AUTHENTICATE" {
					c.conn.Close()
					return true
				}
				return false
			},
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				if res := c.Login("alice", "secret"); !strings.Contains(res.Tagged, "NO [UNAVAILABLE]") {
					t.Fatalf("login on a backend that hangs up: %q", res.Tagged)
				}
				c.NetConn.Close()
			}},
		{name: "backend unreachable", unreachable: true,
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				if res := c.Login("alice", "secret"); !strings.Contains(res.Tagged, "NO [UNAVAILABLE]") {
					t.Fatalf("login with no backend to dial: %q", res.Tagged)
				}
				c.NetConn.Close()
			}},
		{name: "logout, cached", cached: 1, run: func(t *testing.T, p *testProxy) {
			for i := range 2 { // the second on the cached connection
				c := testkit.Dial(t, p.addr)
				if res := c.MustLogin("alice", "secret"); res.Has("XPROXYREUSE") != (i == 1) {
					t.Fatalf("login %d: %s", i+1, res)
				}
				c.Logout()
			}
		}},
		{name: "logout, caching off", logouts: 1,
			mod: func(o *Options) { o.Pool = pool.New(pool.Options{Disabled: true}) },
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				c.MustLogin("alice", "secret")
				c.Logout()
			}},
		{name: "logout in a mailbox", cached: 1, run: func(t *testing.T, p *testProxy) {
			c := testkit.Dial(t, p.addr)
			c.MustLogin("alice", "secret")
			if res := c.Cmd("SELECT INBOX"); !res.OK() {
				t.Fatalf("SELECT: %s", res)
			}
			c.Logout()
		}},
		{name: "logout, clean-up refused", logouts: 1,
			hook: func(c *fakeConn, tag, cmd, line string) bool {
				if cmd == "UNSELECT" {
					c.write(tag + " NO not now\r\n")
					return true
				}
				return false
			},
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				c.MustLogin("alice", "secret")
				c.Logout()
			}},
		{name: "client leaves after login", cached: 1, run: func(t *testing.T, p *testProxy) {
			c := testkit.Dial(t, p.addr)
			c.MustLogin("alice", "secret")
			c.NetConn.Close()
		}},
		{name: "client leaves in IDLE", logouts: 1,
			hook: func(c *fakeConn, tag, cmd, line string) bool {
				if cmd == "IDLE" {
					c.write("+ idling\r\n")
					return true
				}
				return false
			},
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				c.MustLogin("alice", "secret")
				c.Send("i IDLE\r\n")
				if l := c.ReadLine(); l != "+ idling" {
					t.Fatalf("IDLE: %q", l)
				}
				c.NetConn.Close()
			}},
		{name: "backend fails mid-session",
			hook: func(c *fakeConn, tag, cmd, line string) bool {
				if cmd == "FETCH" {
					c.conn.Close()
					return true
				}
				return false
			},
			run: func(t *testing.T, p *testProxy) {
				c := testkit.Dial(t, p.addr)
				c.MustLogin("alice", "secret")
				c.Send("f FETCH 1 BODY[]\r\n")
				c.ReadToEOF()
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newFakeBackend(t)
			b.hook = tt.hook
			var p *testProxy
			if tt.unreachable {
				p = startServer(t, []Backend{{ID: "gone", Addr: refusingAddr(t), Weight: 1}}, false, tt.mod)
			} else {
				p = startFakeProxy(t, b, tt.mod)
			}
			probed := b.logouts.Load() // the capability probe's
			tt.run(t, p)
			p.waitIdle(t)
			p.waitSlotsBack(t, tt.cached)
			if n := b.logouts.Load() - probed; n != tt.logouts {
				t.Errorf("backend saw %d LOGOUTs, want %d", n, tt.logouts)
			}
		})
	}
}

// TestClientLeavesMidLogin: a client that leaves while its backend login
// is under way gives the slot back, whether the login then succeeds or
// not.
func TestClientLeavesMidLogin(t *testing.T) {
	for _, ok := range []bool{true, false} {
		t.Run(map[bool]string{true: "login succeeds", false: "login refused"}[ok], func(t *testing.T) {
			b := newFakeBackend(t)
			authing, left := make(chan struct{}), make(chan struct{})
			b.hook = func(c *fakeConn, tag, cmd, line string) bool {
				if cmd != "AUTHENTICATE" {
					return false
				}
				close(authing)
				select {
				case <-left:
				case <-time.After(5 * time.Second):
				}
				if !ok {
					c.write(tag + " NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
					return true
				}
				return false
			}
			p := startFakeProxy(t, b, nil)
			c := testkit.Dial(t, p.addr)
			c.Send("t1 LOGIN alice secret\r\n")
			select {
			case <-authing:
			case <-time.After(5 * time.Second):
				t.Fatal("the login never reached the backend")
			}
			c.NetConn.Close()
			close(left)
			p.waitIdle(t)
			p.waitSlotsBack(t, -1) // cached or not, as the relay found it
		})
	}
}

// refusingAddr is a 127.0.0.1 address nothing listens on.
func refusingAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
