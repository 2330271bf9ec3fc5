#!/usr/bin/env bash
# Install everything the test suite needs into ./.venv, then run it.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k crash`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages that are missing: redis-server for the cluster tests; Node.js, npm and
# Chromium for the JavaScript client's tests (clients/js, run by tests/test_js_client.py).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The JavaScript client's dependencies, exactly as locked. puppeteer-core drives the
# Chromium installed above and never downloads a browser.
(cd clients/js && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
exec .venv/bin/pytest "$@"
