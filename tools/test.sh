#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh Debian machine (system
# packages, nox in its own venv), then runs `nox -s ci`. Services (redis-server,
# mooncake_master) are started and stopped on loopback by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
dpkg -s libibverbs1 >/dev/null 2>&1 || need+=(libibverbs1 ibverbs-providers)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "== installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv-tools/bin/nox ]; then
  echo "== bootstrapping nox into .venv-tools"
  python3 -m venv .venv-tools
  .venv-tools/bin/pip install -q -c constraints.txt "nox>=2024.4"
fi

exec .venv-tools/bin/nox -s ci "$@"
