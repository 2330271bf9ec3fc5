"""The JavaScript client SDK (clients/js): its `node --test` suite, run as one test.

That suite starts its own `gateway serve` processes with this interpreter, and runs the
same conversations under Node and inside headless Chromium (Debian's `chromium`, driven
by puppeteer-core); scripts/test.sh installs Node, npm, Chromium and the package's
dependencies (`npm ci`) first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 600  # the suite takes well under a minute here; this only bounds a hang


def node_command(node: str) -> list[str]:
    """`node`, with the flag Node 20 needs for its global WebSocket (22 has it built in)."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"the JS SDK needs Node 20 or later, found {version.stdout.strip()}")
    return [node, "--experimental-websocket"] if major < 22 else [node]


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_js_sdk_passes_its_node_and_chromium_suites() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed: scripts/test.sh installs them")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/test.sh installs Debian's chromium")
    env = {**os.environ, "GATEWAY_PYTHON": sys.executable, "PUPPETEER_SKIP_DOWNLOAD": "1"}
    if not (JS / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, env=env, check=True)
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert {"browser.test.js", "gateway.test.js"} <= {Path(f).name for f in files}

    result = subprocess.run(
        [*node_command(node), "--test", "--test-reporter=spec", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )

    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-30000:]
    # The runner's summary: something ran, and nothing failed.
    assert re.search(r"\bpass [1-9]\d*\s*$", report, re.MULTILINE), report[-5000:]
    assert re.search(r"\bfail 0\s*$", report, re.MULTILINE), report[-5000:]
