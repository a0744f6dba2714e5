#!/usr/bin/env bash
# Builds a real Consul agent for the integration tests, once per machine:
# github.com/hashicorp/consul v1.14.0 (MPL-2.0) from the Go module proxy, in
# this separate module so that it never enters imapproxy's dependency graph.
# (`go install ...@v1.14.0` refuses because of its replace directives, and
# later versions need modules the proxy does not serve.) About five minutes
# on two cores; the binary is kept in $IMAPPROXY_CACHE (default
# /var/cache/imapproxy) and reused. Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")"
version=v1.14.0
out="${IMAPPROXY_CACHE:-/var/cache/imapproxy}/consul-$version/consul"
if [ -x "$out" ] && "$out" version >/dev/null 2>&1; then
	echo "$out"
	exit 0
fi
mkdir -p "$(dirname "$out")"
# go.sum pins the agent's dependencies; -mod=mod lets a newer Go tidy them.

GOFLAGS=-mod=mod go build -trimpath -o "$out.tmp" github.com/hashicorp/consul >&2
mv "$out.tmp" "$out"
echo "$out"
