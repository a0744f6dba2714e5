package discovery

import (
	"context"
	"testing"
)

func TestStatic(t *testing.T) {
	s := &Static{Backends: []Backend{
		{ID: "b", Addr: "10.0.0.2:143", Weight: 1},
		{ID: "a", Addr: "10.0.0.1:143", Weight: 1},
		{ID: "b", Addr: "10.0.0.3:143", Weight: 1},
	}}
	ctx, cancel := context.WithCancel(t.Context())
	updates := make(chan []Backend, 2)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, func(bs []Backend) { updates <- bs }) }()

	got := <-updates
	want := []Backend{{ID: "a", Addr: "10.0.0.1:143", Weight: 1}, {ID: "b", Addr: "10.0.0.2:143", Weight: 1}}
	if !Equal(got, want) {
		t.Errorf("Static update = %v, want %v", got, want)
	}
	select {
	case err := <-done:
		t.Fatalf("Static.Run returned %v before ctx was done", err)
	default:
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Static.Run = %v, want nil", err)
	}
	if len(updates) != 0 {
		t.Errorf("Static called update %d more times", len(updates))
	}
}
