#!/usr/bin/env bash
# A short demo of sluice.
#
#   sudo bash scripts/demo.sh              # installs what it needs, then demos
#   bash scripts/demo.sh [--release]       # if Rust is installed already
#
# What it does: builds sluice (debug; --release for an optimised build,
# which takes longer), runs `sluice check` on every example config, then a
# live demo on loopback: two TCP backends behind sluice, connections and
# where they went, a backend failing over, a SIGHUP reload adding a
# backend, the admin endpoint, and a clean SIGTERM; then DNS fan-out: three
# knotd resolvers behind sluice in dns mode, queries balanced one by one,
# and a resolver failing over. It exits non-zero if any step fails.
#
# Root is used only to install packages (through scripts/test.sh
# --install-only); the build and the demo run as the user who called sudo.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO_ROOT/scripts/demo.sh"
cd "$REPO_ROOT"

PROFILE=debug
CARGO_PROFILE_ARGS=()
SLUICE=""

say() { printf '\n==== %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The home directory of user $1.
user_home() { getent passwd "$1" | cut -d: -f6; }

# Installs packages and Rust when run as root (via scripts/test.sh), then
# goes on as the calling user if the checkout is theirs.
prepare() {
    if ((EUID == 0)) && [[ "${SLUICE_SKIP_INSTALL:-}" != 1 ]]; then
        bash "$REPO_ROOT/scripts/test.sh" --install-only
        if [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]] &&
            [[ "$(stat -c %U "$REPO_ROOT")" == "$SUDO_USER" ]]; then
            local keep=(SLUICE_SKIP_INSTALL=1)
            [[ -n "${CARGO_TARGET_DIR:-}" ]] && keep+=("CARGO_TARGET_DIR=$CARGO_TARGET_DIR")
            exec runuser -u "$SUDO_USER" -- env "HOME=$(user_home "$SUDO_USER")" "${keep[@]}" \
                bash "$SCRIPT" "$@"
        fi
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        [[ -x "$HOME/.cargo/bin/cargo" ]] ||
            die "cargo not found: run 'sudo bash scripts/demo.sh' (it installs Rust), or install rustup"
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
}

build() {
    say "building sluice ($PROFILE)"
    cargo build -p sluice "${CARGO_PROFILE_ARGS[@]}"
    SLUICE="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$PROFILE/sluice"
    [[ -x "$SLUICE" ]] || die "the build did not produce $SLUICE"
    "$SLUICE" --version
}

# `sluice check` on every example config; fails if any check fails.
check_configs() {
    local configs=() config failed=0
    shopt -s nullglob
    configs=("$REPO_ROOT"/configs/*.yaml "$REPO_ROOT"/configs/*.yml)
    shopt -u nullglob
    ((${#configs[@]} > 0)) || die "no example configs in configs/"
    for config in "${configs[@]}"; do
        say "sluice check --config configs/${config##*/}"
        if ! "$SLUICE" check --config "$config"; then
            echo "^^^ check FAILED for configs/${config##*/}" >&2
            failed=$((failed + 1))
        fi
    done
    ((failed == 0)) || die "$failed of ${#configs[@]} example configs failed the check"
    say "all ${#configs[@]} example configs are valid"
}

# ---------------------------------------------------------------------------
# Live demo: real traffic through sluice on loopback.
# ---------------------------------------------------------------------------

DEMO_DIR=""
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    [[ -n "$DEMO_DIR" ]] && rm -rf "$DEMO_DIR"
}

# A free TCP or UDP port on 127.0.0.1.
free_port() { # tcp (default), udp, or both (a port free for TCP and UDP)
    python3 -c 'import socket,sys
kinds={"tcp":[socket.SOCK_STREAM],"udp":[socket.SOCK_DGRAM],"both":[socket.SOCK_STREAM,socket.SOCK_DGRAM]}[sys.argv[1]]
for _ in range(100):
    socks=[socket.socket(socket.AF_INET,kinds[0])]
    socks[0].bind(("127.0.0.1",0))
    port=socks[0].getsockname()[1]
    try:
        for kind in kinds[1:]:
            s=socket.socket(socket.AF_INET,kind); socks.append(s); s.bind(("127.0.0.1",port))
    except OSError:
        continue
    print(port); break
else:
    sys.exit("no free port")' "${1:-tcp}"
}

# Wait (up to $3 seconds) until file $1 contains text $2.
wait_for_log() {
    local file=$1 text=$2 secs=${3:-10} i
    for ((i = 0; i < secs * 20; i++)); do
        grep -q -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "--- sluice log:" >&2
    cat "$file" >&2
    die "timed out waiting for '$text' in the sluice log"
}

