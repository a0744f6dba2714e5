#!/usr/bin/env bash
# Chaos soak: the imapproxy daemon in front of three Dovecots found in a
# Consul agent, each behind a fault injector, with webmail, IDLE and
# aborted sessions while stalls, drips, resets, black holes, refused
# connects, SIGSTOP, Consul maintenance and reloads hit at random (default
# 10m; the plain test suite runs 25s of it). Prints the seed, the summary
# lines (cycles, outcomes, faults by kind, Consul lag, goroutines and
# descriptors before and after) and, on failure, the fault schedule.
#   scripts/chaos.sh [DURATION] [SEED]
# Needs root (Dovecot) and a Consul agent binary: IMAPPROXY_CONSUL, or
# the one tools/consul/build.sh builds.
set -euo pipefail
cd "$(dirname "$0")/.."
d="${1:-10m}"
if [ -n "${2:-}" ]; then
	export IMAPPROXY_CHAOS_SEED="$2"
fi
if [ -z "${IMAPPROXY_CONSUL:-}" ]; then
	IMAPPROXY_CONSUL="$(tools/consul/build.sh)"
	export IMAPPROXY_CONSUL
fi
export IMAPPROXY_REQUIRE_DOVECOT=1 IMAPPROXY_REQUIRE_CONSUL=1
IMAPPROXY_CHAOS="$d" go test -count=1 -run '^TestChaos$' -v -timeout 24h ./cmd/imapproxy/ |
	grep -E 'chaos|^ +[0-9]+\.[0-9]+s |^(--- |ok|FAIL)'
