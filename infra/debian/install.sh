#!/usr/bin/env bash
# Install Debian packages that a make target needs, only when their command is missing.
# Usage: infra/debian/install.sh COMMAND PACKAGE [COMMAND PACKAGE ...]
set -euo pipefail
missing=()
while (($# >= 2)); do
  command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]] || missing+=("$2")
  shift 2
done
((${#missing[@]} == 0)) && exit 0
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
    echo "needs Debian packages ${missing[*]}: run 'apt-get install ${missing[*]}' as root" >&2
    exit 1
  fi
else sudo=(); fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
  { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
