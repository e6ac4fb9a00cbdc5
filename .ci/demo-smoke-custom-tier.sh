#!/usr/bin/env bash
# Two processes of examples/custom_tier.rs sharing one fresh AUTHZ_TIER_DIR: a decision computed
# by A is an L2 hit in B (B never asks its authorizer), and an invalidation on A reaches B
# through the polling backplane (B's next check of bob asks its authorizer again).
set -euo pipefail
cd "$(dirname "$0")/.."
P1=${SMOKE_PORT1:-3920}; P2=${SMOKE_PORT2:-3921}
A="http://127.0.0.1:$P1"; B="http://127.0.0.1:$P2"
DIR=$(mktemp -d)
echo "demo with a custom tier: two processes sharing $DIR"
cargo build -q --example custom_tier
AUTHZ_TIER_DIR=$DIR PORT=$P1 timeout 120 ./target/debug/examples/custom_tier > /tmp/custom-tier-1.log 2>&1 &
pid1=$!
AUTHZ_TIER_DIR=$DIR PORT=$P2 timeout 120 ./target/debug/examples/custom_tier > /tmp/custom-tier-2.log 2>&1 &
pid2=$!
cleanup() {
  kill $pid1 $pid2 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
for base in $A $B; do
  for _ in $(seq 1 100); do curl -sf -m 2 "$base/health" >/dev/null 2>&1 && break; sleep 0.1; done
done

fail=0
check() { if [ "$2" = "$3" ]; then echo "ok   $1 ($3)"; else echo "FAIL $1: expected $2, got $3"; fail=1; fi; }
code() { curl -s -m 5 -o /dev/null -w '%{http_code}' "$@"; }
stat() { curl -s -m 5 -H 'Authorization: Bearer alice-token' "$1/admin/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print($2)"; }
# wait_for <base> <python expression>: up to 5 s for the expression on that process's stats.
wait_for() {
  for _ in $(seq 1 50); do [ "$(stat "$1" "$2" 2>/dev/null)" = True ] && return 0; sleep 0.1; done
  return 1
}
# Both backplanes trusted (each has taken a poll): a subscription marks older L1 entries stale.
# /admin/stats is itself a check (alice, admin manage): A computes it first and writes it to the
# tier, so that B's stats calls are L2 (then L1) hits and B's authorizer_calls count bob alone.
check "A's backplane trusted" 1 "$(wait_for "$A" 'd["backplane"]["l1_trusted"]' && echo 1 || echo 0)"
check "A wrote alice's stats decision" 1 "$(wait_for "$A" 'd["tiers"]["l2"]["writes"] > 0' && echo 1 || echo 0)"
check "B's backplane trusted" 1 "$(wait_for "$B" 'd["backplane"]["l1_trusted"]' && echo 1 || echo 0)"
check "A prints its tiers" 1 "$(grep -c 'L2 (custom: files in' /tmp/custom-tier-1.log)"
writes0=$(stat "$A" 'd["tiers"]["l2"]["writes"]')
check "bob GET on A" 200 "$(code -H 'Authorization: Bearer bob-token' "$A/documents/1")"
check "A wrote bob's decision (write-behind)" 1 "$(wait_for "$A" "d['tiers']['l2']['writes'] > $writes0" && echo 1 || echo 0)"
hits0=$(stat "$B" 'd["tiers"]["l2"]["hits"]')
check "bob GET on B" 200 "$(code -H 'Authorization: Bearer bob-token' "$B/documents/1")"
hits1=$(stat "$B" 'd["tiers"]["l2"]["hits"]')
check "B's L2 hits rose" 1 "$([ "$hits1" -gt "$hits0" ] && echo 1 || echo 0)"
check "B never asked its authorizer" 0 "$(stat "$B" 'd["authorizer_calls"]')"
check "B's breaker closed" closed "$(stat "$B" 'd["tiers"]["l2"]["breaker"]')"
check "bob GET on B again" 200 "$(code -H 'Authorization: Bearer bob-token' "$B/documents/1")"
calls0=$(stat "$B" 'd["authorizer_calls"]')
check "still no authorizer call on B (L1)" 0 "$calls0"

check "alice invalidates all on A" 204 "$(code -X POST -H 'Authorization: Bearer alice-token' -d '{"all":true}' "$A/admin/invalidate")"
# B hears it within a poll or two (the bound is its max_staleness); wait up to 5 s on a busy machine.
check "B heard the invalidation" 1 "$(wait_for "$B" 'd["backplane"]["invalidations"] > 0' && echo 1 || echo 0)"
calls1=$(stat "$B" 'd["authorizer_calls"]') # alice's check is recomputed here: counted, then in L1
check "bob GET on B after the invalidation" 200 "$(code -H 'Authorization: Bearer bob-token' "$B/documents/1")"
calls2=$(stat "$B" 'd["authorizer_calls"]')
check "B asked its authorizer for bob (no hit of the old entry)" $((calls1 + 1)) "$calls2"
check "no lock left behind" 0 "$(ls -A "$DIR" | grep -c '^lock$' || true)"

kill -TERM $pid1 $pid2
wait $pid1 || fail=1
wait $pid2 || fail=1
trap - EXIT
cleanup
if [ $fail -ne 0 ]; then cat /tmp/custom-tier-1.log /tmp/custom-tier-2.log; exit 1; fi
echo "demo with a custom tier: all checks passed"
