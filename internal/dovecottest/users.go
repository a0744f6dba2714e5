package dovecottest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	authTestTimeout = 5 * time.Second // SetPassword until Dovecot agrees
	kickTimeout     = 5 * time.Second // Kick until the sessions are gone
)

func checkPassword(pw string) error {
	if pw == "" || strings.ContainsAny(pw, ":\r\n") {
		return errors.New("empty or contains ':', CR or LF")
	}
	return nil
}

// writePasswdLocked rewrites the passwd-file from s.passwords; s.mu is
// held (or s is not shared yet).
//
// Dovecot 2.3 reloads a passwd-file when its mtime (whole seconds) or size
// changes, and checks at most once a second. The file is replaced by
// rename and given an mtime one second past the last one it had, so two
// rewrites within a second that keep the size are still seen.
func (s *Server) writePasswdLocked() error {
	var b bytes.Buffer
	for _, u := range s.users {
		// user:password:uid:gid:gecos:home:shell:extra. No uid/gid:
		// mail_uid and mail_gid apply. The explicit {PLAIN} keeps a
		// password that starts with '{' from reading as a scheme.
		fmt.Fprintf(&b, "%s:{PLAIN}%s::::%s::\n", u, s.passwords[u], filepath.Join(s.mailDir, u))
	}
	tmp := s.passwdPath + ".tmp"
	if err := os.WriteFile(tmp, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("dovecottest: write passwd: %w", err)
	}
	stamp := time.Now().Truncate(time.Second)
	if !stamp.After(s.pwStamp) {
		stamp = s.pwStamp.Add(time.Second)
	}
	if err := os.Chtimes(tmp, stamp, stamp); err != nil {
		return fmt.Errorf("dovecottest: write passwd: %w", err)
	}
	if err := os.Rename(tmp, s.passwdPath); err != nil {
		return fmt.Errorf("dovecottest: write passwd: %w", err)
	}
	s.pwStamp = stamp
	return nil
}

// SetPassword changes user's password in the passwd-file and returns once
// Dovecot's auth process accepts the new one (checked with doveadm auth
// test, which does not count as an IMAP login).
func (s *Server) SetPassword(user, pw string) error {
	if err := checkPassword(pw); err != nil {
		return fmt.Errorf("dovecottest: password of %s: %w", user, err)
	}
	s.mu.Lock()
	if _, ok := s.passwords[user]; !ok {
		s.mu.Unlock()
		return fmt.Errorf("dovecottest: unknown user %q", user)
	}
	s.passwords[user] = pw
	err := s.writePasswdLocked()
	s.mu.Unlock()
	if err != nil {
		return err
	}

	deadline := time.Now().Add(authTestTimeout)
	for {
		out, err := s.doveadm("auth", "test", user, pw)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("dovecottest: new password of %s not accepted after %v: %w: %s", user, authTestTimeout, err, out)
		}
		time.Sleep(pollInterval)
	}
}

// doveadm runs doveadm with this instance's config.
func (s *Server) doveadm(args ...string) (string, error) {
	bin, err := lookBinary("doveadm", "/usr/bin/doveadm")
	if err != nil {
		return "", err
	}
	out, err := exec.Command(bin, append([]string{"-c", s.confPath}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Kick disconnects every IMAP session of user on the server side, the
// way an operator would: `doveadm kick USER` with this instance's config
// asks anvil for the user's imap processes and sends them SIGTERM; each
// writes "* BYE Server shutting down." and closes its connection (one
// session per process). Kick then checks the process table (the titles
// read "NAME/imap [USER IP ...]" with verbose_proctitle) and returns once
// none is left, signalling stragglers itself (a session that logged in
// while doveadm ran). No session at all is not an error.
func (s *Server) Kick(user string) error {
	deadline := time.Now().Add(kickTimeout)
	for first := true; ; first = false {
		ps, err := s.sessions(user)
		if err != nil {
			return fmt.Errorf("dovecottest: kick %s: %w", user, err)
		}
		if len(ps) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("dovecottest: kick %s: %d sessions still open after %v", user, len(ps), kickTimeout)
		}
		if first {
			out, err := s.doveadm("kick", user)
			var ee *exec.ExitError
			// 68 (EX_NOUSER): anvil knew no session of the user.
			if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 68) {
				return fmt.Errorf("dovecottest: doveadm kick %s: %w: %s", user, err, out)
			}
		} else {
			for _, p := range ps {
				_ = p.signal(syscall.SIGTERM)
			}
		}
		_ = waitGone(ps, time.Second) // checked again at the top
	}
}

// sessions lists the imap processes serving user.
func (s *Server) sessions(user string) ([]proc, error) {
	select {
	case <-s.exited:
		return nil, nil
	default:
	}
	kids, err := descendants(s.pid)
	if err != nil {
		return nil, err
	}
	want := "/imap [" + user + " "
	var out []proc
	for _, p := range kids {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(p.pid) + "/cmdline")
		if err != nil {
			continue
		}
		if strings.Contains(string(b), want) {
			out = append(out, p)
		}
	}
	return out, nil
}
