#!/usr/bin/env bash
# Throughput with the layer as a share of throughput without it, from outside: wrk against
# examples/instructions.rs served bare and behind CachedAuthorizationLayer (one minimal route, L1
# hits, a current-thread runtime each), the servers pinned to one core and wrk to another, rounds
# alternating between the two (which goes first alternates too), and the figure the median of the
# per-round ratios: rounds on a shared VM drift by more than the difference measured.
#
# Usage: bash scripts/wrk.sh            (ROUNDS=7 DURATION=5 CONNECTIONS="32 256" by default)
# Needs wrk, taskset, curl and 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-32 256}
for tool in wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "wrk.sh: $tool is needed (apt-get install wrk util-linux curl)" >&2; exit 2; }
done
cargo build -q --release --example instructions
BIN=./target/release/examples/instructions
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
PORT=3951 taskset -c 1 "$BIN" serve bare >/dev/null &
PORT=3952 taskset -c 1 "$BIN" serve layer >/dev/null &
for port in 3951 3952; do
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$port/documents/1" && break
    sleep 0.1
  done
done
rps() { # port connections -> requests per second
  taskset -c 0 wrk -t1 -c"$2" -d"${DURATION}s" -H 'Authorization: Bearer bob-token' \
    "http://127.0.0.1:$1/documents/1" | awk '/Requests\/sec/ { print $2 }'
}
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo "wrk: $ROUNDS alternating rounds of ${DURATION} s per connection count; server on core 1, wrk on core 0"
echo "| connections | bare req/s (median) | layer req/s (median) | layer / bare (median of rounds) | rounds' ratios |"
echo "|---:|---:|---:|---:|---|"
for c in $CONNECTIONS; do
  rps 3951 "$c" >/dev/null; rps 3952 "$c" >/dev/null # warm-up
  bare=(); layer=(); ratios=()
  for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then b=$(rps 3951 "$c"); l=$(rps 3952 "$c"); else l=$(rps 3952 "$c"); b=$(rps 3951 "$c"); fi
    bare+=("$b"); layer+=("$l"); ratios+=("$(awk -v b="$b" -v l="$l" 'BEGIN { printf "%.3f", l / b }')")
  done
  echo "| $c | $(printf '%s\n' "${bare[@]}" | median) | $(printf '%s\n' "${layer[@]}" | median) | $(printf '%s\n' "${ratios[@]}" | median) | ${ratios[*]} |"
done
