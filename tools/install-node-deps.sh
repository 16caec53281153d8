#!/usr/bin/env bash
# Installs the Node clients tests/clients/ drives (ali-oss, @alicloud/credentials), exactly as
# tests/clients/node/package-lock.json pins them, with `npm ci`.  Idempotent and quick when
# nothing changed: a stamp in node_modules holds the lock file's SHA-256, and npm ci runs only
# when node_modules is missing or the lock changed.  Installs Debian's nodejs and npm if `node`
# or `npm` is missing (needs root or sudo, and apt-get).
set -euo pipefail

dir="$(cd "$(dirname "$0")/.." && pwd)/tests/clients/node"
lock="$dir/package-lock.json"
stamp="$dir/node_modules/.lock-sha256"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-node-deps: need root to install nodejs and npm" >&2; exit 1; }
    sudo="sudo"
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "install-node-deps: no apt-get; please install Node.js >= 18 and npm" >&2; exit 1; }
  echo "install-node-deps: installing nodejs and npm" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  touch "$stamp"  # the lock was touched, not changed: make need not ask again
  exit 0
fi
echo "install-node-deps: npm ci --prefix tests/clients/node" >&2
npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >&2
echo "$want" > "$stamp"
