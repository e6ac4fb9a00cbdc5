#!/usr/bin/env bash
# The Redis walkthrough (.ci/demo-smoke-redis.sh) on a Redis Cluster of this script's own: six
# redis-server processes (3 masters + 3 replicas) on free loopback ports, joined with
# `redis-cli --cluster create`, stopped by their pids afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/authz-smoke-cluster.XXXXXX)
pids=()
# The servers are waited for before their directories go: a node still saving its nodes.conf
# as it exits once made `rm -rf` fail ("Directory not empty"), and the script with it.
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  rm -rf "$dir" 2>/dev/null || { sleep 0.5; rm -rf "$dir" 2>/dev/null; } || true
}
trap cleanup EXIT
free() { ! (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports=()
base=$(( 21000 + RANDOM % 8000 ))
for p in $(seq "$base" $(( base + 200 ))); do
  if free "$p" && free $(( p + 10000 )); then ports+=("$p"); fi
  [ "${#ports[@]}" -eq 6 ] && break
done
addrs=()
for p in "${ports[@]}"; do
  mkdir -p "$dir/$p"
  redis-server --port "$p" --bind 127.0.0.1 --dir "$dir/$p" --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout 1000 \
    --logfile "$dir/$p/log" &
  pids+=($!)
  addrs+=("127.0.0.1:$p")
done
for p in "${ports[@]}"; do
  for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.05; done
done
timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 1 200); do
  ok=1
  for p in "${ports[@]}"; do
    redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0
    # Replicas in sync: invalidations wait for one (WAIT).
    redis-cli -p "$p" info replication | grep -q -e 'role:master' -e 'master_link_status:up' || ok=0
  done
  [ "$ok" = 1 ] && break
  sleep 0.1
done
nodes=$(printf 'redis://%s,' "${addrs[@]}"); nodes=${nodes%,}
REDIS_CLUSTER_NODES=$nodes bash .ci/demo-smoke-redis.sh
# The load generator's cluster configuration: every request answered as the roles say, L2 read
# on the cluster, and its namespace deleted from every master afterwards (given one seed only).
out=$(cargo run -q --example loadtest -- --configs l1+l2-cluster --redis-cluster-nodes "redis://${addrs[3]}" \
  --duration 2 --rate 200 --population 2000 2>&1) || { echo "$out"; echo "FAIL loadtest on the cluster"; exit 1; }
echo "$out" | grep -E '^success|^L2 hits|redis cluster: deleted'
echo "$out" | grep -qE '^success \(as the roles say\) +100\.00%' || { echo "FAIL loadtest: not every request answered as the roles say"; exit 1; }
echo "$out" | grep -qE '^L2 hits / misses / errors +[0-9]+ / [1-9][0-9]* / 0$' || { echo "FAIL loadtest: L2 on the cluster not read, or errors"; exit 1; }
echo "$out" | grep -qE 'redis cluster: deleted [1-9][0-9]* keys' || { echo "FAIL loadtest: namespace not deleted"; exit 1; }
left=0
for a in "${addrs[@]}"; do
  # Masters only: a replica may not have applied the last deletions yet.
  [ "$(redis-cli -h "${a%:*}" -p "${a#*:}" role | head -1)" = master ] || continue
  left=$(( left + $(redis-cli -h "${a%:*}" -p "${a#*:}" dbsize) ))
done
[ "$left" = 0 ] || { echo "FAIL loadtest: $left keys left on the cluster"; exit 1; }
echo "loadtest on the cluster: ok"
