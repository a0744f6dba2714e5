package discovery

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The damper's tests run in a synctest bubble: its timer uses the fake
// clock, so waits are checked to the nanosecond in no real time.

var beC = Backend{ID: "imap-c", Addr: "10.0.0.3:143", Weight: 1, TLS: TLSImplicit}

// delivery is one call of a Damper's update, at a time since the test's
// start.
type delivery struct {
	at   time.Duration
	set  []Backend
	held []Backend
}

// recorder is a Damper's consumer: it records each delivery.
type recorder struct {
	start time.Time
	mu    sync.Mutex
	got   []delivery
}

// newDamp starts a Damper on a recorder, stopped when the test ends.
func newDamp(t *testing.T, hold time.Duration) (*Damper, *recorder) {
	r := &recorder{start: time.Now()}
	d := NewDamper(hold, r.update)
	t.Cleanup(d.Stop)
	return d, r
}

func (r *recorder) update(bs, held []Backend) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, delivery{time.Since(r.start), bs, held})
}

// take returns the deliveries since the last take.
func (r *recorder) take() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	got := r.got
	r.got = nil
	return got
}

// want checks that exactly one delivery came since the last take, of
// want with none held, now.
func (r *recorder) want(t *testing.T, step string, want []Backend) {
	t.Helper()
	r.wantHeld(t, step, want, nil)
}

// wantHeld is want with held backends.
func (r *recorder) wantHeld(t *testing.T, step string, want, held []Backend) {
	t.Helper()
	synctest.Wait() // a timer's delivery, if due, has been made
	got := r.take()
	if len(got) != 1 {
		t.Errorf("%s: %d deliveries %v, want 1 of %v held %v", step, len(got), got, want, held)
		return
	}
	if now := time.Since(r.start); got[0].at != now || !Equal(got[0].set, want) || !Equal(got[0].held, held) {
		t.Errorf("%s: delivered %v held %v at %v, want %v held %v at %v", step, got[0].set, got[0].held, got[0].at, want, held, now)
	}
}

// none checks that no delivery came since the last take.
func (r *recorder) none(t *testing.T, step string) {
	t.Helper()
	synctest.Wait()
	if got := r.take(); len(got) != 0 {
		t.Errorf("%s: delivered %v, want nothing", step, got)
	}
}

// set returns bs as a source would deliver it: in no particular order.
func set(bs ...Backend) []Backend {
	out := make([]Backend, len(bs))
	for i, b := range bs {
		out[len(bs)-1-i] = b
	}
	return out
}

func TestDampHoldZeroPassesThrough(t *testing.T) {
	for _, hold := range []time.Duration{0, -time.Second} {
		t.Run(hold.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d, r := newDamp(t, hold)
				d.Update(set(beA, beB))
				r.want(t, "first set", []Backend{beA, beB})
				d.Update(set(beB))
				r.want(t, "removal", []Backend{beB})
				d.Update(set(beA, beB))
				r.want(t, "quick return", []Backend{beA, beB})
				d.Update(set(beB, beA))
				r.none(t, "same set again")
				time.Sleep(time.Hour)
				r.none(t, "an hour later")
			})
		})
	}
}

func TestDampFirstSetImmediate(t *testing.T) {
	tests := []struct {
		name string
		in   []Backend
		want []Backend
	}{
		{"backends", set(beA, beB, beC), []Backend{beA, beB, beC}},
		{"empty", []Backend{}, []Backend{}},
		{"nil", nil, []Backend{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d, r := newDamp(t, 10*time.Second)
				d.Update(tt.in)
				synctest.Wait()
				got := r.take()
				if len(got) != 1 || got[0].at != 0 || got[0].set == nil || !Equal(got[0].set, tt.want) {
					t.Fatalf("first Update(%v) delivered %v, want %v at once", tt.in, got, tt.want)
				}
				d.Update(tt.in)
				r.none(t, "same set again")
			})
		})
	}
}

func TestDampRemovalImmediate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, r := newDamp(t, 10*time.Second)
		d.Update(set(beA, beB, beC))
		r.want(t, "first set", []Backend{beA, beB, beC})
		time.Sleep(time.Second)
		d.Update(set(beA, beC))
		r.want(t, "b removed", []Backend{beA, beC})
		d.Update(set())
		r.want(t, "all removed", []Backend{})
	})
}

