#!/usr/bin/env bash
# Set up jobd on a fresh Debian machine (as root, Python 3.11+): a virtualenv in .venv with
# jobd, its development tools and `just` (from the rust-just package). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "setup: jobd needs Python 3.11 or newer as $PYTHON (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    echo "setup: installing python3-venv with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq python3-venv
fi
if ! command -v systemd-analyze >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    # Only for `systemd-analyze verify deploy/jobd.service` in the tests; nothing is started.
    echo "setup: installing systemd (systemd-analyze checks the unit file)" >&2
    apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd
fi
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
echo "setup: installing jobd and its development tools into .venv" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "setup: done; run .venv/bin/just --list for what you can do" >&2
