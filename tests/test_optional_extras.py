"""Optional dependencies stay optional: S3 storage without the ``s3`` extra is a clear start-up error.

The process runs with ``aiobotocore`` made unimportable (as in an install without the extra).
"""

from __future__ import annotations

import sys

import pytest

from tests.support import processes
from tests.support.env import base_env

WITHOUT_AIOBOTOCORE = (
    "import sys; sys.modules['aiobotocore'] = None; "  # what an install without the extra looks like
    "from service.cli.main import main; sys.argv = ['sluice', *sys.argv[1:]]; main()"
)


@pytest.mark.parametrize("command", ["web", "finalizer", "worker"])
def test_s3_storage_without_the_extra_names_it(command):
    env = {
        **base_env(),
        "SLUICE_STORAGE_URL": "s3://sluice-files/prefix",
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "SLUICE_UPSTREAM_URL": "http://127.0.0.1:9",
        "SLUICE_API_TOKENS": "tok",
    }
    done = processes.run([sys.executable, "-c", WITHOUT_AIOBOTOCORE, command], env=env, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "S3 storage needs the s3 extra: pip install 'sluice[s3]'" in done.stderr, done.stderr
    assert "SLUICE_STORAGE_URL" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_local_storage_needs_no_aiobotocore():
    probe = (
        "import sys; sys.modules['aiobotocore'] = None; from service.core.config import Settings; "
        "print(Settings.from_env({}).s3)"
    )
    done = processes.run([sys.executable, "-c", probe], env=base_env(), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "None", (done.stdout, done.stderr)