func TestDampReturnDelayedByHold(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 10 * time.Second
		d, r := newDamp(t, hold)
		d.Update(set(beA, beB))
		r.want(t, "first set", []Backend{beA, beB})
		time.Sleep(time.Second)
		d.Update(set(beB))
		r.want(t, "a removed", []Backend{beB})
		time.Sleep(2 * time.Second)
		d.Update(set(beA, beB))
		r.wantHeld(t, "a back 2s after leaving", []Backend{beB}, []Backend{beA})

		time.Sleep(hold - time.Nanosecond)
		r.none(t, "a back for hold less 1ns")
		time.Sleep(time.Nanosecond)
		r.want(t, "a back for hold", []Backend{beA, beB})
		time.Sleep(time.Hour)
		r.none(t, "an hour later")
	})
}

func TestDampReleaseUsesLatestSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 10 * time.Second
		d, r := newDamp(t, hold)
		d.Update(set(beA, beB))
		r.want(t, "first set", []Backend{beA, beB})
		d.Update(set(beB))
		r.want(t, "a removed", []Backend{beB})
		time.Sleep(time.Second)
		d.Update(set(beA, beB)) // a due at 11s
		r.wantHeld(t, "a back", []Backend{beB}, []Backend{beA})

		// While a waits, the source changes a and b and adds c: b's
		// change and c pass at once, a's only with a.
		time.Sleep(time.Second)
		a2 := beA
		a2.Weight = 7
		b2 := beB
		b2.Addr = "10.0.0.20:143"
		d.Update(set(a2, b2, beC))
		r.wantHeld(t, "b changed, c new, a waiting", []Backend{b2, beC}, []Backend{a2})
		time.Sleep(hold - 2*time.Second)
		r.none(t, "a waiting")
		time.Sleep(time.Second)
		r.want(t, "a let in", []Backend{a2, b2, beC})
	})
}

func TestDampReturnAfterHoldImmediate(t *testing.T) {
	for _, away := range []time.Duration{10 * time.Second, time.Minute} {
		t.Run(away.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d, r := newDamp(t, 10*time.Second)
				d.Update(set(beA, beB))
				r.want(t, "first set", []Backend{beA, beB})
				d.Update(set(beB))
				r.want(t, "a removed", []Backend{beB})
				time.Sleep(away)
				d.Update(set(beA, beB))
				r.want(t, "a back after "+away.String(), []Backend{beA, beB})
			})
		})
	}
}

func TestDampFlapping(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 10 * time.Second
		d, r := newDamp(t, hold)
		// a's check flips every second for 30s: gone at 1s, 3s, ..., 29s,
		// back at 2s, 4s, ..., 30s, then stays.
		d.Update(set(beA, beB))
		for i := 1; i <= 30; i++ {
			time.Sleep(time.Second)
			if i%2 == 1 {
				d.Update(set(beB))
			} else {
				d.Update(set(beA, beB))
			}
		}
		time.Sleep(time.Minute)
		synctest.Wait()

		// Between the changes of the set in use, a is delivered as held
		// at each return (15) and not at each leave (14, the 15th return
		// lasting).
		var got []delivery
		heldFlips := 0
		for _, g := range r.take() {
			if len(got) > 0 && Equal(got[len(got)-1].set, g.set) {
				heldFlips++
				continue
			}
			got = append(got, g)
		}
		if heldFlips != 29 {
			t.Errorf("%d deliveries changed only what is held, want 29", heldFlips)
		}
		want := []delivery{
			{0, []Backend{beA, beB}, nil},
			{time.Second, []Backend{beB}, nil},
			{30*time.Second + hold, []Backend{beA, beB}, nil},
		}
		if len(got) != len(want) {
			t.Fatalf("deliveries = %v, want %v", got, want)
		}
		for i := range want {
			if got[i].at != want[i].at || !Equal(got[i].set, want[i].set) {
				t.Errorf("delivery %d = %v, want %v", i, got[i], want[i])
			}
		}
	})
}

func TestDampNewBackendImmediate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d, r := newDamp(t, 10*time.Second)
		d.Update(set(beA))
		r.want(t, "first set", []Backend{beA})
		time.Sleep(time.Second)
		d.Update(set(beA, beB))
		r.want(t, "b new", []Backend{beA, beB})

		// Also while another backend waits.
		d.Update(set(beB))
		r.want(t, "a removed", []Backend{beB})
		d.Update(set(beA, beB))
		r.wantHeld(t, "a back", []Backend{beB}, []Backend{beA})
		d.Update(set(beA, beB, beC))
		r.wantHeld(t, "c new, a waiting", []Backend{beB, beC}, []Backend{beA})
	})
}

