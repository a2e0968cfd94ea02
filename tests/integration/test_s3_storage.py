"""S3Storage against a real S3-compatible server (moto's server mode on loopback)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from service.core import storage as storage_module
from service.core.config import ConfigError, S3Location, Settings
from service.core.storage import LocalStorage, MiB, S3Storage, open_storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def s3(s3_bucket, monkeypatch):
    # botocore reads credentials from the environment, as in a deployment.
    for name, value in s3_bucket.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    storage = S3Storage(
        s3_bucket.name,
        s3_bucket.prefix,
        endpoint_url=s3_bucket.server.url,
        part_size=5 * MiB,
        read_window=64 * 1024,
        merge_below=1500,
    )
    yield storage
    await storage.aclose()


async def _chunks(*parts: bytes):
    for p in parts:
        yield p


async def _read(storage, key: str, offset: int = 0, chunk_size: int = 7000) -> bytes:
    return b"".join([c async for c in storage.read(key, chunk_size=chunk_size, offset=offset)])


def _pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


async def test_write_read_size_delete_round_trip(s3, s3_bucket):
    data = _pattern(200_000)
    assert await s3.write("file-abc", _chunks(data[:1000], data[1000:])) == len(data)
    assert f"{s3_bucket.prefix}/file-abc" in s3_bucket.keys()
    assert await s3.size("file-abc") == len(data)
    assert await _read(s3, "file-abc") == data
    # Offsets: inside the first window, on a window boundary, in a later one, at and past the end.
    for offset in (1, 65536, 100_001, len(data) - 1, len(data), len(data) + 10):
        assert await _read(s3, "file-abc", offset) == data[offset:], offset
    # Chunks are at most chunk_size, even when the window is larger.
    assert max([len(c) async for c in s3.read("file-abc", chunk_size=1000)]) == 1000
    await s3.delete("file-abc")
    assert await s3.size("file-abc") is None
    with pytest.raises(FileNotFoundError):
        await _read(s3, "file-abc")
    await s3.delete("file-abc")  # absent keys are fine


async def test_empty_file_and_missing_key(s3):
    assert await s3.write("empty", _chunks()) == 0
    assert await s3.size("empty") == 0
    assert await _read(s3, "empty") == b""
    assert await s3.size("never-written") is None
    with pytest.raises(FileNotFoundError):
        await _read(s3, "never-written")
    with pytest.raises(ValueError):
        await s3.size("../escape")


async def test_large_write_is_a_multipart_upload(s3, s3_bucket):
    data = _pattern(11 * MiB + 123, seed=7)
    # 256 KiB chunks, as the upload handler sends them: parts of 5 MiB, 5 MiB and the rest.
    chunks = [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
    assert await s3.write("file-big", _chunks(*chunks)) == len(data)
    head = s3_bucket.server.client().head_object(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/file-big")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart ETag names its part count
    assert await s3.size("file-big") == len(data)
    assert await _read(s3, "file-big", chunk_size=256 * 1024) == data
    assert await _read(s3, "file-big", 6 * MiB + 5) == data[6 * MiB + 5 :]


@pytest.mark.parametrize("fail_after", [3 * MiB, 7 * MiB])
async def test_failing_iterator_stores_nothing(s3, s3_bucket, fail_after):
    """Whether it fails before the first part (single PutObject) or after it (multipart): nothing stays."""

    async def chunks():
        sent = 0
        while sent < fail_after:
            yield b"x" * MiB
            sent += MiB
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await s3.write("file-broken", chunks())
    assert await s3.size("file-broken") is None
    assert s3_bucket.keys() == []
    client = s3_bucket.server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", []) == []


async def test_write_replaces_atomically(s3):
    await s3.write("file-r", _chunks(b"old content"))
    await s3.write("file-r", _chunks(b"new"))
    assert await _read(s3, "file-r") == b"new"
    assert await s3.size("file-r") == 3


async def test_append_builds_a_file_and_is_idempotent(s3, s3_bucket):
    a, b, c = b"A" * 600, b"B" * 700, b"C" * 2500
    assert await s3.append("batch_1_output.jsonl", a, 0) == 600
    assert await s3.append("batch_1_output.jsonl", b, 600) == 1300
    # Redone at the same offset (a finalizer restarted before recording 1300): same content.
    assert await s3.append("batch_1_output.jsonl", b, 600) == 1300
    assert await _read(s3, "batch_1_output.jsonl") == a + b
    assert await s3.append("batch_1_output.jsonl", c, 1300) == 3800
    assert await s3.append("batch_1_output.jsonl", c, 1300) == 3800
    assert await s3.size("batch_1_output.jsonl") == 3800
    assert await _read(s3, "batch_1_output.jsonl") == a + b + c
    for offset in (0, 599, 600, 1299, 1300, 3000, 3800):
        assert await _read(s3, "batch_1_output.jsonl", offset, chunk_size=100) == (a + b + c)[offset:], offset
    # A redo may carry more data than the first attempt (more results had arrived meanwhile).
    assert await s3.append("batch_1_output.jsonl", c + b"D" * 10, 1300) == 3810
    assert await _read(s3, "batch_1_output.jsonl") == a + b + c + b"D" * 10
    # The small tail was merged, the large append got a part of its own.
    parts = [k for k in s3_bucket.keys() if ".parts/" in k]
    assert [k.rsplit("/", 1)[1] for k in parts] == [f"{0:020d}", f"{1300:020d}"], parts


async def test_append_at_an_earlier_offset_drops_what_followed(s3):
    key = "batch_2_error.jsonl"
    pieces = [bytes([65 + i]) * n for i, n in enumerate((1200, 300, 5000, 40, 1500))]
    offset = 0
    for p in pieces:
        offset = await s3.append(key, p, offset)
    whole = b"".join(pieces)
    assert await _read(s3, key) == whole
    # Back to a part boundary, into the middle of a part, and to the start.
    assert await s3.append(key, b"xyz", 1500) == 1503
    assert await _read(s3, key) == whole[:1500] + b"xyz"
    assert await s3.size(key) == 1503
    assert await s3.append(key, b"12", 700) == 702
    assert await _read(s3, key) == whole[:700] + b"12"
    assert await s3.append(key, b"", 300) == 300
    assert await _read(s3, key) == whole[:300]
    assert await s3.size(key) == 300
    assert await s3.append(key, b"fresh", 0) == 5
    assert await _read(s3, key) == b"fresh"
    with pytest.raises(ValueError):
        await s3.append(key, b"gap", 10)


async def test_interrupted_append_is_repaired_by_its_redo(s3, s3_bucket):
    """Leftovers of an append that died half-way (parts past the recorded offset) vanish on the redo."""
    key = "batch_3_output.jsonl"
    first = b"1" * 5000
    await s3.append(key, first, 0)
    await s3.append(key, b"2" * 5000, 5000)  # done, but the finalizer died before recording 10000
    client = s3_bucket.server.client()
    # ... and a stray part from an even older attempt, after a gap.
    client.put_object(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/{key}.parts/{20000:020d}", Body=b"junk")
    assert await _read(s3, key) == first + b"2" * 5000  # the part after the gap is not part of the file
    assert await s3.append(key, b"3" * 4000, 5000) == 9000
    assert await _read(s3, key) == first + b"3" * 4000
    assert sorted(k.rsplit("/", 1)[1] for k in s3_bucket.keys()) == [f"{0:020d}", f"{5000:020d}"]


async def test_a_stale_append_cannot_damage_what_a_newer_writer_stored(s3, s3_bucket):
    """A finalizer paused past its lease (token 1) resumes and appends what it had read, at the offset it
    had; meanwhile a newer one (token 2) appended from there on. Nothing of the newer one's goes."""
    key = "batch_5_output.jsonl"
    a, b, c, d = b"A" * 600, b"B" * 700, b"C" * 2500, b"D" * 400
    assert await s3.append(key, a, 0, token=1) == 600
    assert await s3.append(key, b, 600, token=1) == 1300  # merged into one part: [0, 1300)
    # Token 2 takes over at 1300 (what token 1 recorded) and appends c, then d.
    assert await s3.append(key, c, 1300, token=2) == 3800
    assert await s3.append(key, d, 3800, token=2) == 4200
    # Token 1 resumes: the same bytes at the same offset, once as a part of its own and once merged
    # into its tail part (which used to delete every part after it).
    assert await s3.append(key, c, 1300, token=1) == 3800
    assert await s3.append(key, c[:100], 1300, token=1) == 1400
    assert await _read(s3, key) == a + b + c + d
    assert await s3.size(key) == 4200
    # Even different bytes under the lower token change nothing the higher one stored.
    await s3.append(key, b"x" * 50, 1300, token=1)
    assert await _read(s3, key) == a + b + c + d
    # The stale writer had read further than the newer one has got to: the same bytes, past its end;
    # the newer one's next append writes them again and carries on.
    await s3.append(key, c + d + b"E" * 10, 1300, token=1)
    assert await s3.append(key, b"E" * 10, 4200, token=2) == 4210
    assert await s3.append(key, b"F" * 10, 4210, token=2) == 4220
    assert await _read(s3, key) == a + b + c + d + b"E" * 10 + b"F" * 10
    assert await s3.size(key) == 4220


