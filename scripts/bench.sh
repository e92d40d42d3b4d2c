#!/usr/bin/env bash
# Benchmark sluice against HAProxy, NGINX stream and dnsdist on loopback.
#
#   scripts/bench.sh [--quick] [--runs N] [--workloads tcp_bulk,tcp_rr,...]
#                    [--lbs direct,sluice,haproxy,nginx,dnsdist] [--profile] ...
#
# Installs the peers and load tools from Debian packages when missing (needs
# root), builds sluice and the sluice-bench helper in release, then runs
# bench/harness/bench.py with the arguments given. `--help` lists them all.
# Results: a table on stdout, JSON and Markdown in bench/results/, the chart
# in docs/benchmarks.png. See docs/benchmarks.md.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec python3 bench/harness/bench.py --help
    fi
done

# Debian packages: command -> package.
declare -A PKG=(
    [haproxy]=haproxy
    [nginx]=nginx
    [dnsdist]=dnsdist
    [iperf3]=iperf3
    [wrk]=wrk
    [dnsperf]=dnsperf
    [knotd]=knot
    [gnuplot]=gnuplot-nox
    [perf]=linux-perf
)
missing=()
for cmd in "${!PKG[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
if [[ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ]]; then
    missing+=(libnginx-mod-stream)
fi
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bench.sh: missing packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "bench.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Only the binaries are wanted: the harness starts its own instances, so
    # keep the packages' services from starting (and competing for CPU).
    policy=/usr/sbin/policy-rc.d
    ours=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours=1
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [[ -n $ours ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
fi

echo "bench.sh: building sluice and sluice-bench (release) in $CARGO_TARGET_DIR" >&2
cargo build --release -q -p sluice -p sluice-bench

SLUICE_BENCH_ARGS="$(printf '%q ' "$@")"
export SLUICE_BENCH_ARGS
exec python3 bench/harness/bench.py \
    --sluice "$CARGO_TARGET_DIR/release/sluice" \
    --bench-bin "$CARGO_TARGET_DIR/release/sluice-bench" "$@"
