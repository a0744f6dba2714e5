package discovery

import (
	"net/http"
	"testing"
	"testing/synctest"
	"time"
)

// The timing tests run in a synctest bubble: the watcher's timers use the
// bubble's fake clock and the fake Consul is reached over net.Pipe, so
// the pauses are measured exactly, in no real time.

func TestWatcherBackoffTiming(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const minB, maxB = time.Second, 8 * time.Second
		wt := startWatch(t, pipe, ConsulOptions{MinBackoff: minB, MaxBackoff: maxB})

		// Consecutive failures: the pause after the n-th is within
		// (d/2, d] for d = minB doubled n-1 times, capped at maxB.
		r := wt.next()
		for n, d := range []time.Duration{1, 2, 4, 8, 8, 8} {
			d *= time.Second
			r.fail(http.StatusInternalServerError)
			prev := r.at
			r = wt.next()
			if gap := r.at.Sub(prev); gap <= d/2 || gap > d {
				t.Errorf("pause after failure %d = %v, want within (%v, %v]", n+1, gap, d/2, d)
			}
			if st := wt.w.Status(); st.Failures != uint64(n+1) || st.Healthy {
				t.Errorf("Status after failure %d = %+v", n+1, st)
			}
		}
		wt.noUpdate("failures")

		// A success resets the backoff: the pause after the next failure
		// is back to at most minB.
		r.answer(3, entryA())
		wt.wantUpdate([]Backend{beA})
		r = wt.next()
		r.fail(http.StatusInternalServerError)
		prev := r.at
		r = wt.next()
		if gap := r.at.Sub(prev); gap <= minB/2 || gap > minB {
			t.Errorf("pause after the first failure following a success = %v, want within (%v, %v]", gap, minB/2, minB)
		}
		wt.noUpdate("failure after success")
	})
}

func TestWatcherRateLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		wt := startWatch(t, pipe, ConsulOptions{})
		// An agent that answers at once, with the same index, every time:
		// the watcher still leaves minQueryInterval (plus jitter) between
		// the starts of its queries.
		r := wt.next()
		r.answer(5, entryA())
		wt.wantUpdate([]Backend{beA})
		for i := range 5 {
			prev := r.at
			r = wt.next()
			if gap := r.at.Sub(prev); gap < minQueryInterval || gap >= minQueryInterval+queryJitter {
				t.Errorf("query %d came %v after the previous, want within [%v, %v)", i+2, gap, minQueryInterval, minQueryInterval+queryJitter)
			}
			r.answer(5, entryA())
		}
		r = wt.next()
		wt.noUpdate("same answers")

		// A query that took longer than the interval is followed at once.
		time.Sleep(3 * time.Second) // the blocking query "waits" in fake time
		r.answer(6, entryA(), entryB())
		wt.wantUpdate([]Backend{beA, beB})
		prev := time.Now()
		r = wt.next()
		if gap := r.at.Sub(prev); gap != 0 {
			t.Errorf("query after a long one came %v later, want at once", gap)
		}
	})
}

func TestWatcherStopsDuringBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		wt := startWatch(t, pipe, ConsulOptions{MinBackoff: time.Minute, MaxBackoff: time.Hour})
		wt.next().fail(http.StatusInternalServerError)
		synctest.Wait() // the watcher is now in its pause
		start := time.Now()
		wt.stop()
		if d := time.Since(start); d != 0 {
			t.Errorf("Run returned %v (fake time) after cancel, want at once", d)
		}
	})
}

func TestWatcherStopsDuringQuery(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		wt := startWatch(t, pipe, ConsulOptions{})
		wt.next() // left unanswered: a blocking query in progress
		start := time.Now()
		wt.stop()
		if d := time.Since(start); d != 0 {
			t.Errorf("Run returned %v (fake time) after cancel, want at once", d)
		}
		if st := wt.w.Status(); st.Failures != 0 || st.LastError != "" {
			t.Errorf("Status after a cancel = %+v, want no failure recorded", st)
		}
	})
}

func TestWatcherQueryTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// An agent that never answers (a dead connection) fails the query
		// once WaitTime, Consul's jitter of up to WaitTime/16 and
		// queryGrace are over.
		const wait = time.Minute
		wt := startWatch(t, pipe, ConsulOptions{WaitTime: wait, MinBackoff: time.Second})
		r := wt.next()
		r.answer(4, entryA())
		wt.wantUpdate([]Backend{beA})
		r = wt.next() // never answered
		prev := r.at
		r = wt.next()
		limit := wait + wait/16 + queryGrace
		if gap := r.at.Sub(prev); gap <= limit || gap > limit+time.Second {
			t.Errorf("retry of an unanswered query came after %v, want within (%v, %v]", gap, limit, limit+time.Second)
		}
		if st := wt.w.Status(); st.Healthy || st.Failures != 1 || st.Backends != 1 {
			t.Errorf("Status after a timed out query = %+v, want unhealthy, 1 backend kept", st)
		}
		if r.index != 0 {
			t.Errorf("retry index = %d, want 0", r.index)
		}
		wt.noUpdate("query timed out")
	})
}
