package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// On a shared 2-core machine two runs minutes apart differ by more than
// the few per cent some targets are about, so the comparisons below keep
// every instance up at once and measure them in short alternating rounds
// (the order rotating each round), and report the median of the per-round
// ratios: drift of the machine hits every side alike.

// alternate warms each instance with warm (if any), then runs w on each
// instance in turn, rounds times. res[round][i] belongs to ins[i].
func (b *bench) alternate(ctx context.Context, what string, ins []*instance, warm *workload, w workload, rounds int) ([][]*summary, error) {
	args := []string{"-workload", w.kind, "-c", fmt.Sprint(w.conc)}
	measure := func(in *instance, w workload) (*summary, error) {
		s, err := b.imapbench(ctx, in.addr, w, args)
		if err != nil {
			return nil, err
		}
		if n := s.errorCount(); n > 0 {
			return nil, fmt.Errorf("%d failed cycles: %v", n, s.Errors)
		}
		return s, nil
	}
	if warm != nil {
		b.logf("%s: warming up", what)
		for _, in := range ins {
			if _, err := measure(in, *warm); err != nil {
				return nil, fmt.Errorf("%s: warm-up: %w", what, err)
			}
		}
	}
	res := make([][]*summary, rounds)
	for r := range rounds {
		b.logf("%s: round %d of %d", what, r+1, rounds)
		res[r] = make([]*summary, len(ins))
		for k := range ins {
			i := (r + k) % len(ins)
			s, err := measure(ins[i], w)
			if err != nil {
				return nil, fmt.Errorf("%s: round %d: %w", what, r+1, err)
			}
			res[r][i] = s
		}
	}
	return res, nil
}

// compareCluster answers "does cluster mode cost anything": imapproxy
// with one static backend against imapproxy with three backends from
// Consul, both warm, webmail c8.
func (b *bench) compareCluster(ctx context.Context, rep *report, one, three *target) error {
	rounds, dur := 7, 8*time.Second
	warm := workload{kind: "webmail", conc: 8, dur: time.Minute, count: 2 * numUsers}
	run := workload{kind: "webmail", conc: 8, dur: dur}
	if b.o.quick {
		rounds, run = 1, workload{kind: "webmail", conc: 8, dur: 30 * time.Second, count: 16}
	}
	a, err := one.launch(ctx)
	if err != nil {
		return err
	}
	defer a.stop()
	c, err := three.launch(ctx)
	if err != nil {
		return err
	}
	defer c.stop()
	res, err := b.alternate(ctx, "cluster-mode cost", []*instance{a, c}, &warm, run, rounds)
	if err != nil {
		return err
	}
	cps, p50, perRound := webmailRatios(res, 1, 0)
	rep.notes = append(rep.notes, fmt.Sprintf(
		"cluster-mode cost (webmail c8, warm, %d alternating rounds of %v, both instances up): "+
			"cycles/s 3 via Consul / 1 static per round %s; median ratio of cycles/s %.3f, of cycle p50 %.3f",
		rounds, run.dur, strings.Join(perRound, ", "), median(cps), median(p50)))
	return nil
}

// compareBulk measures the bulk relay of imapproxy (one backend, warm)
// against Dovecot itself and socat in alternating rounds, all three up:
// the bulk rows of the table are taken minutes apart, and MB/s on this
// machine drifts by more than the margins of the bulk targets.
func (b *bench) compareBulk(ctx context.Context, rep *report, direct, socat, proxy *target) error {
	rounds := 5
	run := workload{kind: "bulk", conc: 4, dur: 4 * time.Second}
	warm := workload{kind: "bulk", conc: 4, dur: 2 * time.Second}
	if b.o.quick {
		rounds = 1
		run = workload{kind: "bulk", conc: 2, dur: 30 * time.Second, count: 2}
		warm = workload{kind: "bulk", conc: 2, dur: 30 * time.Second, count: 2}
	}
	var ins []*instance
	defer func() {
		for _, in := range ins {
			in.stop()
		}
	}()
	for _, t := range []*target{direct, socat, proxy} {
		in, err := t.launch(ctx)
		if err != nil {
			return err
		}
		ins = append(ins, in)
	}
	res, err := b.alternate(ctx, "bulk side by side", ins, &warm, run, rounds)
	if err != nil {
		return err
	}
	var vsDirect, vsSocat []float64
	var perRound []string
	for _, got := range res {
		d, s, p := got[0].MBPerS, got[1].MBPerS, got[2].MBPerS
		if d > 0 && s > 0 {
			vsDirect = append(vsDirect, p/d)
			vsSocat = append(vsSocat, p/s)
		}
		perRound = append(perRound, fmt.Sprintf("%.0f/%.0f/%.0f", p, d, s))
	}
	rep.notes = append(rep.notes, fmt.Sprintf(
		"bulk side by side (c%d, %d alternating rounds of %v, all three up): "+
			"MB/s imapproxy 1 backend / direct / socat per round %s; median ratio to direct %.2f, to socat %.2f",
		run.conc, rounds, run.dur, strings.Join(perRound, ", "), median(vsDirect), median(vsSocat)))
	return nil
}

