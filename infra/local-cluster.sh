#!/usr/bin/env bash
# A Ray "cluster" of one head and N worker nodes on this Linux machine, to try multi-node behaviour on a laptop:
# trials placed by custom resources, results from several nodes in one MLflow store, a node joining late,
# a node dying mid-study.
#
# Every node runs `ray start --block` as the leader of its own session, recorded in a pid file, so `stop`,
# `remove-worker` and `kill-worker` end this cluster's processes and nothing else (never `ray stop`, which
# ends every Ray process of the user on the machine). Each node has its own --temp-dir (Ray 2.x allows one per
# node; on one machine each node then has its own session folder, logs and sockets), and RAY_TMPDIR points at
# the state folder, so `--address auto` finds this head and no other.
set -euo pipefail

STATE_DIR="${PCS_CLUSTER_DIR:-${TMPDIR:-/tmp}/pcs-cluster}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="ray"; fi
fi
PYTHON="${PYTHON:-$(dirname "$(command -v "$RAY" || echo /nonexistent/ray)")/python}"
[[ -x "$PYTHON" ]] || PYTHON="python3"
GRACE_S="${PCS_CLUSTER_GRACE_S:-10}"

usage() {
    cat <<EOF
usage: infra/local-cluster.sh COMMAND

  start N [options]       a head node and N worker nodes, all on this machine
      --port P              the head's GCS port (default 6390; 0 = a free port)
      --client-port P       the head's Ray Client port, for ray://127.0.0.1:P (default 10001; needs ray[client])
      --head-cpus C         CPUs the head advertises (default 1; 0 = the head runs no trials)
      --cpus C              CPUs each worker advertises (default 1)
      --gpus-per-worker G   GPUs each worker advertises (default 0); with a whole number G, worker K sees
                            its own G devices through CUDA_VISIBLE_DEVICES
      --object-store-bytes B  object store per node (default 200000000: trials pass little through it)
      --node-ip IP          the address the nodes advertise (default 127.0.0.1)
  add-worker [--cpus C] [--gpus G]
                          one more worker node (K = next number) joining the running cluster
  remove-worker K         stop worker K gracefully (it leaves the cluster; its trials are retried elsewhere)
  kill-worker K           SIGKILL every process of worker K (a node failure)
  nodes                   one line per node: name, Ray node id, state, resources
  status                  the node processes and \`ray status\`
  env                     the export line for the launcher:  eval "\$(infra/local-cluster.sh env)"
  stop                    stop every process this script started (SIGTERM, then SIGKILL after ${GRACE_S}s)

Worker K advertises the custom resources {"worker_node": 1, "worker_K": 1}: pin fine-tuning trials to
workers with  --trial-resources '{"worker_node": 0.01}'.
State, logs and pid files: \$PCS_CLUSTER_DIR (now $STATE_DIR). The Ray CLI: \$RAY (now $RAY).
Example:
  infra/local-cluster.sh start 2
  eval "\$(infra/local-cluster.sh env)"
  python -m study.launch --grid smoke --address auto --storage "\$PCS_CLUSTER_DIR/shared"
  infra/local-cluster.sh stop
EOF
}

die() { echo "error: $*" >&2; exit 1; }
alive() { kill -0 "$1" 2>/dev/null; }
setting() { cat "$STATE_DIR/$1" 2>/dev/null || die "no cluster in $STATE_DIR (no $1 file); start one first"; }
# setting() inside $(...) can only end the subshell: commands that need a cluster check first.
require_cluster() { [[ -f "$STATE_DIR/address" ]] || die "no cluster in $STATE_DIR; start one: infra/local-cluster.sh start N"; }

# Run "$@" detached in a new session (all of the node's processes can then be found by session id); pid -> $STATE_DIR/$name.pid.
spawn() {
    local name="$1"; shift
    "$PYTHON" - "$STATE_DIR/$name.log" "$@" >"$STATE_DIR/$name.pid" <<'PY'
import subprocess
import sys

log = open(sys.argv[1], "ab")
proc = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)
print(proc.pid)
PY
}

# Print the cluster's nodes (name node_id state resources), or wait until $2 of them are alive ($1 = wait).
gcs_nodes() {
    "$PYTHON" - "$(setting address)" "$@" <<'PY'
import json
import sys
import time

from ray._raylet import GcsClient  # the client `ray status` uses: no driver, no dashboard needed

address, mode = sys.argv[1], sys.argv[2]
want, limit = (int(sys.argv[3]), float(sys.argv[4])) if mode == "wait" else (0, 0.0)
deadline, error = time.time() + limit, None
while True:
    try:
        nodes = list(GcsClient(address=address).get_all_node_info(timeout=5).values())
    except Exception as exc:  # noqa: BLE001 - the GCS is not up yet
        nodes, error = [], exc
    if mode == "list":
        if not nodes:
            sys.exit(f"error: cannot reach the GCS at {address}: {error}")
        for n in nodes:
            res = dict(n.resources_total)
            name = "head" if "node:__internal_head__" in res else next(
                (f"worker-{k[7:]}" for k in res if k.startswith("worker_") and k != "worker_node"), "node")
            shown = {k: v for k, v in res.items() if not k.startswith("node:") and k != "memory"}
            print(name, n.node_id.hex(), "ALIVE" if n.state == 0 else "DEAD", json.dumps(shown, sort_keys=True))
        sys.exit(0)
    if sum(n.state == 0 for n in nodes) >= want:  # state 0 = ALIVE
        sys.exit(0)
    if time.time() > deadline:
        sys.exit(f"error: the cluster at {address} did not reach {want} alive nodes in {limit:.0f}s")
    time.sleep(1)
PY
}

# Token authentication: every process of the cluster and every client must agree. Respect RAY_AUTH_MODE if
# set; otherwise use tokens when one exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as
# `ray start` itself would, and write the choice down so that `env` hands it to the launcher.
auth_mode() {
    if [[ -n "${RAY_AUTH_MODE:-}" ]]; then echo "$RAY_AUTH_MODE"
    elif [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then echo token
    else echo disabled; fi
}

cluster_env() {
    export RAY_TMPDIR="$STATE_DIR" RAY_USAGE_STATS_ENABLED=0
    RAY_AUTH_MODE="$(setting auth_mode)"; export RAY_AUTH_MODE
}

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

add_worker() {  # add_worker CPUS GPUS
    local cpus="$1" gpus="$2" k
    k="$(cat "$STATE_DIR/workers_started" 2>/dev/null || echo 0)"; k=$((k + 1))  # never reuse a worker's name
    echo "$k" >"$STATE_DIR/workers_started"
    local env_gpu=()
    if [[ "$gpus" =~ ^[0-9]+$ ]] && (( gpus > 0 )); then
        local first=$(( (k - 1) * gpus )) devs="" d
        for ((d = first; d < first + gpus; d++)); do devs+="${devs:+,}$d"; done
        env_gpu=(env "CUDA_VISIBLE_DEVICES=$devs")
    fi
    spawn "worker-$k" ${env_gpu[@]+"${env_gpu[@]}"} "$RAY" start --block --address "$(setting address)" \
        --node-ip-address "$(setting node_ip)" --num-cpus "$cpus" --num-gpus "$gpus" \
        --object-store-memory "$(setting object_store_bytes)" \
        --resources "{\"worker_node\": 1, \"worker_$k\": 1}" --disable-usage-stats --temp-dir "$STATE_DIR/worker-$k"
    echo "worker-$k"
}

cmd_start() {
    local n="${1:-}"; shift || true
    [[ "$n" =~ ^[0-9]+$ ]] || { usage >&2; exit 2; }
    local port=6390 client_port=10001 cpus=1 head_cpus=1 gpus=0 store=200000000 ip=127.0.0.1
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --port) port="$2"; shift 2 ;;
            --client-port) client_port="$2"; shift 2 ;;
            --cpus) cpus="$2"; shift 2 ;;
            --head-cpus) head_cpus="$2"; shift 2 ;;
            --gpus-per-worker) gpus="$2"; shift 2 ;;
            --object-store-bytes) store="$2"; shift 2 ;;
            --node-ip) ip="$2"; shift 2 ;;
            *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        esac
    done
    if [[ -f "$STATE_DIR/head.pid" ]] && alive "$(cat "$STATE_DIR/head.pid")"; then
        die "a cluster is already running from $STATE_DIR; run: infra/local-cluster.sh stop"
    fi
    command -v "$RAY" >/dev/null || die "no Ray CLI at '$RAY'; install the project (make setup) or set RAY=/path/to/ray"
    mkdir -p "$STATE_DIR"
    rm -f "$STATE_DIR"/*.pid "$STATE_DIR"/*.log "$STATE_DIR/workers_started"
    [[ "$port" == 0 ]] && port="$(free_port)"
    [[ "$client_port" == 0 ]] && client_port="$(free_port)"
    auth_mode >"$STATE_DIR/auth_mode"
    echo "$ip:$port" >"$STATE_DIR/address"
    echo "$ip" >"$STATE_DIR/node_ip"
    echo "$store" >"$STATE_DIR/object_store_bytes"
    local client=()  # the Ray Client server (ray://) needs `ray[client]` (grpcio)
    if "$PYTHON" -c 'import grpc' 2>/dev/null; then
        client=(--ray-client-server-port "$client_port")
        echo "ray://$ip:$client_port" >"$STATE_DIR/client_address"
    else
        echo "no Ray Client server (ray://): install ray[client] for it" >"$STATE_DIR/client_address"
    fi
    cluster_env
    # the head's session lives in $STATE_DIR/ray: with RAY_TMPDIR=$STATE_DIR, `--address auto` reads it there
    spawn head "$RAY" start --head --block --port "$port" ${client[@]+"${client[@]}"} \
        --node-ip-address "$ip" --num-cpus "$head_cpus" --num-gpus 0 --object-store-memory "$store" \
        --include-dashboard=false --disable-usage-stats --temp-dir "$STATE_DIR/ray"
    gcs_nodes wait 1 120 || die "the head did not start; see $STATE_DIR/head.log"
    local k
    for ((k = 1; k <= n; k++)); do add_worker "$cpus" "$gpus" >/dev/null; done
    gcs_nodes wait $((n + 1)) 120 || die "not every worker joined; see $STATE_DIR/worker-*.log"
    echo "cluster up: head + $n worker(s) at $ip:$port (state in $STATE_DIR); Ray Client: $(setting client_address)"
    echo "use it:  eval \"\$(infra/local-cluster.sh env)\"; python -m study.launch --grid smoke --address auto"
}

cmd_add_worker() {
    local cpus=1 gpus=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --cpus) cpus="$2"; shift 2 ;;
            --gpus) gpus="$2"; shift 2 ;;
            *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        esac
    done
    require_cluster
    [[ -f "$STATE_DIR/head.pid" ]] && alive "$(cat "$STATE_DIR/head.pid")" || die "no running head in $STATE_DIR"
    cluster_env
    local alive_before name
    alive_before="$(gcs_nodes list | grep -c ' ALIVE ' || true)"
    name="$(add_worker "$cpus" "$gpus")"
    gcs_nodes wait $((alive_before + 1)) 120 || die "$name did not join; see $STATE_DIR/$name.log"
    echo "$name joined"
}

cmd_env() {
    require_cluster
    echo "export RAY_TMPDIR='$STATE_DIR' RAY_ADDRESS='$(setting address)' RAY_AUTH_MODE='$(setting auth_mode)'" \
         "PCS_CLUSTER_DIR='$STATE_DIR'"
}

cmd_nodes() { require_cluster; cluster_env; gcs_nodes list; }

cmd_status() {
    local f any=0 pid
    for f in "$STATE_DIR"/*.pid; do
        [[ -e "$f" ]] || continue
        any=1
        pid="$(cat "$f")"
        echo "$(basename "$f" .pid): session $pid, $(session_pids "$pid" | wc -l | tr -d ' ') process(es)"
    done
    (( any )) && [[ -f "$STATE_DIR/address" ]] || { echo "no cluster in $STATE_DIR"; return 0; }
    cluster_env
    "$RAY" status --address "$(setting address)" || true
}

# The processes of the session (node) whose leader is $1. Ray puts each worker process in its own process group
# but they stay in the node's session, so a session is exactly "this node's processes".
session_pids() { ps -e -o pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }

# SIGTERM the session recorded in $1.pid, wait up to GRACE_S, then SIGKILL what is left ($2 = KILL: at once).
stop_node() {
    local name="$1" signal="${2:-TERM}" sid t pids
    [[ -f "$STATE_DIR/$name.pid" ]] || return 0
    sid="$(cat "$STATE_DIR/$name.pid")"
    if [[ "$signal" == TERM ]]; then
        pids="$(session_pids "$sid")"
        [[ -z "$pids" ]] || kill -TERM $pids 2>/dev/null || true
        for ((t = 0; t < GRACE_S * 5; t++)); do
            [[ -z "$(session_pids "$sid")" ]] && break
            sleep 0.2
        done
    fi
    pids="$(session_pids "$sid")"
    [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
    rm -f "$STATE_DIR/$name.pid"
}

cmd_remove_worker() {
    [[ -f "$STATE_DIR/worker-${1:-}.pid" ]] || die "no worker-${1:-} in $STATE_DIR"
    stop_node "worker-$1"
    echo "worker-$1 stopped"
}

cmd_kill_worker() {
    [[ -f "$STATE_DIR/worker-${1:-}.pid" ]] || die "no worker-${1:-} in $STATE_DIR"
    stop_node "worker-$1" KILL
    echo "worker-$1 killed"
}

cmd_stop() {
    local f
    for f in "$STATE_DIR"/worker-*.pid; do [[ -e "$f" ]] && stop_node "$(basename "$f" .pid)"; done
    stop_node head
    rm -f "$STATE_DIR/address" "$STATE_DIR/client_address"
    echo "cluster in $STATE_DIR stopped"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    add-worker) shift; cmd_add_worker "$@" ;;
    remove-worker) shift; cmd_remove_worker "$@" ;;
    kill-worker) shift; cmd_kill_worker "$@" ;;
    nodes) cmd_nodes ;;
    status) cmd_status ;;
    env) cmd_env ;;
    stop) cmd_stop ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
