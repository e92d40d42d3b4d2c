#!/usr/bin/env bash
# What the per-core metric counters cost on the TCP hot path.
#
# Builds two release binaries of sluice: the normal one, and one with
# `--features metrics-off` (sluice-metrics `counters-off`: PerCoreCounter::add,
# PerCoreGauge::add and PerCoreHistogram::observe_nanos compile to nothing).
# Then measures the TCP request/response rate through each: one worker pinned
# to CPU $SLUICE_CPU, the load tool (bench/src/bin/metrics_overhead.rs: the
# echo backend and the clients in one epoll thread) pinned to CPU
# $CLIENT_CPU, $CONNECTIONS connections each doing $SIZE-byte ping-pong for
# $DURATION after $WARMUP. $ROUNDS rounds, the two binaries alternating (and
# the order flipping each round); the medians are compared. Two figures per
# run: the wall-clock rate (round trips per second), and the rate per
# CPU-second that sluice's threads used in the window (from
# /proc/PID/task/*/schedstat), i.e. the cost of a round trip; on a machine
# shared with other work the second is the one to trust, and the verdict
# compares its medians. Each round's on/off ratio is printed too, as a
# measure of the run-to-run noise.
#
# INSTRUCTIONS=1 adds a measurement that other tenants cannot disturb: under
# valgrind's cachegrind, with one connection (every round trip the same path
# through the runtime), the user-space instructions per round trip of each
# binary, from two runs of different lengths (the difference cancels
# start-up and shutdown). Needs valgrind.
#
# Results are in docs/benchmarks.md, "Metrics overhead".
#
# usage: bench/metrics_overhead.sh [--no-build]
#   env: ROUNDS=5 DURATION=5s WARMUP=1s CONNECTIONS=32 SIZE=64
#        SLUICE_CPU=1 CLIENT_CPU=0 LISTEN_PORT=18480 ECHO_PORT=18481
#        ADMIN_PORT=18482 CARGO_TARGET_DIR=target
# Exits 1 when the median rate per sluice CPU-second with metrics is more
# than $MAX_COST_PCT (3) percent below the median rate without.
set -euo pipefail
shopt -s inherit_errexit

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
CONNECTIONS=${CONNECTIONS:-32}
SIZE=${SIZE:-64}
SLUICE_CPU=${SLUICE_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
LISTEN_PORT=${LISTEN_PORT:-18480}
ECHO_PORT=${ECHO_PORT:-18481}
ADMIN_PORT=${ADMIN_PORT:-18482}
MAX_COST_PCT=${MAX_COST_PCT:-3}

cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
OUT="$TARGET/metrics-overhead"
mkdir -p "$OUT"

if [[ "${1:-}" != "--no-build" ]]; then
    cargo build --release -p sluice
    cp "$TARGET/release/sluice" "$OUT/sluice-metrics-on"
    cargo build --release -p sluice --features metrics-off
    cp "$TARGET/release/sluice" "$OUT/sluice-metrics-off"
    cargo build --release -p sluice-bench --bin metrics_overhead
    cp "$TARGET/release/metrics_overhead" "$OUT/metrics_overhead"
fi
for f in sluice-metrics-on sluice-metrics-off metrics_overhead; do
    [[ -x "$OUT/$f" ]] || { echo "missing $OUT/$f: run without --no-build" >&2; exit 2; }
done

CONFIG="$OUT/sluice.yaml"
cat >"$CONFIG" <<EOF
workers: 1
admin: { listen: "127.0.0.1:$ADMIN_PORT" }
services:
  - name: echo
    protocol: tcp
    listen: ["127.0.0.1:$LISTEN_PORT"]
    balance: round_robin
    health_check: { kind: none }
    backends:
      - address: "127.0.0.1:$ECHO_PORT"
EOF

SLUICE_PID=
cleanup() {
    if [[ -n "$SLUICE_PID" ]]; then
        kill -TERM "$SLUICE_PID" 2>/dev/null || true
        wait "$SLUICE_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# run_one VARIANT: one run; sets RATE (round trips per second) and
# CPU_RATE (round trips per CPU-second of sluice)
run_one() {
    local variant=$1
    RUST_LOG=warn taskset -c "$SLUICE_CPU" "$OUT/sluice-$variant" run --config "$CONFIG" \
        2>>"$OUT/sluice-$variant.log" &
    SLUICE_PID=$!
    local result
    result=$(taskset -c "$CLIENT_CPU" "$OUT/metrics_overhead" \
        --echo "127.0.0.1:$ECHO_PORT" --target "127.0.0.1:$LISTEN_PORT" \
        --connections "$CONNECTIONS" --size "$SIZE" \
        --warmup "$WARMUP" --duration "$DURATION" --watch-pid "$SLUICE_PID")
    # The counters really are on (or off): bytes relayed to the backend.
    local counted
    counted=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^sluice_bytes_total\{.*direction="to_backend"/ {print $2}')
    kill -TERM "$SLUICE_PID"
    wait "$SLUICE_PID" || true
    SLUICE_PID=
    echo "$variant $result bytes_counted=$counted" >>"$OUT/runs.txt"
    if [[ "$variant" == metrics-on && "${counted:-0}" == 0 ]]; then
        echo "the metrics-on binary counted no bytes" >&2; exit 1
    fi
    if [[ "$variant" == metrics-off && "${counted:-0}" != 0 ]]; then
        echo "the metrics-off binary counted bytes: the feature did not apply" >&2; exit 1
    fi
    RATE=$(sed -E 's/.*"roundtrips_per_sec":([0-9.]+).*/\1/' <<<"$result")
    CPU_RATE=$(sed -E 's/.*"roundtrips_per_sluice_cpu_sec":([0-9.]+).*/\1/' <<<"$result")
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

: >"$OUT/runs.txt"
on=()
off=()
cpu_on=()
cpu_off=()
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2)); then order=(metrics-on metrics-off); else order=(metrics-off metrics-on); fi
    for variant in "${order[@]}"; do
        run_one "$variant"
        echo "round $round $variant: $RATE round trips/s, $CPU_RATE per sluice CPU-second ($(cut -d' ' -f1 /proc/loadavg) load)" >&2
        if [[ "$variant" == metrics-on ]]; then
            on+=("$RATE")
            cpu_on+=("$CPU_RATE")
        else
            off+=("$RATE")
            cpu_off+=("$CPU_RATE")
        fi
    done
done

med_on=$(printf '%s\n' "${on[@]}" | median)
med_off=$(printf '%s\n' "${off[@]}" | median)
cpu_med_on=$(printf '%s\n' "${cpu_on[@]}" | median)
cpu_med_off=$(printf '%s\n' "${cpu_off[@]}" | median)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a / b}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b - a) / b * 100}'; }
# Per round: on/off, wall clock and per CPU-second.
paired=()
cpu_paired=()
for ((i = 0; i < ROUNDS; i++)); do
    paired+=("$(ratio "${on[$i]}" "${off[$i]}")")
    cpu_paired+=("$(ratio "${cpu_on[$i]}" "${cpu_off[$i]}")")
