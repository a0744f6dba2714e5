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

# Fuzz budgets are execution counts (a few seconds each here), not
# durations: with go1.26 a duration can end in a spurious "context deadline
# exceeded" failure with no crasher (golang/go#75804, fixed in go1.27).
# FUZZTIME=10m ./test.sh fuzzes each target for that long instead.
FUZZTIME="${FUZZTIME:-}"

# go.mod and go.sum must be as go mod tidy leaves them.
go mod tidy -diff
go vet ./...
# The daemon builds on the platforms Go serves it to, not only on Linux.
for os in darwin freebsd windows; do
	GOOS=$os go build -o /dev/null ./cmd/imapproxy
done
go test -race -count=1 -timeout 20m ./...

# Each fuzz target for a bounded number of runs; crashers land in testdata/fuzz/ and
# then run as regressions in every plain `go test`.
while read -r pkg target budget; do
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "${FUZZTIME:-$budget}" "$pkg"
done <<'TARGETS'
./imapwire FuzzReadCommand 200000x
./imapwire FuzzReadResponse 100000x
./imapwire FuzzReadPart 100000x
./proxy FuzzPreAuth 10000x
./session FuzzSASLPlain 10000x
./internal/proxyproto FuzzRead 100000x
TARGETS
