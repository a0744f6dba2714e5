#!/usr/bin/env bash
# Runs the whole test suite: vet, unit and integration tests (real Dovecot
# on 127.0.0.1, started by the tests) under the race detector, and a short
# run of every fuzz target. Installs Dovecot and HAProxy (for the PROXY
# protocol test) from Debian if they are missing.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
[ -x /usr/sbin/dovecot ] || command -v dovecot >/dev/null 2>&1 || missing+=(dovecot-imapd)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
	echo "test.sh: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Consul-backed tests use the agent tools/consul/build.sh builds (about
# five minutes, once per machine); without it they skip, unless
# IMAPPROXY_REQUIRE_CONSUL=1 (as in CI).
if [ -z "${IMAPPROXY_CONSUL:-}" ] && [ "${IMAPPROXY_BUILD_CONSUL:-1}" = 1 ]; then
	IMAPPROXY_CONSUL="$(tools/consul/build.sh)" && export IMAPPROXY_CONSUL
fi

FUZZTIME="${FUZZTIME:-5s}"

go vet ./...
go test -race -count=1 -timeout 20m ./...

# Each fuzz target for a bounded time; crashers land in testdata/fuzz/ and
# then run as regressions in every plain `go test`.
while read -r pkg target; do
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" "$pkg"
done <<'TARGETS'
./imapwire FuzzReadCommand
./imapwire FuzzReadResponse
./proxy FuzzPreAuth
./proxy FuzzSASLPlain
./internal/proxyproto FuzzRead
TARGETS
