#!/usr/bin/env bash
# The layer's own cost in instructions per request, bare vs behind CachedAuthorizationLayer (L1
# hits), under valgrind's callgrind: instruction counts repeat exactly, whatever else the machine
# is doing, so a few percent show. Two measures, both on examples/instructions.rs (one minimal
# route, the layer around the router as the quickstart wires it, a current-thread runtime):
#
# - HTTP: the server runs under callgrind; after a warm-up, its counters are zeroed, curl sends
#   N requests over one keep-alive loopback connection, and the counters are dumped: the server's
#   instructions (hyper, axum, the layer; not curl's) divided by N.
# - in-process: `oneshot` N1 and then N2 requests; (total(N2) - total(N1)) / (N2 - N1) leaves out
#   start-up and warm-up. Once with L1 hits, once with a new document in every request (an L1
#   miss each: a trivial authorizer, the L1 insert; no shared tier).
#
# Usage: bash scripts/instructions.sh [N]      (N requests per HTTP measure, default 2000)
# Needs valgrind (callgrind, callgrind_control) and curl. Prints a table; MAX_HTTP_RATIO=1.10 makes
# it exit 1 when the HTTP ratio is above it (a regression gate).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
N1=${N1:-1000}
N2=${N2:-5000}
for tool in valgrind callgrind_control curl; do
  command -v "$tool" >/dev/null || { echo "instructions: $tool is needed (apt-get install valgrind curl)" >&2; exit 2; }
done
cargo build -q --release --example instructions
BIN=./target/release/examples/instructions
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

total() { grep -E '^totals:' "$1" | tail -1 | awk '{print $2}'; }

urls() { # count port -> a curl config file of `count` GETs
  for _ in $(seq 1 "$1"); do
    printf 'url = "http://127.0.0.1:%s/documents/1"\noutput = "/dev/null"\n' "$2"
  done > "$work/urls-$1-$2"
  echo "$work/urls-$1-$2"
}

http() { # bare|layer port -> instructions per request
  local which=$1 port=$2 out="$work/http-$1"
  PORT=$port valgrind --tool=callgrind --callgrind-out-file="$out" -q "$BIN" serve "$which" >"$work/$which.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$port/documents/1" && break
    sleep 0.1
  done
  curl -sf -H 'Authorization: Bearer bob-token' -K "$(urls 200 "$port")"
  callgrind_control -z "$pid" >/dev/null 2>&1
  curl -sf -H 'Authorization: Bearer bob-token' -K "$(urls "$N" "$port")"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo $(( $(total "$out.1") / N ))
}

inproc() { # bare|layer -> instructions per request
  local a="$work/one-$1-$N1" b="$work/one-$1-$N2"
  valgrind --tool=callgrind --callgrind-out-file="$a" -q "$BIN" oneshot "$1" "$N1" >/dev/null
  valgrind --tool=callgrind --callgrind-out-file="$b" -q "$BIN" oneshot "$1" "$N2" >/dev/null
  echo $(( ($(total "$b") - $(total "$a")) / (N2 - N1) ))
}

http_bare=$(http bare 3931)
http_layer=$(http layer 3932)
one_bare=$(inproc bare)
one_layer=$(inproc layer)
miss_bare=$(inproc bare-miss)
miss_layer=$(inproc layer-miss)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b / a }'; }
http_ratio=$(ratio "$http_bare" "$http_layer")
echo "instructions per request (callgrind; L1 hits; HTTP: $N keep-alive requests, in-process: oneshot $N1 vs $N2)"
echo "| path | bare | with the layer | layer - bare | ratio |"
echo "|---|---:|---:|---:|---:|"
echo "| HTTP on loopback | $http_bare | $http_layer | $((http_layer - http_bare)) | ${http_ratio}x |"
echo "| in-process (oneshot) | $one_bare | $one_layer | $((one_layer - one_bare)) | $(ratio "$one_bare" "$one_layer")x |"
echo "| in-process, every request an L1 miss | $miss_bare | $miss_layer | $((miss_layer - miss_bare)) | $(ratio "$miss_bare" "$miss_layer")x |"
if [ -n "${MAX_HTTP_RATIO:-}" ]; then
  awk -v r="$http_ratio" -v m="$MAX_HTTP_RATIO" 'BEGIN { exit !(r <= m) }' \
    || { echo "instructions: HTTP ratio ${http_ratio}x is above MAX_HTTP_RATIO=${MAX_HTTP_RATIO}" >&2; exit 1; }
fi
