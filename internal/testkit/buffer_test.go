package testkit

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

// Writes from many goroutines all land, whole, and String may run
// meanwhile (go test -race checks the locking).
func TestSyncBuffer(t *testing.T) {
	var b SyncBuffer
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 100 {
				fmt.Fprintf(&b, "w%d-%d\n", i, j)
				_ = b.String()
			}
		})
	}
	wg.Wait()
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if len(lines) != 800 {
		t.Fatalf("%d lines, want 800", len(lines))
	}
	seen := make(map[string]bool)
	for _, l := range lines {
		seen[l] = true
	}
	for i := range 8 {
		for j := range 100 {
			if w := fmt.Sprintf("w%d-%d", i, j); !seen[w] {
				t.Fatalf("line %q missing or torn", w)
			}
		}
	}
}
