#!/usr/bin/env bash
# README's first command: installs espeak-ng when missing (text-to-speech for the alert), builds Campanile
# and runs `campanile demo`: one node in drill mode, 1,000 simulated citizens, one emergency alert.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "demo: installing espeak-ng (text-to-speech)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
exec cargo run --release --bin campanile -- demo "$@"
