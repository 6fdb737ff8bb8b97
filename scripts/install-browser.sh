#!/bin/sh
# Install headless Chromium from Debian for the browser tests (pytest -m browser), unless it is already there.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: /usr/bin/chromium is missing; run as root (apt-get install chromium) or the browser tests skip" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
