#!/usr/bin/env bash
# Install a Valkey server (or, failing that, Redis 7, which speaks the same cluster protocol)
# from Debian's package registry, for the KVS's Valkey back end and its tests.
# Idempotent and quiet: does nothing when a server is already installed.
set -euo pipefail

if command -v valkey-server >/dev/null 2>&1 || command -v redis-server >/dev/null 2>&1; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install.sh: valkey-server is missing and this user cannot install packages;" \
      "install valkey-server (or redis-server 7) and run again" >&2
    exit 1
  fi
  sudo="sudo"
fi

# Tell Debian's maintainer scripts not to start the packaged service: tests start
# their own servers on ports chosen at run time, and a service on 6379 is not wanted.
policy=/usr/sbin/policy-rc.d
added_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  added_policy=1
fi
cleanup() { if [ -n "$added_policy" ]; then $sudo rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
if [ -n "$codename" ] && ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian ${codename}-backports main" |
    $sudo tee "/etc/apt/sources.list.d/${codename}-backports.list" >/dev/null
fi
$sudo apt-get update -qq >/dev/null
if ! $sudo apt-get install -y -qq -t "${codename}-backports" valkey-server >/dev/null 2>&1; then
  echo "install.sh: valkey-server is not available; installing redis-server instead" >&2
  $sudo apt-get install -y -qq redis-server >/dev/null
fi

# Where a service manager did start the packaged server anyway, stop and disable it.
for unit in valkey-server redis-server; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$unit" 2>/dev/null; then
    $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true
  fi
done
