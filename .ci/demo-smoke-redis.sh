#!/usr/bin/env bash
# Two quickstart instances sharing Redis (L2 + backplane): a role change on one shows on the very
# next request on the other, L2 serves the second instance, and `redis-cli --scan` on the demo's
# namespace shows no principal name, token or resource id.
set -euo pipefail
cd "$(dirname "$0")/.."
# With REDIS_CLUSTER_NODES set (comma-separated URLs), the same walkthrough on a Redis Cluster.
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
if [ -n "${REDIS_CLUSTER_NODES:-}" ]; then
  NODES=${REDIS_CLUSTER_NODES//,/ }
  STORE=(REDIS_CLUSTER_NODES="$REDIS_CLUSTER_NODES")
  TIER='L2 (redis cluster'
else
  NODES=$REDIS_URL
  STORE=(REDIS_URL="$REDIS_URL")
  TIER='L2 (redis'
fi
for n in $NODES; do
  redis-cli -u "$n" ping >/dev/null || { echo "redis is not reachable at $n (bash .ci/run starts it)"; exit 1; }
done
# Every key of the namespace, on every node (each master holds its share on a cluster).
scan() { for n in $NODES; do redis-cli -u "$n" --scan --pattern "$1"; done | sort -u; }
NS="smoke-$$-$(date +%s)"
P1=${SMOKE_PORT1:-3918}; P2=${SMOKE_PORT2:-3919}
cargo build -q --example quickstart
env "${STORE[@]}" AUTHZ_CACHE_NAMESPACE=$NS PORT=$P1 ./target/debug/examples/quickstart > /tmp/qs-redis-1.log 2>&1 &
pid1=$!
env "${STORE[@]}" AUTHZ_CACHE_NAMESPACE=$NS PORT=$P2 ./target/debug/examples/quickstart > /tmp/qs-redis-2.log 2>&1 &
pid2=$!
cleanup() {
  kill $pid1 $pid2 2>/dev/null || true
  for n in $NODES; do redis-cli -u "$n" --scan --pattern "$NS*" | xargs -r -n 1 redis-cli -u "$n" del >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
for p in $P1 $P2; do
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$p/health" >/dev/null 2>&1 && break; sleep 0.1; done
done
sleep 0.5 # let both backplanes subscribe

fail=0
check() { if [ "$2" = "$3" ]; then echo "ok   $1 ($3)"; else echo "FAIL $1: expected $2, got $3"; fail=1; fi; }
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
json() { curl -s -H 'Authorization: Bearer alice-token' "http://127.0.0.1:$1/admin/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print($2)"; }

check "instance 1 prints its tiers" 1 "$(grep -c "$TIER" /tmp/qs-redis-1.log)"
check "bob GET on 1" 200 "$(code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$P1/documents/1")"
sleep 0.2 # write-behind
check "bob GET on 2" 200 "$(code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$P2/documents/1")"
check "instance 2 answered from L2" 1 "$(json $P2 'd["tiers"]["l2"]["hits"]')"
check "bob GET on 2 again (L1)" 200 "$(code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$P2/documents/1")"
# The README's read-your-writes walkthrough: the role change answers with a consistency token,
# and a request that carries it to the other instance is at least as fresh as the change.
put=$(curl -s -D - -o /dev/null -X PUT -H 'Authorization: Bearer alice-token' -d '{"role":"none"}' "http://127.0.0.1:$P1/admin/users/bob/role")
check "alice sets bob to none on 1" 204 "$(echo "$put" | head -1 | awk '{print $2}')"
T=$(echo "$put" | sed -n 's/^authz-consistency: //Ip' | tr -d '\r')
check "the answer carries a consistency token" 1 "$(echo "$T" | grep -cE '^v1\.p\.[0-9a-f]{16}\.[0-9]+\.[0-9a-f]{64}$' || true)"
check "bob's very next GET on 2, with the token" 403 "$(code -H 'Authorization: Bearer bob-token' -H "authz-consistency: $T" "http://127.0.0.1:$P2/documents/1")"
check "instance 2 applied it" 1 "$(json $P2 'd["tokens_applied"]')"
forged="${T%?}$([ "${T: -1}" = 0 ] && echo 1 || echo 0)" # its MAC's last digit changed
check "a forged token is a 400" 400 "$(code -H 'Authorization: Bearer bob-token' -H "authz-consistency: $forged" "http://127.0.0.1:$P2/documents/1")"
check "bob's very next GET on 2" 403 "$(code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$P2/documents/1")"
check "bob's very next GET on 1" 403 "$(code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$P1/documents/1")"
check "breaker closed on 2" closed "$(json $P2 'd["tiers"]["l2"]["breaker"]')"

keys=$(scan "$NS:*")
echo "redis-cli --scan --pattern '$NS:*' ->"; echo "$keys" | sed 's/^/    /'
check "keys were written" 1 "$([ -n "$keys" ] && echo 1 || echo 0)"
check "no principal, token or resource id in keys" 0 "$(echo "$keys" | grep -ciE 'alice|bob|carol|token|documents' || true)"

kill -TERM $pid1 $pid2
wait $pid1 || fail=1
wait $pid2 || fail=1
trap - EXIT
cleanup
if [ $fail -ne 0 ]; then cat /tmp/qs-redis-1.log /tmp/qs-redis-2.log; exit 1; fi
echo "demo with redis: all checks passed"
