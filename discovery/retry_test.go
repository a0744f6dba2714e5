package discovery

import (
	"context"
	"errors"
	"slices"
	"testing"
	"testing/synctest"
	"time"
)

func TestRetryLoop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const minB, maxB, every = time.Second, 4 * time.Second, time.Minute
		var (
			failedAt  []uint64 // failures passed to failed
			recovered []uint64
			starts    []time.Time
		)
		ctx, cancel := context.WithCancel(t.Context())
		// Fail twice, succeed, fail once, succeed, then cancel during a
		// step that fails: that last outcome must not be seen.
		outcomes := []error{errors.New("a"), errors.New("b"), nil, errors.New("c"), nil, errors.New("cancelled")}
		l := retryLoop{
			minBackoff: minB, maxBackoff: maxB,
			failed: func(err error, failures uint64, retryIn time.Duration) {
				failedAt = append(failedAt, failures)
			},
			recovered: func(failures uint64) { recovered = append(recovered, failures) },
		}
		l.run(ctx, func(context.Context) (time.Duration, error) {
			starts = append(starts, time.Now())
			n := len(starts) - 1
			if n == len(outcomes)-1 {
				cancel()
			}
			return every, outcomes[n]
		})
		if len(starts) != len(outcomes) {
			t.Fatalf("%d steps, want %d", len(starts), len(outcomes))
		}
		if want := []uint64{1, 2, 1}; !slices.Equal(failedAt, want) {
			t.Errorf("failed called with %v, want %v", failedAt, want)
		}
		if want := []uint64{2, 1}; !slices.Equal(recovered, want) {
			t.Errorf("recovered called with %v, want %v", recovered, want)
		}
		// The pause after a failure is the backoff, within (d/2, d], not
		// the step's wait; after a success it is the step's wait.
		for i, d := range []time.Duration{minB, 2 * minB, 0, minB, 0} {
			gap := starts[i+1].Sub(starts[i])
			if d == 0 && gap != every || d != 0 && (gap <= d/2 || gap > d) {
				t.Errorf("pause after step %d = %v, want %v or within (%v, %v] after a failure", i+1, gap, every, d/2, d)
			}
		}
	})
}

func TestRetryLoopStopsDuringPause(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		l := retryLoop{
			minBackoff: time.Hour, maxBackoff: time.Hour,
			failed:    func(error, uint64, time.Duration) { cancel() },
			recovered: func(uint64) { t.Error("recovered called without a success") },
		}
		steps := 0
		start := time.Now()
		l.run(ctx, func(context.Context) (time.Duration, error) {
			steps++
			return 0, errors.New("down")
		})
		if d := time.Since(start); steps != 1 || d != 0 {
			t.Errorf("run returned after %d steps and %v (fake time), want 1 step, at once", steps, d)
		}
	})
}
