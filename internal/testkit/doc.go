// Package testkit holds what the tests of several packages share: a small
// IMAP client (Conn, and Client, which fails its test on any error),
// certificates made on the fly for TLS (NewCert), and a log buffer that
// goroutines write while the test reads it (SyncBuffer).
//
// It is for tests and test harnesses only. It imports no package of this
// module, so the tests of any package, and harnesses such as
// internal/dovecottest, can use it without an import cycle.
package testkit
