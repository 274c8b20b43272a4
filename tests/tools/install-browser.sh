#!/usr/bin/env bash
# Installs what the browser tests drive: Debian's Chromium (Playwright's own browser
# download cannot work on a closed network). Runs as root, or through sudo.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
as_root=()
if [ "$(id -u)" != 0 ]; then
    as_root=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
