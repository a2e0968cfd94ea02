"""The README's quickstart, run as written, so that it cannot drift from the product again (issue 13).

The ```bash and ```python blocks under ``## Quickstart`` (up to the next ``## `` heading) are run in
order, as one bash script (``set -euo pipefail``; a python block is fed to the interpreter on stdin), in
a fresh directory, as a newcomer runs them at the repository root: ``bin/`` there links to this
checkout's ``bin/``, so ``bin/sluice`` is this checkout's CLI, and ``var/data`` is what ``sluice up``
(``make run``), started by the test in that directory, made. The one change made to the blocks: port
8000 becomes the test's free port. Blocks in other languages (```sh, ```text) are shown, not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _base_env, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def quickstart_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of the Quickstart section, in order."""
    start = text.index("\n## Quickstart\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def as_script(blocks: list[tuple[str, str]], port: int) -> str:
    parts = ["set -euo pipefail"]
    for lang, code in blocks:
        code = code.replace("localhost:8000", f"localhost:{port}")
        if lang == "bash":
            parts.append(code)
        elif lang == "python":
            parts.append(f"\"$README_PYTHON\" - <<'README_PYTHON_BLOCK'\n{code}README_PYTHON_BLOCK")
    return "\n".join(parts) + "\n"


def test_the_quickstart_is_short_and_in_the_order_a_person_types_it():
    text = README.read_text()
    assert len(text.splitlines()) <= 250, "the README stays short: details go to docs/"
    blocks = quickstart_blocks(text)
    runnable = [(lang, code) for lang, code in blocks if lang in ("bash", "python")]
    assert ("sh", "make run\n") in blocks
    assert "cat > requests.jsonl" in runnable[0][1], "requests.jsonl is made before anything uses it"
    joined = "\n".join(code for _, code in runnable)
    for needle in (
        "bin/sluice submit requests.jsonl --wait --out results/",
        "curl -s http://localhost:8000/v1/files",
        'OpenAI(base_url="http://localhost:8000/v1"',
    ):
        assert needle in joined
    for doc in ("api", "configuration", "providers", "deploying", "operating", "architecture", "cli", "benchmarks"):
        assert f"(docs/{doc}.md)" in text and (ROOT / "docs" / f"{doc}.md").exists(), doc
    assert "http://localhost:8000/dashboard/" in text


def test_the_quickstart_runs_as_written(process_runner, tmp_path):
    if not os.access(ROOT / ".venv" / "bin" / "sluice", os.X_OK):
        pytest.skip("bin/sluice runs .venv/bin/sluice, which `make run` or `make test` installs")
    port = free_port()
    (tmp_path / "bin").symlink_to(ROOT / "bin")
    env = {**_base_env(), "PORT": str(port), "SLUICE_SHUTDOWN_GRACE_S": "3"}
    up = process_runner.start("sluice-up", [sys.executable, "-m", "service.cli", "up"], env=env, cwd=tmp_path)
    stack_file = tmp_path / "var" / "data" / "stack.json"
    wait_until(
        stack_file.exists,
        timeout=60,
        interval=0.1,
        check=process_runner.check_alive,
        message=lambda: f"sluice up to start:\n{up.tail()}",
    )

    script = as_script(quickstart_blocks(README.read_text()), port)
    res = subprocess.run(
        ["bash", "-c", script],
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        env={**_base_env(), "README_PYTHON": sys.executable},
    )
    assert res.returncode == 0, (
        f"the quickstart failed:\n--- script\n{script}\n--- stdout\n{res.stdout}\n"
        f"--- stderr\n{res.stderr}\n--- sluice up\n{up.tail()}"
    )
    out = res.stdout
    # The CLI: one batch of 2 requests, saved under the server's names.
    assert re.search(r"^batch_\w+ completed: 2 completed, 0 failed of 2 in ", out, re.MULTILINE), out
    saved = list((tmp_path / "results").glob("batch_*_output.jsonl"))
    assert len(saved) == 1 and sorted(json.loads(line)["custom_id"] for line in saved[0].read_text().splitlines()) == [
        "q1",
        "q2",
    ]
    assert "of the `sluice up` stack" in res.stderr, res.stderr
    # curl's event stream ended with the batch; then the output file, as did the SDK's.
    assert '"status":"completed"' in out.split("event: done", 1)[1], out
    results = [json.loads(line) for line in out.splitlines() if line.startswith('{"id":"batch_req_')]
    assert sorted(r["custom_id"] for r in results) == ["q1", "q1", "q1", "q2", "q2", "q2"], out
    assert all(r["response"]["status_code"] == 200 for r in results)
