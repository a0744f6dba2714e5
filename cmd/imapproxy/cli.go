package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/imapproxy/imapproxy/admin"
	"github.com/imapproxy/imapproxy/config"
)

// The operator's subcommands, clients of the admin API:
//
//	imapproxy status [-admin ADDR] [-token-file F] [-interval 2s] [-once]   (alias: top)
//	imapproxy map [-admin ADDR] [-token-file F] USER

const defaultAdmin = "127.0.0.1:9143"

// runCLI runs subcommand cmd and returns the exit status.
func runCLI(cmd string, args []string) int {
	var err error
	switch cmd {
	case "status", "top":
		err = statusCmd(cmd, args)
	case "map":
		err = mapCmd(args)
	default:
		err = fmt.Errorf("unknown command %q", cmd)
	}
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	case err != nil:
		fmt.Fprintf(os.Stderr, "imapproxy %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

var errUsage = errors.New("usage")

// adminFlags are the flags every subcommand has: where the admin API is
// and its token.
type adminFlags struct {
	admin, tokenFile, config string
}

func (af *adminFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&af.admin, "admin", "", "admin listener, host:port or URL (default: -config's admin.address, else "+defaultAdmin+")")
	fs.StringVar(&af.tokenFile, "token-file", "", "file holding the admin API token (default: -config's admin.token_file)")
	fs.StringVar(&af.config, "config", "", "the proxy's configuration file, to find the admin listener and token")
}

// client resolves the flags into an API client.
func (af *adminFlags) client() (*adminClient, error) {
	addr, tokenFile := af.admin, af.tokenFile
	if af.config != "" {
		cfg, err := config.Load(af.config)
		if err != nil {
			return nil, err
		}
		if addr == "" {
			if cfg.Admin.Address == "" {
				return nil, fmt.Errorf("%s: the admin listener is disabled (admin.address is empty)", af.config)
			}
			addr = cfg.Admin.Address
		}
		if tokenFile == "" {
			tokenFile = cfg.Admin.TokenFile
		}
	}
	if addr == "" {
		addr = defaultAdmin
	}
	c := &adminClient{base: adminURL(addr), http: &http.Client{Timeout: 10 * time.Second}}
	if tokenFile != "" {
		tok, err := config.ReadToken(tokenFile)
		if err != nil {
			return nil, err
		}
		c.token = string(tok)
	}
	return c, nil
}

// adminURL turns a listen address into a URL to reach it: a listener on
// every interface is reached on loopback.
func adminURL(addr string) string {
	if strings.Contains(addr, "://") {
		return strings.TrimSuffix(addr, "/")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "http://" + addr
	}
	switch ip := net.ParseIP(host); {
	case host == "" || ip != nil && ip.To4() != nil && ip.IsUnspecified():
		host = "127.0.0.1"
	case ip != nil && ip.IsUnspecified():
		host = "::1"
	}
	return "http://" + net.JoinHostPort(host, port)
}

type adminClient struct {
	base  string
	token string
	http  *http.Client
}

// do sends a request to the API and decodes its JSON answer into v.
func (c *adminClient) do(ctx context.Context, method, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e admin.ErrorBody
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, e.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	return nil
}

func statusCmd(name string, args []string) error {
	fs := flag.NewFlagSet("imapproxy "+name, flag.ContinueOnError)
	var af adminFlags
	af.register(fs)
	interval := fs.Duration("interval", 2*time.Second, "time between refreshes")
	once := fs.Bool("once", false, "print the status once and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: imapproxy %s [flags]\n\nA live view of a running proxy, from its admin API. Ctrl-C ends it.\n\n", name)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return parseErr(err)
	}
	if fs.NArg() != 0 || *interval <= 0 {
		fs.Usage()
		return errUsage
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *once {
		var st admin.Status
		if err := c.do(ctx, http.MethodGet, "/api/v1/status", &st); err != nil {
			return err
		}
		fmt.Print(renderStatus(&st, nil))
		return nil
	}
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	var prev *admin.Status
	for {
		var st admin.Status
		var out string
		if err := c.do(ctx, http.MethodGet, "/api/v1/status", &st); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			// The proxy may be restarting: say so and keep trying.
			out = fmt.Sprintf("%s  %v\n", time.Now().Format(time.TimeOnly), err)
		} else {
			out = renderStatus(&st, prev)
			prev = &st
		}
		// Home and clear, then the new screen.
		fmt.Print("\x1b[H\x1b[2J" + out)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func mapCmd(args []string) error {
	fs := flag.NewFlagSet("imapproxy map", flag.ContinueOnError)
	var af adminFlags
	af.register(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: imapproxy map [flags] USER\n\nWhich backend USER's logins go to now, the failover order, and what USER holds.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return parseErr(err)
	}
	if fs.NArg() != 1 || fs.Arg(0) == "" {
		fs.Usage()
		return errUsage
	}
	c, err := af.client()
	if err != nil {
		return err
	}
	var u admin.User
	if err := c.do(context.Background(), http.MethodGet, "/api/v1/users/"+url.PathEscape(fs.Arg(0)), &u); err != nil {
		return err
	}
	fmt.Print(renderUser(&u))
	return nil
}

func parseErr(err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return errUsage // the flag package has printed the problem and usage
}

// renderStatus is one screen of the status view. With prev, the status of
// the refresh before, it shows rates over the time between the two.
func renderStatus(st, prev *admin.Status) string {
	var b strings.Builder
	rate := "-"
	if prev != nil {
		// Counters reset when the proxy restarts; its uptime says so.
		dt := st.UptimeSeconds - prev.UptimeSeconds
		if dt > 0 && st.Logins.Client >= prev.Logins.Client {
			rate = fmt.Sprintf("%.1f", float64(st.Logins.Client-prev.Logins.Client)/dt)
		}
	}
	disc := st.Discovery.Kind
	switch {
	case st.Discovery.Kind == "static":
	case st.Discovery.Healthy:
		disc += " ok"
	default:
		disc += fmt.Sprintf(" FAILING (last success %s ago)", roundSeconds(st.Discovery.LastSuccessAgeSeconds))
	}
	fmt.Fprintf(&b, "up %s  sessions %d  logins/s %s  cache hits %.1f%%  reuse %.2fx  discovery %s\n",
		roundSeconds(st.UptimeSeconds), st.Sessions, rate, 100*st.Cache.HitRatio, st.ReuseRatio, disc)
	fmt.Fprintf(&b, "logins %d (backend %d, reused %d, refused %d, failed %d)  cached %d of %d open\n\n",
		st.Logins.Client, st.Logins.Backend, st.Logins.Reused, st.Logins.Refused, st.Logins.Failed, st.Cache.Cached, st.Cache.Open)
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tADDRESS\tWEIGHT\tSTATE\tACTIVE\tCACHED")
	for _, be := range st.Backends {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\n", be.ID, be.Address, be.Weight, be.State, be.Active, be.Cached)
	}
	tw.Flush()
	if len(st.Backends) == 0 {
		b.WriteString("(no backends)\n")
	}
	return b.String()
}

// renderUser is the output of the map subcommand.
func renderUser(u *admin.User) string {
	var b strings.Builder
	to := u.Backend
	if to == "" {
		to = "(no backend in service)"
	}
	fmt.Fprintf(&b, "%s -> %s  (hash key %q)\n", u.User, to, u.HashKey)
	order := make([]string, 0, len(u.Order))
	for _, c := range u.Order {
		if c.State == "up" {
			order = append(order, c.ID)
		} else {
			order = append(order, c.ID+" ("+c.State+")")
		}
	}
	fmt.Fprintf(&b, "order:  %s\n", strings.Join(order, ", "))
	fmt.Fprintf(&b, "active: %d\ncached: %d\n", u.Active, len(u.Cached))
	if len(u.Sessions)+len(u.Cached) == 0 {
		return b.String()
	}
	b.WriteString("\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tBACKEND\tCLIENT\tAGE\tIDLE")
	for _, s := range u.Sessions {
		fmt.Fprintf(tw, "session\t%s\t%s\t%s\t-\n", s.Backend, s.Client, roundSeconds(time.Since(s.Since).Seconds()))
	}
	for _, c := range u.Cached {
		fmt.Fprintf(tw, "cached\t%s\t-\t%s\t%s\n", c.Backend, roundSeconds(c.AgeSeconds), roundSeconds(c.IdleSeconds))
	}
	tw.Flush()
	return b.String()
}

func roundSeconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second)).Round(time.Second)
}
