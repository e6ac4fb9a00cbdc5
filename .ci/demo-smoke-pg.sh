#!/usr/bin/env bash
# Two quickstart instances with DATABASE_URL (L3 + the Postgres change feed and backplane, no
# Redis): the demo migrates its own schema and keeps its roles in the RBAC tables; an UPDATE of
# user_roles made in psql (not through the app) makes both instances deny bob on their next
# request; a restarted instance answers a known key from L3, not from its authorizer.
set -euo pipefail
cd "$(dirname "$0")/.."
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
psql "$DATABASE_URL" -qtAc 'SELECT 1' >/dev/null || { echo "postgres is not reachable at $DATABASE_URL (bash .ci/run starts it)"; exit 1; }
SCHEMA="smoke_$$_$(date +%s)"
P1=${SMOKE_PORT1:-3928}; P2=${SMOKE_PORT2:-3929}
cargo build -q --example quickstart
start() { env -u REDIS_URL DATABASE_URL=$DATABASE_URL DATABASE_SCHEMA=$SCHEMA PORT=$1 ./target/debug/examples/quickstart > "$2" 2>&1 & }
start $P1 /tmp/qs-pg-1.log; pid1=$!
start $P2 /tmp/qs-pg-2.log; pid2=$!
cleanup() {
  kill $pid1 $pid2 2>/dev/null || true
  psql "$DATABASE_URL" -qtAc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true
}
trap cleanup EXIT
wait_up() { for _ in $(seq 1 150); do curl -sf "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
wait_up $P1; wait_up $P2
sleep 0.5 # let both listeners subscribe

fail=0
check() { if [ "$2" = "$3" ]; then echo "ok   $1 ($3)"; else echo "FAIL $1: expected $2, got $3"; fail=1; fi; }
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
json() { curl -s -H 'Authorization: Bearer alice-token' "http://127.0.0.1:$1/admin/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print($2)"; }
bob() { code -H 'Authorization: Bearer bob-token' "http://127.0.0.1:$1/documents/1"; }

check "instance 1 prints L3" 1 "$(grep -c 'L3 (postgres' /tmp/qs-pg-1.log)"
check "migrations applied" 4 "$(psql "$DATABASE_URL" -qtAc "SELECT count(*) FROM $SCHEMA.authz_cache_migrations")"
check "bob GET on 1" 200 "$(bob $P1)"
check "bob GET on 2" 200 "$(bob $P2)"
check "bob GET on 1 again (L1)" 200 "$(bob $P1)"
check "alice may manage" 200 "$(code -H 'Authorization: Bearer alice-token' "http://127.0.0.1:$P1/admin/stats")"

# The change made outside the app, as an administrator would in psql.
psql "$DATABASE_URL" -qtAc "UPDATE $SCHEMA.user_roles SET role_id = 'none' WHERE user_id = 'bob'" >/dev/null
sleep 0.2
check "bob's next GET on 1 after psql UPDATE" 403 "$(bob $P1)"
check "bob's next GET on 2 after psql UPDATE" 403 "$(bob $P2)"
# Whichever instance drained the recorded change applied it, once, for both.
applied=$(( $(json $P1 'd["change_feed_invalidations"]') + $(json $P2 'd["change_feed_invalidations"]') ))
check "the change feed applied the change" 1 "$([ "$applied" -ge 1 ] && echo 1 || echo 0)"
check "role change through the app (tables)" 204 "$(code -X PUT -H 'Authorization: Bearer alice-token' -d '{"role":"editor"}' "http://127.0.0.1:$P1/admin/users/bob/role")"
check "bob's very next GET on 2" 200 "$(bob $P2)"
check "the table holds the role" editor "$(psql "$DATABASE_URL" -qtAc "SELECT role_id FROM $SCHEMA.user_roles WHERE user_id = 'bob'")"
check "no principal in L3 rows" 0 "$(psql "$DATABASE_URL" -qtAc "SELECT count(*) FROM $SCHEMA.authz_cache_entries WHERE position('bob'::bytea IN value || subject || key) > 0")"

# Restart instance 2: its first request for a known key is an L3 hit, not an authorizer call.
sleep 0.3 # write-behind
kill -TERM $pid2; wait $pid2 || fail=1
start $P2 /tmp/qs-pg-2b.log; pid2=$!
wait_up $P2
check "bob GET on restarted 2" 200 "$(bob $P2)"
# (warmed at start-up from L3's most-hit rows, or read from L3 on the miss: either way an L3 hit)
check "restarted 2 answered from L3, no authorizer call" 1 "$(json $P2 'int(d["authorizer_calls"] == 0 and d["tiers"]["l3"]["hits"] >= 1)')"

kill -TERM $pid1 $pid2
wait $pid1 || fail=1
wait $pid2 || fail=1
trap - EXIT
cleanup
if [ $fail -ne 0 ]; then cat /tmp/qs-pg-1.log /tmp/qs-pg-2.log /tmp/qs-pg-2b.log 2>/dev/null; exit 1; fi
echo "demo with postgres: all checks passed"
