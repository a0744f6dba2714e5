#!/usr/bin/env bash
# Soak: mixed webmail cycles, IDLE sessions and clients vanishing mid-FETCH
# through the proxy against a real Dovecot on 127.0.0.1, for a bounded time
# (default 10m; the plain test suite runs 5s of it). Prints the summary line:
# cycles, sessions, goroutines and heap before and after.
#   scripts/soak.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
d="${1:-10m}"
IMAPPROXY_SOAK="$d" go test -count=1 -run '^TestSoak$' -v -timeout 2h ./proxy/ | grep -E 'soak|^(--- |ok|FAIL)'
