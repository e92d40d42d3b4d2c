#!/usr/bin/env bash
# Run every sluice test: formatting, lints, the build, unit and end-to-end
# tests. Works from any directory, on a fresh Debian machine and in CI.
#
#   sudo bash scripts/test.sh            # installs what it needs, then tests
#   bash scripts/test.sh                 # same, if everything is installed
#   bash scripts/test.sh --install-only  # just the installing part
#
# Root is needed only for apt-get: run through sudo, it installs the missing
# Debian packages as root, then runs everything else (Rust toolchain, cargo)
# as the user who called sudo, so the build output is not owned by root.
#
# Environment:
#   SLUICE_SKIP_INSTALL=1  do not install anything (no apt-get, no rustup)
#   CARGO_TARGET_DIR       where cargo builds (default: <repo>/target)
#   CI=true                nothing here reads stdin; apt-get runs unattended
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO_ROOT/scripts/test.sh"
cd "$REPO_ROOT"

# Daemons and admin tools live in sbin, which a normal user's PATH lacks.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# --- what the tests need ----------------------------------------------------
# Debian packages as "command:package": a package is installed only when its
# command is missing. Extend these lists when a test needs a new tool.

# To build Rust code (a C linker) and to fetch rustup when Rust is missing.
BUILD_PACKAGES=(
    cc:build-essential
    curl:curl
    update-ca-certificates:ca-certificates
)
# Tools the tests drive.
TEST_PACKAGES=(
    promtool:prometheus        # `promtool check metrics` on /metrics
    knotd:knot                 # a real DNS server as a UDP backend
    kdig:knot-dnsutils         # DNS client
    dnsperf:dnsperf            # DNS load
    ip:iproute2                # ip, ss: sockets and addresses
    ss:iproute2
    python3:python3            # seccomp wrapper (tests/fixtures), demo backends
    prlimit:util-linux         # squeeze sluice's fd limit (EMFILE test)
)

# The oldest Rust this workspace builds with (Cargo.toml rust-version).
RUST_MIN_VERSION="$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)"

# --- helpers ----------------------------------------------------------------
STEP_START=$SECONDS
banner() {
    printf '\n==== %s\n' "$*"
    STEP_START=$SECONDS
}
done_step() { printf '==== ok (%ss)\n' "$((SECONDS - STEP_START))"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The packages (deduplicated) whose command is missing, from "cmd:pkg" pairs.
missing_packages() {
    local pair cmd pkg
    local -A seen=()
    for pair in "$@"; do
        cmd="${pair%%:*}"
        pkg="${pair#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [[ -z "${seen[$pkg]:-}" ]]; then
            seen[$pkg]=1
            printf '%s\n' "$pkg"
        fi
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages "${BUILD_PACKAGES[@]}" "${TEST_PACKAGES[@]}")
    if ((${#missing[@]} == 0)); then
        echo "all tools present"
        return
    fi
    if ((EUID != 0)); then
        echo "the tests need these Debian packages: ${missing[*]}" >&2
        echo "install them with" >&2
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
        echo "or run this script with sudo (root is used only for apt-get)." >&2
        die "missing packages, and not root"
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install ${missing[*]} by hand"
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Do not start the packages' daemons (a Prometheus server, knotd on
    # port 53): the tests run their own instances on loopback.
    local policy=/usr/sbin/policy-rc.d
    local added_policy=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update </dev/null
    apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
    if [[ -n "$added_policy" ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
}

# Puts cargo on PATH (rustup's default place if needed); false if absent.
find_cargo() {
    command -v cargo >/dev/null 2>&1 && return 0
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
        return 0
    fi
    return 1
}

# version_ge A B: true if version A >= version B (dotted numbers).
version_ge() {
    [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" == "$2" ]]
}

ensure_rust() {
    if ! find_cargo; then
        if [[ "${SLUICE_SKIP_INSTALL:-}" == 1 ]]; then
            die "cargo not found (install Rust with rustup: https://rustup.rs)"
        fi
        # Debian's rustc is older than this workspace needs: use rustup.
        command -v curl >/dev/null 2>&1 || die "curl is needed to install Rust (apt-get install curl)"
        echo "installing Rust (stable, minimal profile) with rustup into $HOME/.cargo"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
            sh -s -- -y --profile minimal --component rustfmt,clippy
        find_cargo || die "rustup finished but cargo is not in $HOME/.cargo/bin"
    fi
    local have
    have="$(rustc --version | awk '{print $2}')"
    if [[ -n "$RUST_MIN_VERSION" ]] && ! version_ge "$have" "$RUST_MIN_VERSION"; then
        die "rustc $have is older than $RUST_MIN_VERSION (try: rustup update stable)"
    fi
    local component
    for component in rustfmt clippy; do
        if command -v rustup >/dev/null 2>&1; then
            if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
                [[ "${SLUICE_SKIP_INSTALL:-}" == 1 ]] && die "rust component $component is missing"
                rustup component add "$component" </dev/null
            fi
        fi
    done
    cargo fmt --version >/dev/null 2>&1 || die "cargo fmt is not available (rustup component add rustfmt)"
    cargo clippy --version >/dev/null 2>&1 || die "cargo clippy is not available (rustup component add clippy)"
    echo "$(rustc --version), $(cargo --version)"
}

# The home directory of user $1.
user_home() { getent passwd "$1" | cut -d: -f6; }

# Under sudo, go on as the calling user if the checkout is theirs.
drop_privileges_if_sudo() {
    if ((EUID == 0)) && [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]] &&
        [[ "$(stat -c %U "$REPO_ROOT")" == "$SUDO_USER" ]]; then
        echo "continuing as $SUDO_USER (root was needed only for apt-get)"
        local keep=(SLUICE_PACKAGES_DONE=1 "CI=${CI:-}")
        [[ -n "${CARGO_TARGET_DIR:-}" ]] && keep+=("CARGO_TARGET_DIR=$CARGO_TARGET_DIR")
        exec runuser -u "$SUDO_USER" -- env "HOME=$(user_home "$SUDO_USER")" "${keep[@]}" \
            bash "$SCRIPT" "$@"
    fi
}

# --- main -------------------------------------------------------------------
install_only=""
for arg in "$@"; do
    case "$arg" in
    --install-only) install_only=1 ;;
    -h | --help)
        sed -n '2,16p' "$SCRIPT" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $arg (see --help)" ;;
    esac
done

TOTAL_START=$SECONDS
if [[ "${SLUICE_SKIP_INSTALL:-}" != 1 && "${SLUICE_PACKAGES_DONE:-}" != 1 ]]; then
    banner "system packages"
    install_packages
    done_step
    # The user may need Rust installed in their own home, so drop first.
    drop_privileges_if_sudo "$@"
fi

banner "Rust toolchain"
ensure_rust
done_step

if [[ -n "$install_only" ]]; then
    echo "everything is installed"
    exit 0
fi

banner "cargo fmt --all --check"
cargo fmt --all --check
done_step

banner "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
done_step

banner "cargo build --workspace --bins"
cargo build --workspace --bins
done_step

banner "cargo test --workspace"
# A test that needs promtool fails rather than skips when it is missing.
export SLUICE_REQUIRE_PROMTOOL=1
# --no-fail-fast: run every test binary and report all failures at the end.
cargo test --workspace --no-fail-fast
done_step

printf '\nall tests passed in %ss\n' "$((SECONDS - TOTAL_START))"
