#!/usr/bin/env bash
# Local demo: three real Dovecot backends on 127.0.0.1:10143-10145 (users
# user0001..user0050, password "secret", seeded mail) with imapproxy in
# front on 127.0.0.1:1143, configured by ./config.hcl. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v dovecot >/dev/null 2>&1 && [ ! -x /usr/sbin/dovecot ]; then
	echo "demo.sh: installing dovecot-imapd" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq dovecot-imapd >/dev/null
fi

bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/imapproxy" ./cmd/imapproxy
go build -o "$bin/imapproxy-demo" ./cmd/imapproxy-demo
"$bin/imapproxy" -check-config -config config.hcl
"$bin/imapproxy-demo" -proxy "$bin/imapproxy" -config config.hcl "$@"
