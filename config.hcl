# imapproxy example configuration, set up for the local demo: one cleartext
# listener in front of three IMAP backends on 127.0.0.1.
#
# Durations are strings such as "200ms", "60s", "30m" or "1h". Every key below
# that is set to its default says so; leaving such a key out changes nothing.
# Unknown keys are errors, so a typo is reported rather than ignored.

# trace | debug | info | warn | error. "debug" shows why sessions end and
# why a connection was not cached; "trace" adds one line per client command
# (tag and command name only, never arguments, so never a password).
log_level = "info"

# text | json. Use "json" when logs are shipped to a collector.
log_format = "text" # default

# A client-facing address. Add one block per address; names must be unique and
# are used in logs.
listener "imap" {
  # host:port. An empty host (":143") listens on every interface.
  address = "127.0.0.1:1143"

  # none (default) | starttls | implicit. "starttls" offers STARTTLS on a
  # cleartext port (143); "implicit" starts TLS at once (IMAPS, 993). Both
  # need the client_tls block.
  tls = "none"

  # Load balancers (HAProxy send-proxy / send-proxy-v2) whose connections
  # start with a PROXY protocol header carrying the real client address.
  # Only these addresses may send one; default none.
  # proxy_protocol_from = ["10.0.0.0/8"]

  # true makes the client address part of the cache key, so that the
  # backend checks each new address (Dovecot allow_nets, auth policy).
  # For listeners that end users reach directly; not behind a webmail.
  cache_by_client_address = false # default
}

# IMAPS on the standard port; uncomment together with client_tls below.
# listener "imaps" {
#   address = "0.0.0.0:993"
#   tls     = "implicit"
# }

# The certificate presented to clients by starttls and implicit listeners.
# client_tls {
#   # PEM certificate chain and its private key; both must load as a pair.
#   cert_file = "/etc/imapproxy/tls/cert.pem"
#   key_file  = "/etc/imapproxy/tls/key.pem"
#
#   # Advertise LOGINDISABLED on cleartext connections so that passwords only
#   # travel inside TLS. Needs at least one starttls or implicit listener.
#   require_tls_for_login = false # default
#
#   # Oldest TLS version accepted from clients: "1.2" (default) or "1.3".
#   min_version = "1.2"
# }

# How the proxy connects and logs in to the backends.
upstream {
  # none (default) | starttls | implicit. A backend's own tls overrides it.
  tls = "none"

  # PEM bundle used to verify backend certificates; empty means the system
  # roots. Set it when the backends use a private CA.
  # ca_file = "/etc/imapproxy/tls/backend-ca.pem"

  # Name checked against the backend certificate; empty means the host part
  # of each backend's address. Set it when backends are addressed by IP.
  # server_name = "imap.internal.example"

  # Skips certificate verification. For tests only: it allows a
  # man-in-the-middle to read every password.
  insecure_skip_verify = false # default

  # auto (default) | login | plain. "auto" uses AUTHENTICATE PLAIN when the
  # backend advertises it and LOGIN otherwise; pin one if a backend lies.
  login_method = "auto"

  # How long one TCP connect may take, how many more attempts follow a
  # failed one, and the pause between them. The TLS handshake and greeting
  # count against timeouts.backend_login.
  dial_timeout = "5s"    # default
  dial_retries = 2       # default
  retry_delay  = "200ms" # default

  # TCP keepalive period for backend connections; "0s" uses Go's default
  # (15s). Lower it when a firewall drops idle cached connections early.
  tcp_keepalive = "30s" # default

  # Send the client's ID and x-originating-ip to the backend before LOGIN, so
  # its logs and rate limits see the real client rather than the proxy.
  forward_id = true # default
}

# The static backend set. Users are spread over the backends by rendezvous
# hashing of the user name, so a user keeps landing on the same backend.
backend "backend-1" {
  # host:port of the IMAP server.
  address = "127.0.0.1:10143"

  # Relative share of users (default 1); 2 takes twice the users of 1.
  weight = 1

  # Overrides upstream.tls for this backend; leave it out to inherit.
  # tls = "implicit"
}

backend "backend-2" {
  address = "127.0.0.1:10144"
}

backend "backend-3" {
  address = "127.0.0.1:10145"
}

