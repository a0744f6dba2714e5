package discovery

import (
	"context"
	"math/rand/v2"
	"time"
)

// retryLoop is the run loop the Watcher and the Registrar share, in the
// manner of Consul's api/watch: it calls a step until ctx is done,
// pausing after a failure for a capped, jittered exponential backoff that
// the next success resets. What a step does, and what a failure streak
// means to its owner (status, logging), stays with the owner.
type retryLoop struct {
	minBackoff, maxBackoff time.Duration
	// failed is called after each failed step with its error, the
	// failures in a row so far and the pause before the next step.
	failed func(err error, failures uint64, retryIn time.Duration)
	// recovered is called after the success that ends a streak of
	// failures, with the streak's length.
	recovered func(failures uint64)
}

// run calls step until ctx is done. After a success it waits as long as
// step asks (not at all for 0 or less); step's wait after a failure is
// ignored. When ctx is done as step returns, the outcome is the
// cancellation's and is neither counted nor reported: run returns.
func (l retryLoop) run(ctx context.Context, step func(context.Context) (time.Duration, error)) {
	var failures uint64
	timer := time.NewTimer(0)
	timer.Stop() // Go 1.23+ timers: no stale tick after Stop or Reset
	defer timer.Stop()
	for ctx.Err() == nil {
		d, err := step(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			d = backoff(l.minBackoff, l.maxBackoff, failures, rand.Float64())
			l.failed(err, failures, d)
		} else if failures > 0 {
			l.recovered(failures)
			failures = 0
		}
		if d <= 0 {
			continue
		}
		timer.Reset(d)
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
	}
}

// backoff is the pause after the n-th consecutive failure (n >= 1): minB
// doubled n-1 times, capped at maxB, less a random part of up to half of
// it ("equal jitter"), so within (d/2, d]. r is uniform in [0, 1).
func backoff(minB, maxB time.Duration, n uint64, r float64) time.Duration {
	d := minB
	for i := uint64(1); i < n && d < maxB; i++ {
		if d > maxB/2 {
			d = maxB
			break
		}
		d *= 2
	}
	d = min(d, maxB)
	return d - time.Duration(r*float64(d/2))
}
