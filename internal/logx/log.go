package logx

import (
	"io"
	"log"
	"slices"

	"github.com/hashicorp/go-hclog"
)

// fieldLogger is the server's logger with fields of its own (session,
// client, user, backend), added to a line only when one is written.
// hclog's With copies the whole logger and builds and sorts a map of the
// fields: about 1 KiB at each of a session's three levels, held as long as
// the session lives, for lines that at the usual level are never written.
// Level, output and name stay the server logger's, so a reload that
// changes the level reaches every session at once.
type fieldLogger struct {
	hclog.Logger
	kv []any
}

// With returns l with the key/value pairs kv added to every line.
func With(l hclog.Logger, kv ...any) hclog.Logger {
	if f, ok := l.(*fieldLogger); ok {
		return &fieldLogger{f.Logger, f.with(kv)}
	}
	return &fieldLogger{l, kv}
}

// with returns the fields followed by args, leaving l.kv as it was:
// loggers derived from one parent share its array.
func (l *fieldLogger) with(args []any) []any {
	return append(l.kv[:len(l.kv):len(l.kv)], args...)
}

// Log writes the line with the fields, and builds nothing for a line
// below the level. (A null logger's level is NoLevel: nothing is written.)
func (l *fieldLogger) Log(level hclog.Level, msg string, args ...any) {
	if lv := l.Logger.GetLevel(); lv != hclog.NoLevel && lv <= level {
		l.Logger.Log(level, msg, l.with(args)...)
	}
}

func (l *fieldLogger) Trace(msg string, args ...any) { l.Log(hclog.Trace, msg, args...) }
func (l *fieldLogger) Debug(msg string, args ...any) { l.Log(hclog.Debug, msg, args...) }
func (l *fieldLogger) Info(msg string, args ...any)  { l.Log(hclog.Info, msg, args...) }
func (l *fieldLogger) Warn(msg string, args ...any)  { l.Log(hclog.Warn, msg, args...) }
func (l *fieldLogger) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

func (l *fieldLogger) With(args ...any) hclog.Logger { return With(l, args...) }

// ImpliedArgs must not append into the parent's slice: its spare capacity
// is the parent's.
func (l *fieldLogger) ImpliedArgs() []any {
	return append(slices.Clip(l.Logger.ImpliedArgs()), l.kv...)
}

func (l *fieldLogger) Named(name string) hclog.Logger {
	return &fieldLogger{l.Logger.Named(name), l.kv}
}

func (l *fieldLogger) ResetNamed(name string) hclog.Logger {
	return &fieldLogger{l.Logger.ResetNamed(name), l.kv}
}

// The standard-library adapters are made on demand from a real With: they
// are rare, and would otherwise drop the fields.
func (l *fieldLogger) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	return l.Logger.With(l.kv...).StandardLogger(opts)
}

func (l *fieldLogger) StandardWriter(opts *hclog.StandardLoggerOptions) io.Writer {
	return l.Logger.With(l.kv...).StandardWriter(opts)
}