// compareBaseline answers "did this change cost anything": imapproxy as
// it is against imapproxy at -baseline, one backend each, both warm, in
// alternating rounds of webmail c8 (cycles/s, cycle p50) and bulk c4
// (MB/s), all up at once.
func (b *bench) compareBaseline(ctx context.Context, rep *report) error {
	one := b.backends[:1]
	rounds := 7
	web := workload{kind: "webmail", conc: 8, dur: 8 * time.Second}
	bulk := workload{kind: "bulk", conc: 4, dur: 4 * time.Second}
	warm := workload{kind: "webmail", conc: 8, dur: time.Minute, count: 2 * numUsers}
	if b.o.quick {
		rounds = 1
		web = workload{kind: "webmail", conc: 2, dur: 30 * time.Second, count: 8}
		bulk = workload{kind: "bulk", conc: 2, dur: 30 * time.Second, count: 2}
		warm = workload{kind: "webmail", conc: 2, dur: 30 * time.Second, count: 8}
	}
	cur, err := b.startImapproxy(ctx, "current", one, nil)
	if err != nil {
		return err
	}
	defer cur.stop()
	base, err := b.startImapproxyBin(ctx, b.bins.baseline, "baseline", one, nil)
	if err != nil {
		return err
	}
	defer base.stop()
	ins := []*instance{cur, base}
	res, err := b.alternate(ctx, "baseline webmail", ins, &warm, web, rounds)
	if err != nil {
		return err
	}
	cps, p50, perRound := webmailRatios(res, 0, 1)
	var mbs []float64
	rep.notes = append(rep.notes, fmt.Sprintf(
		"against %s (webmail c%d, warm, %d alternating rounds of %v, both up): cycles/s this / baseline per round %s; "+
			"median ratio of cycles/s %.3f, of cycle p50 %.3f",
		b.o.baseline, web.conc, rounds, web.dur, strings.Join(perRound, ", "), median(cps), median(p50)))
	res, err = b.alternate(ctx, "baseline bulk", ins, nil, bulk, rounds)
	if err != nil {
		return err
	}
	perRound = perRound[:0]
	for _, got := range res {
		if got[1].MBPerS > 0 {
			mbs = append(mbs, got[0].MBPerS/got[1].MBPerS)
		}
		perRound = append(perRound, fmt.Sprintf("%.0f/%.0f", got[0].MBPerS, got[1].MBPerS))
	}
	rep.notes = append(rep.notes, fmt.Sprintf(
		"against %s (bulk c%d, %d alternating rounds of %v, both up): MB/s this / baseline per round %s; median ratio %.3f",
		b.o.baseline, bulk.conc, rounds, bulk.dur, strings.Join(perRound, ", "), median(mbs)))
	return nil
}

// webmailRatios are the per-round ratios of instance x to instance y in
// alternating webmail rounds: cycles/s, cycle p50, and the rounds' cycles/s
// as "x/y".
func webmailRatios(res [][]*summary, x, y int) (cps, p50 []float64, perRound []string) {
	for _, got := range res {
		cps = append(cps, got[x].CyclesPerS/got[y].CyclesPerS)
		if got[y].CycleMS.P50 > 0 {
			p50 = append(p50, got[x].CycleMS.P50/got[y].CycleMS.P50)
		}
		perRound = append(perRound, fmt.Sprintf("%.0f/%.0f", got[x].CyclesPerS, got[y].CyclesPerS))
	}
	return cps, p50, perRound
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
