package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// compareCluster answers "does cluster mode cost anything": imapproxy
// with one static backend against imapproxy with three backends from
// Consul, both warm, webmail c8. On a shared 2-core machine two runs
// minutes apart differ by more than the 5 % asked about, so the two
// instances are up at the same time and measured in short alternating
// rounds (the order flips each round), and the median of the per-round
// ratios is reported: drift of the machine hits both sides alike.
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
	args := []string{"-workload", "webmail", "-c", "8"}
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
	b.logf("cluster-mode cost: warming both instances")
	for _, in := range []*instance{a, c} {
		if _, err := measure(in, warm); err != nil {
			return fmt.Errorf("cluster-mode cost: warm-up: %w", err)
		}
	}
	var cps, p50 []float64
	var perRound []string
	for i := range rounds {
		b.logf("cluster-mode cost: round %d of %d", i+1, rounds)
		order := []*instance{a, c}
		if i%2 == 1 {
			order = []*instance{c, a}
		}
		got := map[*instance]*summary{}
		for _, in := range order {
			s, err := measure(in, run)
			if err != nil {
				return fmt.Errorf("cluster-mode cost: round %d: %w", i+1, err)
			}
			got[in] = s
		}
		r := got[c].CyclesPerS / got[a].CyclesPerS
		cps = append(cps, r)
		if got[a].CycleMS.P50 > 0 {
			p50 = append(p50, got[c].CycleMS.P50/got[a].CycleMS.P50)
		}
		perRound = append(perRound, fmt.Sprintf("%.0f/%.0f", got[c].CyclesPerS, got[a].CyclesPerS))
	}
	rep.notes = append(rep.notes, fmt.Sprintf(
		"cluster-mode cost (webmail c8, warm, %d alternating rounds of %v, both instances up): "+
			"cycles/s 3 via Consul / 1 static per round %s; median ratio of cycles/s %.3f, of cycle p50 %.3f",
		rounds, run.dur, strings.Join(perRound, ", "), median(cps), median(p50)))
	return nil
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
