#!/usr/bin/env bash
# Installs what windrow needs on a Debian/Ubuntu machine, only where missing:
# a C compiler and make, Rust (rustup), nats-server and mosquitto (with its clients),
# python3-venv (for scripts/chart-check).
# Sourced by scripts/test and scripts/run.
set -euo pipefail

windrow_sudo() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

windrow_apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing $*; install them with your package manager (this script knows apt-get only)" >&2
    exit 1
  fi
  echo "installing $* from the distribution's packages" >&2
  windrow_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  windrow_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

windrow_setup() {
  local pkgs=()
  # cc for rusqlite's bundled SQLite, make too for jemalloc (the allocator).
  { command -v cc && command -v make; } >/dev/null 2>&1 || pkgs+=(build-essential)
  command -v curl >/dev/null 2>&1 || pkgs+=(curl ca-certificates)
  # Debian installs the servers in /usr/sbin, which is not on every user's PATH.
  export PATH="$PATH:/usr/sbin:/usr/local/sbin"
  command -v nats-server >/dev/null 2>&1 || pkgs+=(nats-server)
  command -v mosquitto >/dev/null 2>&1 || pkgs+=(mosquitto)
  command -v mosquitto_pub >/dev/null 2>&1 || pkgs+=(mosquitto-clients)
  # scripts/chart-check (tests/chart.rs) installs its tools into a Python venv.
  python3 -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
  if [ ${#pkgs[@]} -gt 0 ]; then
    windrow_apt_install "${pkgs[@]}"
  fi
  if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "installing Rust with rustup (https://rustup.rs)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile default
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
  fi
  # The distribution's mosquitto package starts a broker on 1883; windrow's
  # tests never use it (they start their own on free ports).
}
