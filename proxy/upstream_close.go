package proxy

// Abort closes the connection without a LOGOUT, for the pool: a cached
// connection that failed its check is broken, and one whose LOGOUT hangs
// past the pool's bound or its shutdown deadline must not hold a socket.
// It is safe while Close runs on another goroutine: closing the socket
// ends Close's wait.
func (u *upstream) Abort() { u.abort() }
