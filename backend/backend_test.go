package backend

import (
	"slices"
	"testing"
)

func TestNormalize(t *testing.T) {
	a1 := Backend{ID: "a", Addr: "10.0.0.1:143", Weight: 1}
	a2 := Backend{ID: "a", Addr: "10.0.0.9:143", Weight: 5}
	b := Backend{ID: "b", Addr: "10.0.0.2:143", Weight: 2, TLS: TLSStartTLS}
	c := Backend{ID: "c", Addr: "[2001:db8::1]:993", Weight: 1, TLS: TLSImplicit}
	tests := []struct {
		name string
		in   []Backend
		want []Backend
	}{
		{"nil", nil, []Backend{}},
		{"empty", []Backend{}, []Backend{}},
		{"sorted stays", []Backend{a1, b, c}, []Backend{a1, b, c}},
		{"sorts by id", []Backend{c, a1, b}, []Backend{a1, b, c}},
		{"duplicate keeps first", []Backend{b, a2, c, a1}, []Backend{a2, b, c}},
		{"duplicate keeps first, other order", []Backend{a1, a2}, []Backend{a1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := slices.Clone(tt.in)
			got := Normalize(tt.in)
			if !slices.Equal(got, tt.want) {
				t.Errorf("Normalize(%v) = %v, want %v", tt.in, got, tt.want)
			}
			if got == nil {
				t.Errorf("Normalize(%v) = nil, want a non-nil slice", tt.in)
			}
			if !slices.Equal(tt.in, in) {
				t.Errorf("Normalize modified its input: %v, was %v", tt.in, in)
			}
		})
	}
}

func TestEqual(t *testing.T) {
	a := Backend{ID: "a", Addr: "10.0.0.1:143", Weight: 1}
	b := Backend{ID: "b", Addr: "10.0.0.2:143", Weight: 1}
	tests := []struct {
		name string
		x, y []Backend
		want bool
	}{
		{"nil and empty", nil, []Backend{}, true},
		{"same", []Backend{a, b}, []Backend{a, b}, true},
		{"order matters", []Backend{a, b}, []Backend{b, a}, false},
		{"length", []Backend{a}, []Backend{a, b}, false},
		{"weight", []Backend{a}, []Backend{{ID: "a", Addr: a.Addr, Weight: 2}}, false},
		{"addr", []Backend{a}, []Backend{{ID: "a", Addr: "10.0.0.3:143", Weight: 1}}, false},
		{"tls", []Backend{a}, []Backend{{ID: "a", Addr: a.Addr, Weight: 1, TLS: TLSNone}}, false},
	}
	for _, tt := range tests {
		if got := Equal(tt.x, tt.y); got != tt.want {
			t.Errorf("%s: Equal(%v, %v) = %v, want %v", tt.name, tt.x, tt.y, got, tt.want)
		}
	}
}
