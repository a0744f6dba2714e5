// A build-only module for a Consul agent used by integration tests; see
// build.sh. Not part of imapproxy.
module imapproxy.test/consulbuild

go 1.26

require github.com/hashicorp/consul v1.14.0
