#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks use, if missing.
# Idempotent; needs root (or sudo) and Debian/Ubuntu's apt-get.
#   chromium            the headless browser test (tests/browser/)
#   systemd             systemd-analyze, to verify deploy/systemd/ units
#   redis-server        the shared-cache tests
#   wrk                 the load generator in bench/
#   prometheus          promtool, to check and unit-test deploy/monitoring/alerts.yaml
#                       (the package's server is stopped and disabled again: only promtool is wanted)
set -euo pipefail

want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
command -v redis-server >/dev/null 2>&1 || want+=(redis-server)
command -v wrk >/dev/null 2>&1 || want+=(wrk)
command -v promtool >/dev/null 2>&1 || want+=(prometheus)
[ ${#want[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install-system-deps: need root to install: ${want[*]} (tests that need them will fail)" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: no apt-get; please install: ${want[*]}" >&2
  exit 0
fi
echo "install-system-deps: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
if [[ " ${want[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
  $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
