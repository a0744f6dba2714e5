package proxy

import (
	"os"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/internal/dovecottest"
)

func TestZZExplore(t *testing.T) {
	if os.Getenv("EXPLORE") == "" {
		t.Skip()
	}
	dc := dovecottest.StartT(t, dovecottest.Options{Users: 2, Messages: 3, BigMessages: 1, TLS: true, ImplicitTLSPort: -1})
	p := startProxy(t, []*dovecottest.Server{dc}, nil)
	u := dovecottest.UserName(1)
	c := dialClient(t, p.addr)
	t.Log(c.Greeting)
	t.Log(c.cmd("CAPABILITY"))
	t.Log(c.cmd("ID (\"name\" \"x\")"))
	t.Log(c.cmd("FOO"))
	t.Log(c.login(u, "wrong"))
	t.Log(c.mustLogin(u, dc.PasswordOf(u)))
	t.Log(c.cmd("SELECT INBOX"))
	t.Log(c.cmd("FETCH 1 FLAGS"))
	c.logout()
	p.waitCached(t, 1)
	c = dialClient(t, p.addr)
	t.Log(c.mustLogin(u, dc.PasswordOf(u)))
	t.Log(c.cmd("FETCH 1 FLAGS"))
	t.Log(c.cmd("ENABLE CONDSTORE"))
	c.logout()
	p.waitIdle(t)
	if err := dc.Kick(u); err != nil {
		t.Log(err)
	}
	c = dialClient(t, p.addr)
	for _, l := range []string{"hello\r\n", "!!!\r\n", "a\r\n"} {
		c.send(l)
		t.Log(c.readLine())
	}
	t.Log(c.readLine())
	time.Sleep(500 * time.Millisecond)
	t.Log(dc.Log())
	t.Log(p.logs.String())
}