async def test_a_redo_under_a_newer_token_drops_the_leftovers_of_an_older_one(s3, s3_bucket):
    """A finalizer killed mid-append (token 1) left bytes past its recorded offset; the next (token 2)
    redoes the append from that offset: the leftovers go, whatever they were."""
    key = "batch_6_error.jsonl"
    first = b"1" * 1400
    await s3.append(key, first, 0, token=1)
    await s3.append(key, b"?" * 5000, 1400, token=1)  # never recorded
    # ... and a part after a gap, not part of the file (from an even older interrupted attempt).
    s3_bucket.server.client().put_object(
        Bucket=s3_bucket.name, Body=b"?" * 10, Key=f"{s3_bucket.prefix}/{key}.parts/{9000:020d}-{1:020d}"
    )
    assert await s3.append(key, b"2" * 300, 1400, token=2) == 1700
    assert await _read(s3, key) == first + b"2" * 300
    assert await s3.size(key) == 1700
    names = sorted(k.rsplit("/", 1)[1] for k in s3_bucket.keys())
    assert names == [f"{0:020d}-{1:020d}", f"{1400:020d}-{2:020d}"], names


async def test_delete_removes_every_part(s3, s3_bucket):
    offset = 0
    for i in range(5):
        offset = await s3.append("batch_4_output.jsonl", bytes([48 + i]) * 2000, offset)
    await s3.write("file-keep", _chunks(b"keep me"))
    await s3.delete("batch_4_output.jsonl")
    assert await s3.size("batch_4_output.jsonl") is None
    assert s3_bucket.keys() == [f"{s3_bucket.prefix}/file-keep"]


