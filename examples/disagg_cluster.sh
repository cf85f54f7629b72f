#!/usr/bin/env bash
# Start NUM_PROXIES `pp-engine proxy` processes sharing NUM_PREFILL prefill + NUM_DECODE decode
# instances of one model on this host (loopback tcp, CurveZMQ keys made in a temp dir), send one
# completion with curl through each proxy, print it, and stop everything. Used by
# disagg_1p1d.sh and disagg_2p2d.sh.
#
# Environment: MODEL (default: the shipped model), SEND_TYPE (PUT_ASYNC | PUT | GET),
# NUM_PROXIES (1), PROXY_PORT (8000; proxy i on PROXY_PORT + i), DISCOVERY_PORT (30001; proxy i
# on DISCOVERY_PORT + i), BASE_PORT (first instance HTTP port, 20001; KV ports from 21001),
# PYTHON (default: the repo's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PREFILL=${NUM_PREFILL:-1}
NUM_DECODE=${NUM_DECODE:-1}
NUM_PROXIES=${NUM_PROXIES:-1}
SEND_TYPE=${SEND_TYPE:-PUT_ASYNC}
PROXY_PORT=${PROXY_PORT:-8000}
DISCOVERY_PORT=${DISCOVERY_PORT:-30001}
BASE_PORT=${BASE_PORT:-20001}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MODEL=${MODEL:-$($PYTHON -c 'from models import default_model_dir; print(default_model_dir())')}

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

$PYTHON -m engine_core keys "$work/keys" > /dev/null
proxies=""  # the instances' proxy_address: every proxy's discovery socket
for j in $(seq 0 $((NUM_PROXIES - 1))); do
    setsid $PYTHON -m engine_core proxy --port $((PROXY_PORT + j)) \
        --discovery-port $((DISCOVERY_PORT + j)) --zmq-keys "$work/keys" > "$work/proxy-$j.log" 2>&1 &
    pids+=($!)
    proxies="${proxies:+$proxies,}127.0.0.1:$((DISCOVERY_PORT + j))"
done

start_instance() {  # role index
    local port=$((BASE_PORT + $2)) kv_port=$((BASE_PORT + 1000 + $2))
    local config="{\"kv_role\": \"$1\", \"kv_port\": $kv_port, \"send_type\": \"$SEND_TYPE\", \
\"proxy_address\": \"$proxies\"}"
    setsid $PYTHON -m engine_core serve "$MODEL" --port "$port" --served-model-name model \
        --kv-transfer-config "$config" --zmq-keys "$work/keys" > "$work/$1-$2.log" 2>&1 &
    pids+=($!)
}
i=0
for _ in $(seq "$NUM_PREFILL"); do start_instance kv_producer $i; i=$((i + 1)); done
for _ in $(seq "$NUM_DECODE"); do start_instance kv_consumer $i; i=$((i + 1)); done

echo "waiting for $NUM_PREFILL prefill + $NUM_DECODE decode instances to register with" \
    "$NUM_PROXIES proxy(ies)..."
for j in $(seq 0 $((NUM_PROXIES - 1))); do
    for _ in $(seq 240); do
        metrics=$(curl -sf "localhost:$((PROXY_PORT + j))/metrics" || true)
        p=$(echo "$metrics" | awk '/^ppengine:proxy_instances\{role="kv_producer"\}/ {print int($2)}')
        d=$(echo "$metrics" | awk '/^ppengine:proxy_instances\{role="kv_consumer"\}/ {print int($2)}')
        [ "${p:-0}" -ge "$NUM_PREFILL" ] && [ "${d:-0}" -ge "$NUM_DECODE" ] && break
        sleep 0.5
    done
    [ "${p:-0}" -ge "$NUM_PREFILL" ] && [ "${d:-0}" -ge "$NUM_DECODE" ] || {
        echo "instances did not register; logs:"; tail -n 20 "$work"/*.log; exit 1; }
done

for j in $(seq 0 $((NUM_PROXIES - 1))); do
    echo "via proxy $j:"
    curl -sf "localhost:$((PROXY_PORT + j))/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "model", "prompt": "def fibonacci(n):", "max_tokens": 48, "temperature": 0}'
    echo
done
