package dovecottest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc identifies one process. The start time (in clock ticks since boot)
// guards against signalling a recycled pid.
type proc struct {
	pid   int
	start uint64
}

// procStat is the part of /proc/PID/stat the harness needs.
type procStat struct {
	state byte
	ppid  int
	start uint64
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	// The command name is in parentheses and may itself contain ") ",
	// so the fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), f[1] field 4 (ppid), f[19] field 22 (starttime).
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return procStat{state: f[0][0], ppid: ppid, start: start}, nil
}

// descendants lists every live descendant of root (not root itself).
// Dovecot's master is the only process of an instance that forks, so a
// snapshot taken while the master is stopped or gone is complete.
func descendants(root int) ([]proc, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	children := make(map[int][]proc)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil || st.state == 'Z' {
			continue // gone or already dead
		}
		children[st.ppid] = append(children[st.ppid], proc{pid: pid, start: st.start})
	}
	var out []proc
	queue := []int{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c.pid)
		}
	}
	return out, nil
}

// alive reports whether p still runs: it exists, is the same process
// (same start time) and is not a zombie. A zombie holds no sockets.
func (p proc) alive() bool {
	st, err := readProcStat(p.pid)
	if err != nil {
		return false
	}
	return st.start == p.start && st.state != 'Z'
}

// signal sends sig to p unless p has ended (or its pid was reused).
func (p proc) signal(sig syscall.Signal) error {
	if !p.alive() {
		return nil
	}
	err := syscall.Kill(p.pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// waitGone polls until none of ps is alive or timeout passes.
func waitGone(ps []proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		var left []int
		for _, p := range ps {
			if p.alive() {
				left = append(left, p.pid)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes still running after %v: %v", timeout, left)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