async def test_remove_orphans_aborts_only_old_multipart_uploads(s3, s3_bucket, monkeypatch):
    client = await s3._s3()
    # An upload whose writer died (it never completes nor aborts), and one outside the prefix.
    dead = await client.create_multipart_upload(Bucket=s3_bucket.name, Key=f"{s3_bucket.prefix}/file-dead")
    await client.upload_part(
        Bucket=s3_bucket.name,
        Key=f"{s3_bucket.prefix}/file-dead",
        UploadId=dead["UploadId"],
        PartNumber=1,
        Body=b"x" * 100,
    )
    await client.create_multipart_upload(Bucket=s3_bucket.name, Key="elsewhere/file-other")

    async def in_progress() -> dict[str, datetime]:
        page = await client.list_multipart_uploads(Bucket=s3_bucket.name)
        return {u["Key"]: u["Initiated"] for u in page.get("Uploads", ())}

    # moto reports a fixed start time for every upload: the clock is set just after it, so the
    # upload is younger than the orphan age (a day by default) and may be live: it is kept.
    started = (await in_progress())[f"{s3_bucket.prefix}/file-dead"]

    class SoonAfter(datetime):
        @classmethod
        def now(cls, tz=None):
            return started + timedelta(minutes=5)

    monkeypatch.setattr(storage_module, "datetime", SoonAfter)
    assert await s3.remove_orphans(idle_s=60) == 0
    assert f"{s3_bucket.prefix}/file-dead" in await in_progress()
    monkeypatch.setattr(storage_module, "datetime", datetime)
    assert await s3.remove_orphans(idle_s=60) == 1  # now years old
    assert set(await in_progress()) == {"elsewhere/file-other"}
    assert await s3.remove_orphans(idle_s=60) == 0


async def test_default_storage_is_local_and_s3_is_selected_by_url(tmp_path):
    local = open_storage(Settings.from_env({"SLUICE_DATA_DIR": str(tmp_path)}))
    assert isinstance(local, LocalStorage)
    await local.aclose()
    env = {
        "SLUICE_STORAGE_URL": "s3://my-bucket/a/b/",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "SLUICE_DATA_DIR": str(tmp_path / "unused"),
    }
    settings = Settings.from_env(env)
    assert settings.s3 == S3Location(bucket="my-bucket", prefix="a/b", endpoint_url="http://127.0.0.1:9000")
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage) and storage.prefix == "a/b"
    await storage.aclose()
    assert not (tmp_path / "unused").exists()  # nothing local is needed on S3
    assert (
        Settings.from_env({**env, "SLUICE_S3_ENDPOINT_URL": "https://s3.example"}).s3.endpoint_url
        == "https://s3.example"
    )
    assert Settings.from_env({"SLUICE_STORAGE_URL": "s3://bkt", "AWS_REGION": "eu-west-3"}).s3 == S3Location(
        bucket="bkt", region="eu-west-3"
    )


@pytest.mark.parametrize(
    "url",
    [
        "file:///tmp/x",
        "bucket/prefix",
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://ab",
        "s3://b?x=1",
        "s3://key:secret@bucket/x",
    ],
)
def test_bad_storage_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="SLUICE_STORAGE_URL") as info:
        Settings.from_env({"SLUICE_STORAGE_URL": url})
    assert "secret" not in str(info.value)


def test_bad_endpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="endpoint"):
        Settings.from_env({"SLUICE_STORAGE_URL": "s3://bucket", "SLUICE_S3_ENDPOINT_URL": "localhost:9000"})
