package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTick is the unit of the CPU times in /proc/PID/stat: USER_HZ, 100
// on every Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

// pstat is the part of /proc/PID/stat the bench reads.
type pstat struct {
	pid                          int
	comm                         string
	state                        byte
	ppid                         int
	utime, stime, cutime, cstime uint64 // clock ticks
}

// cpu is the process's own CPU time plus that of its reaped children.
func (s pstat) cpu() time.Duration {
	return time.Duration(s.utime+s.stime+s.cutime+s.cstime) * clockTick
}

func readStat(pid int) (pstat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return pstat{}, err
	}
	// The command name is in parentheses and may contain ") ", so the
	// fields start after the last ')'.
	open := bytes.IndexByte(b, '(')
	end := bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return pstat{}, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[end+1:]))
	// f[0] is field 3 (state); utime..cstime are fields 14..17.
	if len(f) < 15 || len(f[0]) != 1 {
		return pstat{}, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	s := pstat{pid: pid, comm: string(b[open+1 : end]), state: f[0][0]}
	var errs []error
	atoi := func(i int) uint64 {
		v, err := strconv.ParseUint(f[i], 10, 64)
		errs = append(errs, err)
		return v
	}
	s.ppid = int(atoi(1))
	s.utime, s.stime, s.cutime, s.cstime = atoi(11), atoi(12), atoi(13), atoi(14)
	if err := errors.Join(errs...); err != nil {
		return pstat{}, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return s, nil
}

// snapshot is every live process, by pid, and the children of each.
type snapshot struct {
	procs    map[int]pstat
	children map[int][]int
}

func takeSnapshot() (*snapshot, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	s := &snapshot{procs: make(map[int]pstat, len(ents)), children: make(map[int][]int)}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue // gone meanwhile
		}
		s.procs[pid] = st
		s.children[st.ppid] = append(s.children[st.ppid], pid)
	}
	return s, nil
}

// tree lists root and its live descendants (zombies included: their time
// is not yet in the parent's cutime).
func (s *snapshot) tree(root int) []pstat {
	st, ok := s.procs[root]
	if !ok {
		return nil
	}
	out := []pstat{st}
	queue := []int{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range s.children[p] {
			out = append(out, s.procs[c])
			queue = append(queue, c)
		}
	}
	return out
}

// treeCPU is the CPU time of a process tree: everyone's utime+stime plus
// cutime+cstime, so that a child that exits between two snapshots moves
// from "live" to its parent's cutime and is counted once either way.
func (s *snapshot) treeCPU(root int) time.Duration {
	var d time.Duration
	for _, p := range s.tree(root) {
		d += p.cpu()
	}
	return d
}

// countComm counts the processes named comm in root's tree.
func (s *snapshot) countComm(root int, comm string) int {
	n := 0
	for _, p := range s.tree(root) {
		if p.comm == comm && p.state != 'Z' {
			n++
		}
	}
	return n
}

// findChild finds a child of parent whose command line contains arg.
func (s *snapshot) findChild(parent int, arg string) (int, bool) {
	for _, pid := range s.children[parent] {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil {
			continue
		}
		for _, a := range bytes.Split(b, []byte{0}) {
			if string(a) == arg {
				return pid, true
			}
		}
	}
	return 0, false
}

// vmRSS is VmRSS of one process, in bytes.
func vmRSS(pid int) (int64, error) {
	return statusField(filepath.Join("/proc", strconv.Itoa(pid), "status"), "VmRSS:")
}

// treePss is the sum of Pss over a process tree (from smaps_rollup), in
// bytes: for a forking relay, where RSS would count shared pages once per
// process.
func treePss(root int) (int64, error) {
	s, err := takeSnapshot()
	if err != nil {
		return 0, err
	}
	var sum int64
	procs := s.tree(root)
	if len(procs) == 0 {
		return 0, fmt.Errorf("process %d is gone", root)
	}
	for _, p := range procs {
		v, err := statusField(filepath.Join("/proc", strconv.Itoa(p.pid), "smaps_rollup"), "Pss:")
		if err != nil {
			continue // exited meanwhile
		}
		sum += v
	}
	return sum, nil
}

// statusField reads a "Key:   1234 kB" line.
func statusField(path, key string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, key) {
			continue
		}
		fs := strings.Fields(line[len(key):])
		if len(fs) == 0 {
			break
		}
		v, err := strconv.ParseInt(fs[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %s: %w", path, key, err)
		}
		if len(fs) > 1 && fs[1] == "kB" {
			v <<= 10
		}
		return v, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no %s", path, key)
}

// listenOverflows is TcpExt ListenOverflows from /proc/net/netstat: SYNs
// and handshakes dropped because a listener's accept queue was full. The
// client retransmits its SYN after 1 s, so each one is a stalled connect.
// The counter is per network namespace, not per listener.
func listenOverflows() (int64, error) {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return 0, err
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "TcpExt:") || !strings.HasPrefix(lines[i+1], "TcpExt:") {
			continue
		}
		keys, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j, k := range keys {
			if k == "ListenOverflows" && j < len(vals) {
				return strconv.ParseInt(vals[j], 10, 64)
			}
		}
	}
	return 0, errors.New("/proc/net/netstat: no TcpExt ListenOverflows")
}
