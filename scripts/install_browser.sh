#!/usr/bin/env bash
# Installs what the browser tests (tests/browser) need: Debian's Chromium (+ chromium-driver) through apt-get,
# and playwright-core from npm (tests/browser/package-lock.json), which drives that Chromium; no browser
# download ever. Idempotent. It never fails the caller: when something cannot be installed it prints one loud
# line and the browser tests skip, saying what is missing.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
browser_dir="$here/tests/browser"

loud() { echo "[browser] !!! $*; the browser tests will be skipped"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}

apt_install() {  # apt_install PACKAGE... : quietly, updating the package lists once
  command -v apt-get >/dev/null || return 1
  if [ -z "${apt_updated:-}" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || return 1
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[browser] installing ${missing[*]} with apt-get"
  if ! apt_install "${missing[@]}"; then
    still=()
    [ -x /usr/bin/chromium ] || still+=(chromium)
    command -v npm >/dev/null || still+=(npm)
    if [ ${#still[@]} -gt 0 ]; then
      loud "could not apt-get install ${still[*]} (no apt-get, no root, or no network)"
      exit 0
    fi
  fi
fi
lock="$browser_dir/package-lock.json"
installed="$browser_dir/node_modules/.package-lock.json"
if [ ! -f "$installed" ] || [ "$lock" -nt "$installed" ]; then
  echo "[browser] npm ci in tests/browser (playwright-core)"
  if ! (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
    loud "npm ci in tests/browser failed"
    exit 0
  fi
fi
if [ -x /usr/bin/chromium ]; then
  echo "[browser] ready: $(/usr/bin/chromium --version 2>/dev/null | head -1), node $(node --version)"
fi
exit 0