done
med_paired=$(printf '%s\n' "${paired[@]}" | median)
cpu_med_paired=$(printf '%s\n' "${cpu_paired[@]}" | median)
cost=$(pct "$cpu_med_on" "$cpu_med_off")
cat <<EOF
date: $(date -u +%Y-%m-%dT%H:%MZ)  host: $(nproc) CPUs, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)
workload: $CONNECTIONS connections x $SIZE-byte ping-pong, $DURATION per run after $WARMUP warm-up, $ROUNDS rounds alternating
round trips per second (wall clock):
  metrics on : ${on[*]}  -> median $med_on
  metrics off: ${off[*]}  -> median $med_off
  on/off of the medians $(ratio "$med_on" "$med_off") (difference $(pct "$med_on" "$med_off") %)
  on/off per round: ${paired[*]}  -> median $med_paired
round trips per CPU-second of sluice:
  metrics on : ${cpu_on[*]}  -> median $cpu_med_on
  metrics off: ${cpu_off[*]}  -> median $cpu_med_off
  on/off of the medians $(ratio "$cpu_med_on" "$cpu_med_off") (difference $(pct "$cpu_med_on" "$cpu_med_off") %)
  on/off per round: ${cpu_paired[*]}  -> median $cpu_med_paired
cost of the counters (medians per CPU-second): $cost %
EOF

# cachegrind VARIANT DURATION: sets IR (user-space instructions of the whole
# run) and RT (round trips), one connection.
cachegrind() {
    local variant=$1 duration=$2 log="$OUT/cachegrind-$1-$2.log"
    RUST_LOG=info valgrind --tool=cachegrind --cache-sim=no \
        --cachegrind-out-file="$OUT/cachegrind-$variant-$duration.out" \
        "$OUT/sluice-$variant" run --config "$CONFIG" >"$log" 2>&1 &
    SLUICE_PID=$!
    for _ in $(seq 1 300); do grep -q "sluice started" "$log" && break; sleep 0.1; done
    local result
    result=$("$OUT/metrics_overhead" --echo "127.0.0.1:$ECHO_PORT" \
        --target "127.0.0.1:$LISTEN_PORT" --connections 1 --size "$SIZE" \
        --warmup 0s --duration "$duration")
    kill -TERM "$SLUICE_PID"
    wait "$SLUICE_PID" || true
    SLUICE_PID=
    RT=$(sed -E 's/.*"roundtrips_total":([0-9]+).*/\1/' <<<"$result")
    IR=$(awk '/I *refs/ {gsub(",", "", $4); print $4}' "$log")
}

if [[ "${INSTRUCTIONS:-0}" == 1 ]]; then
    per_rt=()
    for variant in metrics-on metrics-off; do
        cachegrind "$variant" 1s
        ir1=$IR rt1=$RT
        cachegrind "$variant" 4s
        per_rt+=("$(awk -v a="$ir1" -v b="$IR" -v x="$rt1" -v y="$RT" \
            'BEGIN {printf "%.0f", (b - a) / (y - x)}')")
        echo "$variant: $ir1 instructions / $rt1 round trips, $IR / $RT" >&2
    done
    extra=$(awk -v a="${per_rt[0]}" -v b="${per_rt[1]}" 'BEGIN {printf "%+.0f (%+.2f %%)", a - b, (a - b) / b * 100}')
    cat <<EOF
user-space instructions per round trip (cachegrind, 1 connection):
  metrics on : ${per_rt[0]}
  metrics off: ${per_rt[1]}
  with metrics: $extra
EOF
fi
if awk -v c="$cost" -v m="$MAX_COST_PCT" 'BEGIN {exit !(c > m)}'; then
    echo "the counters cost more than $MAX_COST_PCT %" >&2
    exit 1
fi
