"""The HTTP edge of a real web process: exact deletes under a race."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.core import keys, store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def estack(module_stack_factory):
    return module_stack_factory.start(name="edge", workers=0, finalizer=False)


# ----------------------------------------------------------------------------- exact deletes
def test_racing_deletes_exactly_one_200_and_usage_to_the_byte(estack):
    r = estack.redis.client()
    owner = store.owner_of(estack.token)
    figures = []
    for round_no in range(5):
        rows = [estack.chat_line(f"del-{round_no}-{i}", "x" * (50 + round_no)) for i in range(3)]
        f = estack.upload_jsonl(rows)
        before = int(r.hget(keys.owner_usage(owner), "stored_bytes") or 0)
        start = threading.Barrier(20)

        def delete(_: int):
            start.wait(timeout=30)
            return estack.http("DELETE", f"/v1/files/{f.id}", timeout=30)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(delete, range(20)))
        statuses = sorted(a.status for a in answers)
        figures.append(statuses.count(200))
        assert statuses == [200] + [404] * 19, statuses
        for a in answers:
            if a.status == 200:
                assert a.json() == {"id": f.id, "object": "file", "deleted": True}
            else:
                estack.assert_error(a, 404, param="file_id")
        after = int(r.hget(keys.owner_usage(owner), "stored_bytes") or 0)
        assert before - after == f.bytes, (before, after, f.bytes)
        assert not (estack.data_dir / "files" / f.id).exists()
    print(f"\nracing deletes: 200s per round of 20 = {figures}")