func TestDampChangeImmediate(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Backend)
	}{
		{"weight", func(b *Backend) { b.Weight = 5 }},
		{"addr", func(b *Backend) { b.Addr = "10.0.0.1:1143" }},
		{"tls", func(b *Backend) { b.TLS = TLSStartTLS }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d, r := newDamp(t, 10*time.Second)
				d.Update(set(beA, beB))
				r.want(t, "first set", []Backend{beA, beB})
				time.Sleep(time.Second)
				a2 := beA
				tt.change(&a2)
				d.Update(set(a2, beB))
				r.want(t, tt.name+" changed", []Backend{a2, beB})
				d.Update(set(beA, beB))
				r.want(t, tt.name+" changed back", []Backend{beA, beB})
			})
		})
	}
}

func TestDampStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 10 * time.Second
		d, r := newDamp(t, hold)
		d.Update(set(beA, beB))
		d.Update(set(beB))
		d.Update(set(beA, beB)) // a waits; the timer is armed
		r.take()
		d.Stop()
		if d.timer == nil || d.timer.Stop() {
			t.Error("the timer is still armed after Stop")
		}
		time.Sleep(2 * hold)
		r.none(t, "past hold after Stop")
		d.Update(set(beC))
		r.none(t, "Update after Stop")
		d.Stop() // again: no panic, no delivery
		r.none(t, "second Stop")
	})
}

func TestDampSerialNoRepeats(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = time.Second
		var (
			running atomic.Int32
			mu      sync.Mutex
			last    [2][]Backend
			calls   int
		)
		d := NewDamper(hold, func(bs, held []Backend) {
			if n := running.Add(1); n != 1 {
				t.Errorf("update running %d times at once", n)
			}
			runtime.Gosched() // give an overlapping call its chance
			mu.Lock()
			if calls > 0 && Equal(last[0], bs) && Equal(last[1], held) {
				t.Errorf("update called twice in a row with %v held %v", bs, held)
			}
			last, calls = [2][]Backend{bs, held}, calls+1
			mu.Unlock()
			running.Add(-1)
		})
		defer d.Stop()

		// Two sources at once, each flapping its own backend with timers
		// letting them back in between.
		var wg sync.WaitGroup
		for _, b := range []Backend{beA, beB} {
			wg.Go(func() {
				for i := range 200 {
					if i%2 == 0 {
						d.Update(set(b, beC))
					} else {
						d.Update(set(beC))
					}
					time.Sleep(time.Duration(i%7) * hold / 3)
				}
			})
		}
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if calls < 10 {
			t.Errorf("update called %d times, want many", calls)
		}
	})
}

// TestDampNeverLeavesNone: a backend is not held back when the source has
// no other: a single backend back from a 5 s maintenance takes logins at
// once, and so does the first of several to return after all left.
func TestDampNeverLeavesNone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const hold = 30 * time.Second
		d, r := newDamp(t, hold)
		d.Update(set(beA))
		r.want(t, "first set", []Backend{beA})
		time.Sleep(time.Second)
		d.Update(set())
		r.want(t, "a in maintenance", []Backend{})
		time.Sleep(5 * time.Second)
		d.Update(set(beA))
		r.want(t, "a back, alone", []Backend{beA})
		time.Sleep(time.Hour)
		r.none(t, "an hour later")

		// Two backends; both leave; a returns (no other: in at once),
		// then b returns while a serves: b is held back as usual.
		d.Update(set(beA, beB))
		r.want(t, "b new", []Backend{beA, beB})
		d.Update(set())
		r.want(t, "both gone", []Backend{})
		time.Sleep(time.Second)
		d.Update(set(beA))
		r.want(t, "a back, no other", []Backend{beA})
		d.Update(set(beA, beB))
		r.wantHeld(t, "b back while a serves", []Backend{beA}, []Backend{beB})

		// a leaves while b is held: b is all there is, and goes in.
		time.Sleep(time.Second)
		d.Update(set(beB))
		r.want(t, "a gone, b held", []Backend{beB})
		time.Sleep(hold)
		r.none(t, "past b's hold")
	})
}
