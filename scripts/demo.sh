#!/usr/bin/env bash
# A short demo of sluice.
#
#   sudo bash scripts/demo.sh              # installs what it needs, then demos
#   bash scripts/demo.sh [--release]       # if Rust is installed already
#
# What it does today: builds sluice (debug; --release for an optimised
# build, which takes longer) and runs `sluice check` on every example config
# in configs/, showing each summary. It exits non-zero if any check fails.
# The live part (real traffic through sluice on loopback) is marked below.
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
# Live demo: to be written once the data plane runs. It will start backends
# on loopback (TCP echo servers, knotd resolvers), run sluice in front of
# them, send TCP connections and DNS queries (kdig, dnsperf) through it, show
# how the traffic spreads over the backends, reload with SIGHUP, and stop it
# with SIGTERM. Until then this script shows only real `sluice check` output.
# ---------------------------------------------------------------------------

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
}

main "$@"