# Wait until something accepts TCP connections on 127.0.0.1:$1.
wait_port() {
    local i
    for ((i = 0; i < 200; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on 127.0.0.1:$1"
}

# Connect to sluice on port $1 and print the backend's greeting.
greeting() {
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    IFS= read -r -t 5 line <&3 || line="(no answer)"
    exec 3<&- 3>&-
    printf '%s\n' "$line"
}

# Open $2 connections to port $1 and tally which backend answered each.
send_connections() {
    local port=$1 n=$2 i
    for ((i = 1; i <= n; i++)); do
        greeting "$port"
    done | sort | uniq -c | sed 's/^/    /'
}

start_backend() { # name port
    python3 "$REPO_ROOT/scripts/demo_backend.py" "$1" "$2" &
    PIDS+=($!)
    wait_port "$2"
}

tcp_demo() {
    DEMO_DIR="$(mktemp -d /tmp/sluice-demo.XXXXXX)"
    trap cleanup EXIT
    local lb_port a_port b_port c_port admin_port config log
    lb_port=$(free_port) a_port=$(free_port) b_port=$(free_port) c_port=$(free_port)
    admin_port=$(free_port)
    config="$DEMO_DIR/sluice.yaml" log="$DEMO_DIR/sluice.log"

    say "TCP: two backends (alpha, beta) and sluice in front of them"
    start_backend alpha "$a_port"
    start_backend beta "$b_port"
    write_tcp_config() { # backends...
        {
            echo "workers: 2"
            echo "shutdown_timeout: 5s"
            echo "admin: { listen: \"127.0.0.1:$admin_port\" }"
            echo "services:"
            echo "  - name: web"
            echo "    protocol: tcp"
            echo "    listen: [\"127.0.0.1:$lb_port\"]"
            echo "    balance: round_robin"
            echo "    health_check: { kind: tcp, interval: 200ms, timeout: 100ms, fall: 2, rise: 2 }"
            echo "    backends:"
            local b
            for b in "$@"; do echo "      - address: \"127.0.0.1:$b\""; done
        } >"$config.tmp"
        mv "$config.tmp" "$config"
    }
    write_tcp_config "$a_port" "$b_port"
    sed 's/^/    /' "$config"
    "$SLUICE" run --config "$config" 2>"$log" &
    local lb=$!
    PIDS+=("$lb")
    wait_for_log "$log" "sluice started"
    echo "    sluice is listening on 127.0.0.1:$lb_port (pid $lb)"

    say "10 connections through sluice (round_robin): where they went"
    send_connections "$lb_port" 10

    say "beta dies: the health check marks it down, traffic moves to alpha"
    kill "${PIDS[1]}"
    wait_for_log "$log" "is DOWN"
    grep -- "is DOWN" "$log" | tail -n 1 | sed 's/^/    log: /'
    send_connections "$lb_port" 6

    say "SIGHUP: reload with a third backend, gamma, added"
    start_backend gamma "$c_port"
    write_tcp_config "$a_port" "$b_port" "$c_port"
    kill -HUP "$lb"
    wait_for_log "$log" "configuration reloaded"
    grep -- "configuration reloaded" "$log" | tail -n 1 | sed 's/^/    log: /'
    send_connections "$lb_port" 10

    say "what the admin endpoint says (GET /metrics, a few lines)"
    if exec 3<>"/dev/tcp/127.0.0.1/$admin_port"; then
        printf 'GET /metrics HTTP/1.0\r\nHost: demo\r\n\r\n' >&3
        grep -E '^sluice_(connections_total|backend_up)\{' <&3 | sed 's/^/    /' || true
        exec 3<&- 3>&-
    fi

    say "SIGTERM: sluice stops accepting, finishes, exits"
    kill -TERM "$lb"
    local status=0
    wait "$lb" || status=$?
    echo "    sluice exited with status $status"
    ((status == 0)) || die "sluice did not exit cleanly"
}

# A knotd serving zone `test.` (who.test TXT = its name) on a free
# 127.0.0.1 port (UDP and TCP), set in KNOT_PORT; its pid in KNOT_PID. A
# port taken between the check and knotd's bind (an outgoing connection's
# ephemeral port, say) gets another try on a new port.
start_knot() { # name
    local name=$1 try
    for ((try = 0; try < 5; try++)); do
        start_knot_on "$name" "$(free_port both)" && return 0
    done
    cat "$DEMO_DIR/knot-$name/knotd.log" >&2
    die "knotd $name did not start"
}

start_knot_on() { # name port
    local name=$1 port=$2 dir="$DEMO_DIR/knot-$1" knotd
    knotd=$(command -v knotd || echo /usr/sbin/knotd)
    [[ -x "$knotd" ]] || die "knotd not found (Debian package knot)"
    mkdir -p "$dir/db"
    cat >"$dir/test.zone" <<ZONE
\$ORIGIN test.
\$TTL 60
@ IN SOA ns.test. admin.test. 1 3600 600 86400 60
@ IN NS ns.test.
ns IN A 127.0.0.1
www IN A 192.0.2.1
who IN TXT "$name"
ZONE
    cat >"$dir/knot.conf" <<CONF
server:
    rundir: "$dir"
    listen: 127.0.0.1@$port
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$dir/db"
control:
    listen: "$dir/knot.sock"
log:
  - target: stderr
    any: error
zone:
  - domain: test
    storage: "$dir"
    file: "test.zone"
CONF
    "$knotd" -c "$dir/knot.conf" 2>"$dir/knotd.log" &
    local pid=$! i
    PIDS+=("$pid")
    for ((i = 0; i < 100; i++)); do
        if kdig -p "$port" @127.0.0.1 who.test TXT +short +timeout=1 +retry=0 2>/dev/null | grep -q "$name"; then
            KNOT_PORT=$port KNOT_PID=$pid
            return 0
        fi
        # Exited (its port was taken): the caller tries another port.
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    cat "$dir/knotd.log" >&2
    die "knotd $name did not answer"
}

dns_demo() {
    command -v kdig >/dev/null || die "kdig not found (Debian package knot-dnsutils)"
    local lb_port k1 k2 k3 k3_pid config="$DEMO_DIR/dns.yaml" log="$DEMO_DIR/dns.log"
    lb_port=$(free_port udp)

    say "DNS: three knotd resolvers (k1, k2, k3) and sluice in dns mode in front"
    start_knot k1 && k1=$KNOT_PORT
    start_knot k2 && k2=$KNOT_PORT
    start_knot k3 && k3=$KNOT_PORT k3_pid=$KNOT_PID
    cat >"$config" <<YAML
workers: 2
services:
  - name: dns
    protocol: udp
    listen: ["127.0.0.1:$lb_port"]
    balance: round_robin
    udp: { mode: dns, query_timeout: 2s }
    health_check: { kind: dns, query: "www.test. A", interval: 200ms, timeout: 100ms, fall: 2, rise: 2 }
    backends:
      - address: "127.0.0.1:$k1"
      - address: "127.0.0.1:$k2"
      - address: "127.0.0.1:$k3"
YAML
    sed 's/^/    /' "$config"
    "$SLUICE" run --config "$config" 2>"$log" &
    local lb=$!
    PIDS+=("$lb")
    wait_for_log "$log" "sluice started"

    say "kdig through sluice: www.test A"
    kdig -p "$lb_port" @127.0.0.1 www.test A +short +timeout=2 | sed 's/^/    /'

    say "12 queries for who.test TXT: each is balanced on its own"
    local i
    for ((i = 0; i < 12; i++)); do
        kdig -p "$lb_port" @127.0.0.1 who.test TXT +short +timeout=2 +retry=0
    done | sort | uniq -c | sed 's/^/    /'

    say "k3 stops: the dns health check marks it down, queries go to k1 and k2"
    kill "$k3_pid"
    wait_for_log "$log" "is DOWN"
    grep -- "is DOWN" "$log" | tail -n 1 | sed 's/^/    log: /'
    for ((i = 0; i < 8; i++)); do
        kdig -p "$lb_port" @127.0.0.1 who.test TXT +short +timeout=2 +retry=0
    done | sort | uniq -c | sed 's/^/    /'

    kill -TERM "$lb"
    local status=0
    wait "$lb" || status=$?
    echo "    sluice exited with status $status"
    ((status == 0)) || die "sluice did not exit cleanly"
}

main() {
    local arg
    for arg in "$@"; do
        case "$arg" in
        --release)
            PROFILE=release
            CARGO_PROFILE_ARGS=(--release)
            ;;
        -h | --help)
            sed -n '2,13p' "$SCRIPT" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument: $arg (see --help)" ;;
        esac
    done
    prepare "$@"
    build
    check_configs
    tcp_demo
    dns_demo
    say "demo finished"
}

main "$@"
