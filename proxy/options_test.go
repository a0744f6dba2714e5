package proxy

import (
	"crypto/tls"
	"reflect"
	"testing"
	"time"

	"github.com/imapproxy/imapproxy/session"
	"github.com/imapproxy/imapproxy/upstream"
)

// TestSessionConfigFromOptions: every setting a session reads is copied
// from Options, at New and at each SetOptions (a reload must reach
// running sessions); a field added to session.Config and forgotten in
// storeOptions fails here.
func TestSessionConfigFromOptions(t *testing.T) {
	var o Options
	ov := reflect.ValueOf(&o).Elem()
	ct := reflect.TypeFor[session.Config]()
	for i := range ct.NumField() {
		f := ct.Field(i)
		of := ov.FieldByName(f.Name)
		if !of.IsValid() || of.Type() != f.Type {
			t.Fatalf("session.Config.%s (%s) has no field of its name and type in Options", f.Name, f.Type)
		}
		// A distinct non-zero value per field.
		switch f.Type.Kind() {
		case reflect.Int, reflect.Int64:
			of.SetInt(int64(1000 + i))
		case reflect.Bool:
			of.SetBool(true)
		case reflect.String:
			of.SetString("banner " + f.Name)
		case reflect.Pointer:
			of.Set(reflect.New(f.Type.Elem()))
		default:
			t.Fatalf("session.Config.%s: kind %s not covered by this test", f.Name, f.Type.Kind())
		}
	}
	check := func(when string, s *Server, want *Options) {
		t.Helper()
		got := reflect.ValueOf(s.sessionConfig.Load()).Elem()
		wv := reflect.ValueOf(want).Elem()
		for i := range ct.NumField() {
			name := ct.Field(i).Name
			if !reflect.DeepEqual(got.Field(i).Interface(), wv.FieldByName(name).Interface()) {
				t.Errorf("%s: session.Config.%s = %v, want Options.%s = %v", when, name, got.Field(i), name, wv.FieldByName(name))
			}
		}
	}
	s := New(o)
	defer s.Close()
	check("New", s, &o)

	o2 := o
	o2.PreAuthTimeout = 7 * time.Second
	o2.Banner = "reloaded"
	o2.Dialer = &upstream.Dialer{}
	o2.TLSConfig = &tls.Config{}
	s.SetOptions(o2)
	check("SetOptions", s, &o2)
}
