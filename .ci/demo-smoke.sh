#!/usr/bin/env bash
# Runs `cargo run --example <example>` as a new user would and walks ../shared/DEMO.md with curl.
# usage: .ci/demo-smoke.sh [example]    (default quickstart; `hyper` and `custom_tier` serve the
# same contract)
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLE=${1:-quickstart}
PORT=${SMOKE_PORT:-3917}
B="http://127.0.0.1:$PORT"
LOG=/tmp/$EXAMPLE-smoke.log
echo "demo walkthrough: examples/$EXAMPLE"
cargo build -q --example "$EXAMPLE"
# custom_tier keeps its L2 in files: a fresh directory, so that entries left by an earlier run
# (the demo's roles reset at every start, the tier's entries do not) cannot answer this one.
tier_dir=""
if [ "$EXAMPLE" = custom_tier ] && [ -z "${AUTHZ_TIER_DIR:-}" ]; then
  tier_dir=$(mktemp -d)
  export AUTHZ_TIER_DIR=$tier_dir
fi
PORT=$PORT "./target/debug/examples/$EXAMPLE" > "$LOG" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; [ -z "$tier_dir" ] || rm -rf "$tier_dir"' EXIT
for _ in $(seq 1 100); do curl -sf "$B/health" >/dev/null 2>&1 && break; sleep 0.1; done

fail=0
check() { # name expected actual
  if [ "$2" = "$3" ]; then echo "ok   $1 ($3)"; else echo "FAIL $1: expected $2, got $3"; fail=1; fi
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
stat() { curl -s -H 'Authorization: Bearer alice-token' "$B/admin/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

check "GET /health" 200 "$(code "$B/health")"
# A backplane (custom_tier's poller) is trusted from its first notice on, and its subscription
# marks every older L1 entry stale: the L1 checks below start once it is trusted.
trusted=False
for _ in $(seq 1 50); do
  trusted=$(stat 'd.get("backplane") is None or d["backplane"]["l1_trusted"]')
  [ "$trusted" = True ] && break
  sleep 0.1
done
check "backplane (if any) trusted" True "$trusted"
check "no token" 401 "$(code "$B/documents/1")"
check "no token has WWW-Authenticate" 1 "$(curl -s -D - -o /dev/null "$B/documents/1" | grep -ci '^www-authenticate: Bearer')"
check "unknown token" 401 "$(code -H 'Authorization: Bearer nope' "$B/documents/1")"
check "bob GET" 200 "$(code -H 'Authorization: Bearer bob-token' "$B/documents/1")"
check "bob DELETE" 403 "$(code -X DELETE -H 'Authorization: Bearer bob-token' "$B/documents/1")"
check "alice DELETE" 204 "$(code -X DELETE -H 'Authorization: Bearer alice-token' "$B/documents/1")"
hits0=$(stat 'd["tiers"]["l1"]["hits"]'); calls0=$(stat 'd["authorizer_calls"]')
for _ in 1 2 3 4 5; do code -H 'Authorization: Bearer bob-token' "$B/documents/1" >/dev/null; done
hits1=$(stat 'd["tiers"]["l1"]["hits"]'); calls1=$(stat 'd["authorizer_calls"]')
check "L1 hits grow on repeats" 1 "$([ "$hits1" -ge $((hits0 + 5)) ] && echo 1 || echo 0)"
check "authorizer calls flat on repeats" "$calls0" "$calls1"
check "alice sets bob to none" 204 "$(code -X PUT -H 'Authorization: Bearer alice-token' -H 'content-type: application/json' -d '{"role":"none"}' "$B/admin/users/bob/role")"
check "bob's very next GET" 403 "$(code -H 'Authorization: Bearer bob-token' "$B/documents/1")"
check "problem+json" "application/problem+json" "$(curl -s -o /dev/null -w '%{content_type}' -H 'Authorization: Bearer bob-token' "$B/documents/1")"
check "invalidate all" 204 "$(code -X POST -H 'Authorization: Bearer alice-token' -d '{"all":true}' "$B/admin/invalidate")"
check "metrics" 200 "$(code "$B/metrics")"

# The CLI against the running demo.
cargo build -q --all-features --bin authz-cache
check "authz-cache health" 0 "$(./target/debug/authz-cache health --url "$B" >/dev/null 2>&1; echo $?)"
check "authz-cache stats" 1 "$(./target/debug/authz-cache stats --url "$B" --token alice-token 2>/dev/null | grep -c authorizer_calls)"
check "authz-cache stats without a token" 1 "$(./target/debug/authz-cache stats --url "$B" >/dev/null 2>&1; echo $?)"

# Bad configuration: one line naming the variable, a non-zero exit, nothing served. Only the
# quickstart reads its configuration from the environment (CacheConfig::from_env); the other
# examples build an L1-only cache in code and read PORT alone.
bad_config="L1_CACHE_SIZE_MB=abc L1_CACHE_SIZE_MB=-5 REDIS_URL=foo AUTHZ_CACHE_MODE=staging"
[ "$EXAMPLE" = quickstart ] || bad_config="PORT=abc"
for bad in $bad_config; do
  var=${bad%%=*}
  set +e
  err=$(env PORT=$((PORT + 1)) "$bad" timeout 10 "./target/debug/examples/$EXAMPLE" 2>&1 >/dev/null)
  status=$?
  set -e
  check "$bad exits non-zero" 1 "$([ $status -ne 0 ] && [ $status -ne 124 ] && echo 1 || echo 0)"
  check "$bad: one line naming $var" 1 "$([ "$(echo "$err" | wc -l)" -eq 1 ] && echo "$err" | grep -q "$var" && echo 1 || echo 0)"
done

kill -TERM $pid
status=0; wait $pid || status=$?
check "clean exit on SIGTERM" 0 "$status"
trap - EXIT
[ -z "$tier_dir" ] || rm -rf "$tier_dir"
if [ $fail -ne 0 ]; then cat "$LOG"; exit 1; fi
echo "demo walkthrough ($EXAMPLE): all checks passed"