# The pool of logged-in backend connections kept after a client logs out, so
# that the next session of the same user (webmail opens one per page view)
# skips connect and LOGIN.
cache {
  # false turns the proxy into a plain relay.
  enabled = true # default

  # How long a connection may sit idle in the pool (up-imapproxy's
  # cache_expiration_time). Keep it below the backends' own idle logout.
  expiration = "300s" # default

  # How often expired connections are swept and closed.
  sweep_interval = "60s" # default

  # A connection older than this is closed instead of reused, whatever its
  # idle time, so that backend-side state cannot grow for ever.
  reuse_max_age = "1h" # default

  # Idle connections kept per user; raise it for clients that open several
  # sessions in parallel.
  max_cached_per_user = 4 # default

  # All backend connections, active and cached. Size it to what the backends
  # accept from the proxy, or they will refuse logins before the proxy does.
  max_connections = 1000 # default
}

# Each timeout is named by the state it bounds.
timeouts {
  preauth       = "60s" # default: from connect until login completes
  auth_idle     = "30m" # default: client silence between commands (RFC 3501 asks for at least 30m)
  idle          = "60m" # default: client silence during IDLE
  literal       = "60s" # default: to transfer one literal, plus 1s per 64 KiB
  backend_login = "30s" # default: greeting, ID and LOGIN on a new backend connection
  check         = "5s"  # default: the NOOP that proves a cached connection alive
  response      = "120s" # default: backend silence while it owes an answer (a hung backend)
  write         = "60s" # default: one write, or 1 MiB of a message, to a client or backend
  drain         = "30s" # default: grace for sessions to end on shutdown
}

# Sizes in bytes. They bound what a client can make the proxy hold in memory.
limits {
  max_line_length     = 65536    # default: one command line, at least 1024
  max_literal_preauth = 8192     # default: a literal before login (e.g. a password)
  max_literal         = 67108864 # default (64 MiB): a literal after login (e.g. APPEND)
  max_bad_commands    = 3        # default: BAD responses before login, then BYE
  max_command_preauth = 40960    # default: one whole command before login, literals included

  # Logins: refused before any backend is asked when longer.
  max_user_length     = 256    # default
  max_password_length = 4096   # default
  max_login_failures  = 3      # default: failed logins per connection, then BYE (0 = none)
  login_failure_delay = "1s"   # default: wait before answering a failed login ("0s" = none)

  # Client limits (0 = none). Over them a connection gets
  # "* BYE [UNAVAILABLE]" and a login "NO [LIMIT]".
  max_clients           = 5000 # default: client connections in all
  max_clients_per_ip    = 0    # default: none, webmail front ends share few addresses
  max_preauth           = 1000 # default: connections not yet logged in
  max_preauth_per_ip    = 100  # default: of those, from one address (IPv6: one /64)
  max_sessions_per_user = 50   # default: logged-in sessions of one user
}

# How users are pinned to backends (rendezvous hashing of the username) and
# what happens when the backend set changes. Every proxy of a fleet must use
# the same hash_key to agree on each user's backend.
cluster {
  # lowercase (default) | exact | domain. "domain" sends all users of a
  # domain to one backend.
  hash_key = "lowercase"

  # A backend that left the set: its cached connections close at once, its
  # active sessions may finish for this long, then get BYE.
  backend_drain = "30s" # default

  # A backend that failed a dial or refused a login with UNAVAILABLE is
  # skipped by this proxy for this long; its users go to their next backend.
  down_time = "10s" # default

  # A backend that comes back within this long of leaving (a flapping
  # health check) is held out until it has stayed this long, so its users
  # move once, not back and forth. "0s" disables it.
  rejoin_hold = "30s" # default
}

# Cluster mode: take the backend set from the healthy instances of a Consul
# service instead of the backend blocks above (remove those when enabling
# this). Weight from meta imap_weight or Weights.Passing, TLS from meta
# imap_tls. See docs/pinning.md for the service definition.
# consul {
#   address    = "127.0.0.1:8500"
#   service    = "imap"
#   # tag      = "mailstore"
#   # token_file = "/etc/imapproxy/consul-token"
#   wait_time  = "5m"
# }

# The operator's HTTP listener: /metrics, /healthz, /readyz, the admin API
# (docs/admin.md) and `imapproxy status`. Keep it on loopback.
admin {
  address = "127.0.0.1:9143" # default
  # Require "Authorization: Bearer TOKEN" on /api/ (chmod 600 the file).
  # token_file = "/etc/imapproxy/admin-token"
  # Where per-user protocol traces go (POST /api/v1/users/USER/trace);
  # unset, tracing is off.
  # trace_dir = "/var/lib/imapproxy"
}

# Register this proxy in Consul, so a fleet of proxies is discoverable.
# register {
#   service        = "imapproxy"
#   address        = "192.0.2.10:143" # required if the listener is on all interfaces
#   check          = "tcp"            # or "http": /readyz on the admin listener
#   check_interval = "10s"
# }
