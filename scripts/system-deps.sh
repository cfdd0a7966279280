#!/usr/bin/env bash
# System packages the test suite drives for real: PostgreSQL (the store suite) and
# Chromium (the leaderboard's browser test), from Debian's archive. Installs what is
# missing when it can (root, or sudo without a password); otherwise says what to run.
set -uo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "capbench setup: tests that need ${missing[*]} will be skipped; install with: sudo apt-get install -y ${missing[*]}" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "capbench setup: no apt-get here; install ${missing[*]} with your package manager" >&2
  exit 0
fi
echo "capbench setup: installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >/dev/null || true
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
