#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine with Rust. Installs the real peers the tests
# drive (SIPp, baresip, Kamailio, espeak-ng, tshark, promtool, sox, nftables to cut a node's cluster traffic,
# headless Chromium with chromedriver and zbarimg for the console's browser tests, and iproute2's tc for a
# queue that fills a SIP socket's send buffer) from Debian packages
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v sox >/dev/null 2>&1 || need+=(sox)
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
command -v kamailio >/dev/null 2>&1 || need+=(kamailio)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v zbarimg >/dev/null 2>&1 || need+=(zbar-tools)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
if [ "${#need[@]}" -gt 0 ]; then
  echo "test-all: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# One build profile for everything: the multi-process tests run the release binary.
cargo build --release --workspace --bins
export CAMPANILE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/campanile"
cargo test --release --workspace --all-targets -- --test-threads=2
