#!/usr/bin/env python3
"""Independent check of the placements pinned in balancer_test.go.

Shares no code with the Go package: XXH64 is written out from the spec
(https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md), the score
formula from the package comment. Run:  python3 testdata/placements.py
and compare its tables with TestPinnedPlacements.
"""
import math

M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F,
                      0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def rnd(acc, lane):
    return (rotl((acc + lane * P2) & M, 31) * P1) & M


def merge(acc, val):
    return ((acc ^ rnd(0, val)) * P1 + P4) & M


def xxh64(data, seed=0):
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed, (seed - P1) & M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = rnd(v[k], int.from_bytes(data[i + 8 * k:i + 8 * k + 8], "little"))
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M
        for k in range(4):
            h = merge(h, v[k])
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while i + 8 <= n:
        h = ((rotl(h ^ rnd(0, int.from_bytes(data[i:i + 8], "little")), 27) * P1) + P4) & M
        i += 8
    if i + 4 <= n:
        h = ((rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * P1 & M), 23) * P2) + P3) & M
        i += 4
    while i < n:
        h = (rotl(h ^ (data[i] * P5 & M), 11) * P1) & M
        i += 1
    h ^= h >> 33
    h = (h * P2) & M
    h ^= h >> 29
    h = (h * P3) & M
    h ^= h >> 32
    return h


def mix64(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M
    z ^= z >> 31
    return z


def score(key, bid, weight):
    h = mix64(xxh64(key.encode()) ^ xxh64(bid.encode()))
    u = ((h >> 11) + 1) / 2.0 ** 53
    return math.inf if u == 1.0 else -weight / math.log(u)


def order(key, backends):
    return sorted(backends, key=lambda b: (-score(key, b[0], b[1]), b[0]))


USERS = ["alice@example.com", "Bob@Example.com", "carol@example.org", "dave",
         "erin@example.net", "frank@example.com", "grace@example.org",
         "heidi@example.com", "ivan@EXAMPLE.net", "judy@example.org"]
UNIFORM = [("imap-a", 1), ("imap-b", 1), ("imap-c", 1)]
WEIGHTED = [("imap-a", 1), ("imap-b", 2), ("imap-c", 3)]

assert xxh64(b"") == 0xEF46DB3751D8E999  # published test vector
for name, backends, keyf in [
        ("uniform, KeyLowercase", UNIFORM, str.lower),
        ("weighted 1:2:3, KeyLowercase", WEIGHTED, str.lower),
        ("uniform, KeyDomain", UNIFORM, lambda u: u.rsplit("@", 1)[-1].lower())]:
    print(name)
    for u in USERS:
        o = order(keyf(u), backends)
        scores = " ".join("%s=%.4f" % (b[0], score(keyf(u), b[0], b[1])) for b in o)
        print('  {%-22s %-28s}, // %s' % ('"%s",' % u, ", ".join('"%s"' % b[0] for b in o), scores))
