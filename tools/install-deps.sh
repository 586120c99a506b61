#!/usr/bin/env bash
# Installs the Debian packages pdserve needs to build and test, only those missing.
# Runs as root (or with sudo available). Debian 12.
# Usage: bash tools/install-deps.sh [EXTRA_PACKAGE...]  (run-tests.sh adds clang)
set -euo pipefail
pkgs=("$@" build-essential cmake pkg-config check libjson-c-dev libxxhash-dev python3 python3-numpy
      libzmq3-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libuv1-dev libucx-dev
      ucx-utils python3-zmq python3-protobuf iproute2
      python3-sentencepiece)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
