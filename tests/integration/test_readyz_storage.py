"""``/readyz`` on S3 storage: a real check that writes nothing per probe.

The bucket has versioning on, so every PUT leaves a version and every DELETE a delete marker:
the bucket's version listing is the log of every write the probes made. A private moto server
is frozen (SIGSTOP) to play an S3 outage.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from tests.conftest import S3Bucket, start_moto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROBES = 20


def _writes(bucket: S3Bucket) -> list[tuple[str, str]]:
    """Every object version and delete marker in the bucket, as (kind, key)."""
    client = bucket.server.client()
    found = []
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket.name):
        found += [("put", v["Key"]) for v in page.get("Versions", ())]
        found += [("delete", m["Key"]) for m in page.get("DeleteMarkers", ())]
    return found


def test_readyz_on_s3_writes_nothing_per_probe_and_fails_during_an_outage(stack_factory, process_runner, wait_until):
    moto = start_moto(process_runner)
    bucket = S3Bucket(moto, f"sluice-readyz-{uuid.uuid4().hex[:8]}")
    moto.client().create_bucket(Bucket=bucket.name)
    moto.client().put_bucket_versioning(Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"})
    # No cache: every probe reaches the object store, the worst case for its bill.
    stack = stack_factory.start(
        name="readyz-s3", workers=0, finalizer=False, env={**bucket.env, "SLUICE_READYZ_STORAGE_CACHE_S": "0"}
    )

    for _ in range(PROBES):
        res = stack.http("GET", "/readyz", token=None)
        assert res.status == 200, res.body
    # One write in all: the marker, by the first probe against this store.
    assert _writes(bucket) == [("put", f"{bucket.prefix}/sluice-readyz-marker")]

    # A restarted web process finds the marker and writes nothing either.
    web = stack.process("web")
    stack.runner.stop([web])
    stack.spawn("web")
    stack.wait_healthy()
    for _ in range(PROBES):
        assert stack.http("GET", "/readyz", token=None).status == 200
    assert len(_writes(bucket)) == 1, _writes(bucket)

    # An S3 outage (the server frozen) makes /readyz fail, within its timeout (3 s): 10x margin.
    moto.process.signal(signal.SIGSTOP)
    try:
        res = wait_until(
            lambda: (r := stack.http("GET", "/readyz", token=None, timeout=30)).status == 503 and r,
            timeout=60,
            interval=0.2,
            message="/readyz to fail while S3 is frozen",
            check=stack.check_alive,
        )
        body = res.json()
        assert body["redis"] == "ok" and body["storage"] != "ok", body
    finally:
        moto.process.signal(signal.SIGCONT)
    wait_until(
        lambda: stack.http("GET", "/readyz", token=None).status == 200,
        timeout=60,
        interval=0.2,
        message="/readyz to recover with S3",
        check=stack.check_alive,
    )
    assert len(_writes(bucket)) == 1, _writes(bucket)
