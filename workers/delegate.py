"""Running a batch's delegated lines on the provider's own Batch API, inside the finalizer processes.

The web process that validates a batch plans its delegated lines into parts (service/core/delegation.py):
each part becomes one provider batch. Every finalizer process runs a :class:`Delegator`, which
moves the parts of every batch in a shard's ``keys.delegated_batches`` through

    planned --upload--> uploaded --create--> created --poll...--> (terminal at the provider) --collect--> settled

one *step* at a time. A step is taken by whichever process first acquires the part's lease
(``keys.part_lease``, a fenced lease of service/core/leases.py) and, holding it, finds the part
still due (``next_at``, in Redis time, so hosts agree). Every state write of the holder runs in one
fenced Lua script (``_WRITE``): a holder paused past its lease and resumed can write nothing.
Results are recorded through ``store.record_results``, whose done bitmap makes a line's result land
exactly once whoever records it.

Crash safety, by step:

* upload: ``upload_at`` is recorded before the upload. A holder finding it set looks for the
  file among the provider's files (its name names the batch and part) before uploading again,
  and keeps looking for ``UPLOAD_SETTLE_S`` after the upload began (the provider may still be
  storing what a killed holder sent).
* create: ``intent_at`` is recorded before ``POST /v1/batches``, whose ``metadata`` names the
  Sluice batch and part. A holder finding an intent without a provider batch id lists the
  provider's batches (newest first, back to the intent) and adopts the one it finds; only
  if there is none does it create one. A stale holder whose create answered after a takeover
  cancels its batch when the part already records another one.
* poll: ``next_at`` is written with the poll's result, so however often the lease changes hands,
  a provider batch is polled at most once per interval (``batch_poll_s``, doubling while nothing
  changes, up to ``batch_poll_max_s``).
* collect: the output and error files are streamed and recorded chunk by chunk; a crash redoes
  the download, and lines recorded before change nothing. Lines of the part left without a result
  then get one (``batch_cancelled``, ``batch_expired``, ``provider_batch_failed``, ...), the
  provider's files are deleted (``batch_delete_files``) and the part is settled, which the
  finalizer waits for before it aborts or finishes the batch.

While a provider batch runs, its request counts are shown in the Sluice batch's ``request_counts``
(``deleg_completed``/``deleg_failed`` in the batch record, replaced by the recorded results as
they are downloaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypedDict

import aiohttp
import msgspec
import structlog
from redis.exceptions import NoScriptError, ResponseError
from structlog.typing import FilteringBoundLogger

from service.core import keys, leases, shards, store, usage
from service.core.config import Provider, Settings
from service.core.connections import REDIS_DOWN, Outage, Value, connect
from service.core.crypto import unseal
from service.core.delegation import Part, decode_part, part_lines
from service.core.leases import FencedScript, Lease, LeaseLost
from service.core.lifecycle import sleep_unless_stopped
from service.core.records import BatchField, BatchRecord
from service.core.results import ABORT_MESSAGES, error_line, json_body
from service.core.storage import Storage
from service.core.store import Outcome
from service.core.wire import JSON_ERRORS, TERMINAL_STATUSES

log: FilteringBoundLogger = structlog.get_logger("sluice.delegate")

TICK_S = 0.25
# Parts one process works on at once (uploads and downloads stream; polls are short).
MAX_STEPS = 8
RECORD_CHUNK = 500
UPLOAD_CHUNK = 256 * 1024
LIST_LIMIT = 100
# When looking for a provider batch created before a crash, list back to this long before the intent.
RECONCILE_MARGIN_S = 600
# An upload begun before a crash and not found among the provider's files is looked for again every
# UPLOAD_RECHECK_S until UPLOAD_SETTLE_S after it began; only then is the part uploaded anew.
UPLOAD_SETTLE_S = 30
UPLOAD_RECHECK_S = 2.0
PROVIDER_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_F = BatchField
_BATCH_FIELDS = (_F.STATUS, _F.ABORT, _F.OWNER, _F.ENDPOINT, _F.COMPLETION_WINDOW, _F.INPUT_KEY, _F.PROVIDER, _F.BYOK)


class ProviderError(Exception):
    """A call to the provider's Files or Batches API failed; ``permanent`` when retrying cannot help."""

    def __init__(self, message: str, *, status: int | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.permanent = permanent


class Stale(Exception):
    """This step's lease was taken over (or its batch ended): it must write nothing more."""


# ----------------------------------------------------------------------------- scripts
class _WriteCall(TypedDict):
    delegation: str
    batch: str
    delegated_batches: str
    part: int
    batch_id: str
    delay_ms: str | int
    settle: str
    shown_completed: str | int
    shown_failed: str | int
    fields: list[Value]


# The only way a holder writes a part's state (fenced by its lease). delay_ms: until the part is
# due again ('' leaves next_at); settle '1'; shown_*: the part's share of the batch's shown counts
# ('' leaves them); fields: field, value pairs. Returns 1, 0 when the batch is gone, -1 when the part is already
# settled. Safe to run twice (a retry after a lost reply): values are absolute and the
# settle branch runs once.
_WRITE = FencedScript(
    keys=("delegation", "batch", "delegated_batches"),
    args=("part", "batch_id", "delay_ms", "settle", "shown_completed", "shown_failed", "*fields"),
    source="""
local p = ARGV.part .. ':'
if redis.call('HGET', KEYS.delegation, p .. 'state') == 'settled' then return -1 end
if redis.call('EXISTS', KEYS.batch) == 0 then return 0 end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS.delegation, p .. ARGV[i], ARGV[i + 1]) end
if ARGV.delay_ms ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS.delegation, p .. 'next_at', string.format('%.0f', now + tonumber(ARGV.delay_ms)))
end
local shown = {ARGV.shown_completed, ARGV.shown_failed}
if ARGV.settle == '1' then shown = {'0', '0'} end
if shown[1] ~= '' then
  for i, name in ipairs({'completed', 'failed'}) do
    local old = tonumber(redis.call('HGET', KEYS.delegation, p .. 'shown_' .. name) or '0')
    redis.call('HSET', KEYS.delegation, p .. 'shown_' .. name, shown[i])
    redis.call('HINCRBY', KEYS.batch, 'deleg_' .. name, tonumber(shown[i]) - old)
  end
end
if ARGV.settle == '1' then
  redis.call('HSET', KEYS.delegation, p .. 'state', 'settled')
  if redis.call('HINCRBY', KEYS.batch, 'deleg_open', -1) <= 0 then
    redis.call('SREM', KEYS.delegated_batches, ARGV.batch_id)
  end
end
return 1
""",
)


# ----------------------------------------------------------------------------- the provider's API
class _SizedStream(aiohttp.payload.AsyncIterablePayload):
    """A streamed body whose size is known up front, so the upload carries a Content-Length."""

    def __init__(self, chunks: AsyncIterator[bytes], size: int, **kwargs: Any) -> None:
        super().__init__(chunks, **kwargs)
        self._size = size


def _error_message(status: int, data: bytes) -> str:
    try:
        body = msgspec.json.decode(data)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return f"HTTP {status}: {str(body['error'].get('message'))[:500]}"
    except JSON_ERRORS:
        pass
    return f"HTTP {status}: {data[:300].decode('utf-8', 'replace')}"


class ProviderAPI:
    """The Files and Batches API of one provider, with the key a batch uses for it."""

    def __init__(self, session: aiohttp.ClientSession, provider: Provider, api_key: str) -> None:
        self.session = session
        self.provider = provider
        self.base = provider.base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=provider.timeout_s)
        # Uploads and downloads take as long as they take; only a stalled connection is an error.
        self.stream_timeout = aiohttp.ClientTimeout(total=None, connect=60, sock_read=provider.timeout_s)

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        timeout = kwargs.pop("timeout", self.timeout)
        try:
            async with self.session.request(
                method, self.base + path, headers=self.headers, timeout=timeout, **kwargs
            ) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ProviderError(f"{method} {path}: {type(e).__name__}: {e}") from None
        if status >= 400:
            permanent = status < 500 and status not in (408, 409, 429)
            raise ProviderError(f"{method} {path}: {_error_message(status, data)}", status=status, permanent=permanent)
        try:
            return msgspec.json.decode(data, type=dict[str, Any])
        except JSON_ERRORS:
            raise ProviderError(f"{method} {path}: the answer is not a JSON object") from None

    async def upload(self, filename: str, size: int, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """POST /files (purpose batch), streaming ``size`` bytes."""
        with aiohttp.MultipartWriter("form-data") as form:
            form.append("batch").set_content_disposition("form-data", name="purpose")
            body = _SizedStream(chunks, size, content_type="application/octet-stream")
            body.set_content_disposition("form-data", name="file", filename=filename)
            form.append_payload(body)
            return await self._json("POST", "/files", data=form, timeout=self.stream_timeout)

    async def create(self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        return await self._json(
            "POST",
            "/batches",
            json={
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "completion_window": window,
                "metadata": metadata,
            },
        )

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._json("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/batches/{batch_id}/cancel")

    async def list_batches(self, after: str | None) -> dict[str, Any]:
        params = {"limit": str(LIST_LIMIT), **({"after": after} if after else {})}
        return await self._json("GET", "/batches", params=params)

    async def list_files(self, after: str | None) -> dict[str, Any]:
        params = {"purpose": "batch", "limit": str(LIST_LIMIT), "order": "desc", **({"after": after} if after else {})}
        return await self._json("GET", "/files", params=params)

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._json("DELETE", f"/files/{file_id}")
        except ProviderError as e:
            if e.status != 404:
                raise

    async def lines(self, file_id: str) -> AsyncIterator[list[bytes]]:
        """The lines of a file's content, a network chunk's worth at a time."""
        path = f"/files/{file_id}/content"
        try:
            async with self.session.get(self.base + path, headers=self.headers, timeout=self.stream_timeout) as resp:
                if resp.status >= 400:
                    data = await resp.read()
                    raise ProviderError(
                        f"GET {path}: {_error_message(resp.status, data)}",
                        status=resp.status,
                        permanent=resp.status == 404,
                    )
                rest = bytearray()
                async for chunk in resp.content.iter_any():
                    nl = chunk.rfind(b"\n")
                    if nl < 0:
                        rest += chunk  # a long line arriving in pieces is joined once, not rescanned
                        continue
                    rest += chunk[:nl]
                    complete = bytes(rest).split(b"\n")
                    rest = bytearray(chunk[nl + 1 :])
                    yield [line for line in complete if line.strip()]
                if bytes(rest).strip():
                    yield [bytes(rest)]
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ProviderError(f"GET {path}: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- result lines
class _Response(msgspec.Struct):
    status_code: Any = None


class _ResultLine(msgspec.Struct):
    custom_id: Any = None
    response: _Response | None = None
    error: Any = None


_result_decoder = msgspec.json.Decoder(_ResultLine)


def classify(line: bytes) -> tuple[str, str, bytes] | None:
    """``(custom_id, outcome, line as one line of JSON)`` of a provider's result line, or None if unreadable."""
    try:
        parsed = _result_decoder.decode(line)
    except (msgspec.ValidationError, *JSON_ERRORS):
        return None
    if not isinstance(parsed.custom_id, str):
        return None
    status = parsed.response.status_code if parsed.response is not None else None
    ok = isinstance(status, int) and 200 <= status < 300 and parsed.error is None
    raw = json_body(line)
    if raw is None:
        return None
    return parsed.custom_id, Outcome.COMPLETED if ok else Outcome.FAILED, bytes(raw)


def _failure(provider: str, pbatch: dict[str, Any]) -> str:
    errors = (pbatch.get("errors") or {}).get("data") if isinstance(pbatch.get("errors"), dict) else None
    detail = ""
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        detail = f": {first.get('code') or 'error'}: {str(first.get('message') or '')[:500]}"
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
    return f"The provider '{provider}' failed its batch {pbatch.get('id')}{detail}"


# ----------------------------------------------------------------------------- the loop
@dataclass
class _Step:
    """One holder's turn at one part."""

    batch_id: str
    part_no: int
    lease: Lease
    h: BatchRecord
    f: dict[str, str]
    plan: Part
    provider: Provider | None = None
    api: ProviderAPI | None = None
    index_of: dict[str, int] | None = field(default=None, repr=False)

    @property
    def log(self) -> FilteringBoundLogger:
        return log.bind(
            batch_id=self.batch_id,
            part=self.part_no,
            provider=self.plan.provider,
            provider_batch=self.f.get("pbatch") or None,
        )


def _part_fields(raw: dict[bytes, bytes]) -> dict[int, dict[str, str]]:
    parts: dict[int, dict[str, str]] = {}
    for k, v in raw.items():
        name = k.decode()
        head, sep, rest = name.partition(":")
        if sep and head.isdigit():
            parts.setdefault(int(head), {})[rest] = v.decode()
    return parts


class Delegator:
    """Moves the parts of every delegated batch forward; one per finalizer process (see the module docstring)."""

    def __init__(self, settings: Settings, storage: Storage, name: str) -> None:
        self.settings = settings
        self.storage = storage
        self.name = name
        self.stop = asyncio.Event()
        self.steps: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.lease_ms = int(min(10.0, settings.lease_s) * 1000)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run in a task of its own until :meth:`aclose`."""
        self.task = asyncio.create_task(self.run(), name="delegator")

    async def aclose(self) -> None:
        """Stop: steps under way are cancelled (their parts' leases run out and a peer goes on)."""
        self.stop.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)

    async def run(self) -> None:
        self.r = connect(self.settings, max_connections=MAX_STEPS + 4)
        connector = aiohttp.TCPConnector(limit=MAX_STEPS * 2 + 4)
        outage = Outage(log)
        try:
            async with aiohttp.ClientSession(connector=connector) as self.session:
                while not self.stop.is_set():
                    try:
                        await self.tick()
                        outage.ok()
                    except REDIS_DOWN as e:
                        await sleep_unless_stopped(self.stop, outage.failed(e))
                        continue
                    except Exception:
                        log.exception("delegate_tick_failed")
                    await sleep_unless_stopped(self.stop, TICK_S)
                for task in self.steps.values():
                    task.cancel()
                await asyncio.gather(*self.steps.values(), return_exceptions=True)
        finally:
            await self.r.aclose()

    async def tick(self) -> None:
        """Start a step for every part that is due and whose lease this process gets."""
        batch_ids = await shards.members(self.r, keys.delegated_batches)
        if not batch_ids:
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.time()
        for batch_id in batch_ids:
            pipe.hmget(keys.batch(batch_id), *_BATCH_FIELDS)
            pipe.hgetall(keys.delegation(batch_id))
        replies = iter(await pipe.execute())
        sec, usec = next(replies)
        now_ms = sec * 1000 + usec // 1000
        for batch_id in batch_ids:
            values, raw = next(replies), next(replies)
            h = BatchRecord.from_values(_BATCH_FIELDS, values)
            if not h.status or h.status in TERMINAL_STATUSES or not raw:
                # Ended (its parts settled before it could) or gone: nothing to do here any more.
                await self.r.srem(keys.delegated_batches(keys.shard_of(batch_id)), batch_id)
                continue
            h.id = batch_id
            for part_no, f in sorted(_part_fields(raw).items()):
                if len(self.steps) >= MAX_STEPS:
                    return
                if f.get("state") == "settled" or (batch_id, part_no) in self.steps:
                    continue
                # An aborting batch's parts are due at once, until their provider batch is told.
                force = bool(h.abort) and not f.get("cancel_sent")
                if not force and int(f.get("next_at") or 0) > now_ms:
                    continue
                holder = f"{self.name}/{secrets.token_hex(4)}"
                lease = await leases.take(self.r, keys.part_lease(batch_id, part_no), holder, self.lease_ms)
                if lease is not None:
                    key = (batch_id, part_no)
                    self.steps[key] = asyncio.create_task(
                        self._run_step(batch_id, part_no, lease, h), name=f"delegate-{batch_id}-{part_no}"
                    )
                    self.steps[key].add_done_callback(functools.partial(self._forget_step, key))

    def _forget_step(self, key: tuple[str, int], _: asyncio.Task[None]) -> None:
        self.steps.pop(key, None)

    async def _run_step(self, batch_id: str, part_no: int, lease: Lease, h: BatchRecord) -> None:
        step_task = asyncio.current_task()
        assert step_task is not None

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_ms / 4000)
                try:
                    held = await leases.renew(self.r, lease, self.lease_ms)
                except REDIS_DOWN:
                    continue
                if not held:
                    log.warning("delegate_lease_lost", batch_id=batch_id, part=part_no)
                    step_task.cancel()
                    return

        renewer = asyncio.create_task(renew())
        step: _Step | None = None
        try:
            # Read under the lease, so no peer moves the part meanwhile: was it still due (tick looked
            # before taking the lease, and a peer may have taken a step in between)?
            pipe = self.r.pipeline(transaction=False)
            pipe.time()
            pipe.hgetall(keys.delegation(batch_id))
            (sec, usec), raw = await pipe.execute()
            f = _part_fields(raw).get(part_no)
            if not f or f.get("state") == "settled":
                return
            force = bool(h.abort) and not f.get("cancel_sent")
            if not force and int(f.get("next_at") or 0) > sec * 1000 + usec // 1000:
                return
            step = _Step(batch_id, part_no, lease, h, f, decode_part(f["plan"]))
            await self._advance(step)
        except (Stale, LeaseLost):
            log.info("delegate_step_stale", batch_id=batch_id, part=part_no)
        except ProviderError as e:
            if step is not None:
                await self._retry_later(step, e)
        except asyncio.CancelledError:
            if self.stop.is_set() or renewer.done():
                return  # shutting down, or the lease was lost: a peer goes on
            raise
        except REDIS_DOWN as e:
            log.warning("delegate_step_redis_down", batch_id=batch_id, part=part_no, error=str(e))
        except Exception:
            log.exception("delegate_step_failed", batch_id=batch_id, part=part_no)
            if step is not None:
                with contextlib.suppress(Exception):
                    await self._write(step, delay_s=self._poll_s(step) * 4)
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            with contextlib.suppress(*REDIS_DOWN):
                await leases.drop(self.r, lease)

    # ------------------------------------------------------------------ state writes
    async def _write(
        self,
        step: _Step,
        *,
        delay_s: float | None = None,
        settle: bool = False,
        shown: tuple[int, int] | None = None,
        **fields: str | int,
    ) -> None:
        """Write the part's state if this step still holds it (else raise :class:`Stale`)."""
        try:
            result = await _WRITE(
                self.r,
                lease=step.lease,
                **self._write_call(step, delay_s=delay_s, settle=settle, shown=shown, **fields),
            )
        except LeaseLost:
            raise Stale from None
        if result == 1 or (result == -1 and settle):
            return
        raise Stale

    @staticmethod
    def _write_call(
        step: _Step,
        *,
        delay_s: float | None = None,
        settle: bool = False,
        shown: tuple[int, int] | None = None,
        **fields: str | int,
    ) -> _WriteCall:
        flat: list[Value] = []
        for k, v in fields.items():
            flat += [k, v]
            step.f[k] = str(v)
        completed, failed = shown if shown is not None else ("", "")
        return _WriteCall(
            delegation=keys.delegation(step.batch_id),
            batch=keys.batch(step.batch_id),
            delegated_batches=keys.delegated_batches(keys.shard_of(step.batch_id)),
            part=step.part_no,
            batch_id=step.batch_id,
            delay_ms="" if delay_s is None else int(delay_s * 1000),
            settle="1" if settle else "",
            shown_completed=completed,
            shown_failed=failed,
            fields=flat,
        )

    def _poll_s(self, step: _Step) -> float:
        return step.provider.batch_poll_s if step.provider else 10.0

    async def _retry_later(self, step: _Step, error: ProviderError) -> None:
        errors = int(step.f.get("errors") or 0) + 1
        poll = self._poll_s(step)
        delay = min(step.provider.batch_poll_max_s if step.provider else 120.0, poll * 2 ** min(errors, 16))
        step.log.warning("delegate_provider_error", error=str(error), retry_in_s=round(delay, 2))
        with contextlib.suppress(Stale, *REDIS_DOWN):
            await self._write(step, delay_s=delay, errors=errors, last_error=str(error)[:500])

    # ------------------------------------------------------------------ one step
    async def _advance(self, step: _Step) -> None:
        h, f = step.h, step.f
        step.provider = self.settings.provider(step.plan.provider)
        abort = h.abort
        if step.provider is None:
            await self._fill_and_settle(
                step, "provider_not_configured", f"No provider named '{step.plan.provider}' is configured any more."
            )
            return
        sealed = h.byok
        api_key = unseal(self.settings.secret_key, sealed) if sealed else step.provider.api_key
        step.api = ProviderAPI(self.session, step.provider, api_key)
        if f.get("state") == "planned":
            if abort:
                if f.get("upload_at"):  # an upload may have finished unrecorded: no copy is left behind
                    await self._delete_files(step, [await self._find_file(step, _filename(step))])
                await self._fill_and_settle(step, abort, ABORT_MESSAGES.get(abort, abort))
                return
            await self._upload(step)
        if f.get("state") == "uploaded" and f.get("intent_at") and not f.get("pbatch"):
            await self._adopt(step)
        if f.get("state") == "uploaded":
            if abort:
                await self._delete_files(step, [f.get("file")])
                await self._fill_and_settle(step, abort, ABORT_MESSAGES.get(abort, abort))
                return
            await self._create(step)
            return  # its first poll is due after batch_poll_s
        if f.get("state") == "created":
            await self._poll(step)

    async def _upload(self, step: _Step) -> None:
        api, plan = step.api, step.plan
        assert api is not None
        filename = _filename(step)
        if step.f.get("upload_at"):
            # An upload began before: it may have finished at the provider without its id being recorded.
            found = await self._find_file(step, filename)
            if found:
                step.log.info("delegate_file_found", file=found)
                await self._write(step, state="uploaded", file=found)
                return
            # A provider may still be storing the body a killed holder sent it in full: look again a
            # little later, rather than upload a second copy the moment the lease changes hands.
            since_s = store.now() - int(step.f["upload_at"])
            if since_s < UPLOAD_SETTLE_S:
                step.log.info("delegate_upload_unsettled", since_s=since_s)
                await self._write(step, delay_s=UPLOAD_RECHECK_S)
                return
        else:
            await self._write(step, upload_at=store.now())
        try:
            uploaded = await api.upload(filename, plan.bytes, self._part_bytes(step))
        except ProviderError as e:
            if not e.permanent:
                raise
            await self._fill_and_settle(
                step, "provider_batch_rejected", f"The provider '{plan.provider}' refused the batch input file: {e}"
            )
            return
        file_id = str(uploaded.get("id") or "")
        if not file_id:
            raise ProviderError("POST /files: the answer has no file id")
        try:
            await self._write(step, state="uploaded", file=file_id)
        except Stale:
            recorded = await self.r.hget(keys.delegation(step.batch_id), f"{step.part_no}:file")
            if recorded and recorded.decode() != file_id:
                await self._delete_files(step, [file_id])
            raise
        step.log.info("delegate_uploaded", file=file_id, lines=plan.lines, bytes=plan.bytes)

    async def _part_bytes(self, step: _Step) -> AsyncIterator[bytes]:
        buf = bytearray()
        lines = size = 0
        async for _, _, data in part_lines(self.storage, self.settings, step.h, step.plan):
            buf += data
            buf += b"\n"
            lines += 1
            size += len(data) + 1
            if len(buf) >= UPLOAD_CHUNK:
                yield bytes(buf)
                buf.clear()
        if (lines, size) != (step.plan.lines, step.plan.bytes):
            # The routing changed since the batch was planned: the declared length would be a lie.
            raise RuntimeError(
                f"part {step.part_no} of {step.batch_id} now reads {lines} lines / {size} bytes, "
                f"planned {step.plan.lines} / {step.plan.bytes}"
            )
        if buf:
            yield bytes(buf)

    async def _find_file(self, step: _Step, filename: str) -> str | None:
        api = step.api
        assert api is not None
        after: str | None = None
        found: list[str] = []
        since = int(step.f.get("upload_at") or 0) - RECONCILE_MARGIN_S
        while True:
            page = await api.list_files(after)
            data = [d for d in page.get("data") or [] if isinstance(d, dict)]
            found += [
                d["id"]
                for d in data
                if d.get("filename") == filename and d.get("bytes") == step.plan.bytes and d.get("id")
            ]
            if not page.get("has_more") or not data or min(int(d.get("created_at") or 0) for d in data) < since:
                break
            after = data[-1].get("id")
        if len(found) > 1:
            await self._delete_files(step, found[1:])
        return found[0] if found else None

    async def _adopt(self, step: _Step) -> None:
        """After a crash between create and recording its id: take the provider batch the list shows."""
        matches = await self._find_batches(step)
        if not matches:
            await self._write(step, reconciled=1)
            return
        keep = min(matches, key=lambda b: (int(b.get("created_at") or 0), str(b.get("id"))))
        await self._write(
            step, state="created", pbatch=keep["id"], pstatus=str(keep.get("status")), reconciled=1, delay_s=0
        )
        step.log.warning("delegate_batch_adopted", found=len(matches))
        await self._cancel_strays(step, matches)

    async def _find_batches(self, step: _Step) -> list[dict[str, Any]]:
        api = step.api
        assert api is not None
        since = int(step.f.get("intent_at") or step.f.get("upload_at") or 0) - RECONCILE_MARGIN_S
        after: str | None = None
        found: list[dict[str, Any]] = []
        while True:
            page = await api.list_batches(after)
            data = [d for d in page.get("data") or [] if isinstance(d, dict)]
            for b in data:
                md = b.get("metadata") or {}
                if (
                    isinstance(md, dict)
                    and md.get("sluice_batch_id") == step.batch_id
                    and md.get("sluice_part") == str(step.part_no)
                    and b.get("id")
                ):
                    found.append(b)
            if not page.get("has_more") or not data or min(int(d.get("created_at") or 0) for d in data) < since:
                return found
            after = data[-1].get("id")

    async def _cancel_strays(self, step: _Step, batches: list[dict[str, Any]]) -> None:
        """Cancel provider batches of this part other than the one it records (never two running)."""
        api = step.api
        assert api is not None
        for b in batches:
            if b["id"] != step.f.get("pbatch") and b.get("status") not in PROVIDER_TERMINAL | {"cancelling"}:
                step.log.warning("delegate_stray_cancelled", stray=b["id"])
                with contextlib.suppress(ProviderError):
                    await api.cancel(b["id"])

    async def _create(self, step: _Step) -> None:
        api, plan, h = step.api, step.plan, step.h
        assert api is not None
        await self._write(step, intent_at=store.now())
        metadata = {
            "sluice_batch_id": step.batch_id,
            "sluice_part": str(step.part_no),
            "sluice_lines": f"{plan.first}-{plan.last}",
        }
        try:
            # The provider's window is OpenAI's 24 h, whatever Sluice's is (only windows >= 24 h delegate).
            created = await api.create(step.f["file"], h.endpoint, "24h", metadata)
        except ProviderError as e:
            if not e.permanent:
                raise
            await self._delete_files(step, [step.f.get("file")])
            await self._fill_and_settle(
                step, "provider_batch_rejected", f"The provider '{plan.provider}' refused to create the batch: {e}"
            )
            return
        pbatch = str(created.get("id") or "")
        if not pbatch:
            raise ProviderError("POST /batches: the answer has no batch id")
        try:
            await self._write(
                step, state="created", pbatch=pbatch, pstatus=str(created.get("status")), delay_s=self._poll_s(step)
            )
        except Stale:
            # A peer took over while this create was under way. If it recorded a batch of its
            # own, this one is a second batch for the same lines: cancel it. If it recorded none
            # yet, it finds this one in the provider's list and adopts it.
            recorded = await self.r.hget(keys.delegation(step.batch_id), f"{step.part_no}:pbatch")
            if recorded and recorded.decode() != pbatch:
                step.log.warning("delegate_stray_cancelled", stray=pbatch)
                with contextlib.suppress(ProviderError):
                    await api.cancel(pbatch)
            raise
        step.log.info("delegate_created", lines=plan.lines)
        if step.f.get("reconciled"):
            await self._cancel_strays(step, await self._find_batches(step))

    async def _poll(self, step: _Step) -> None:
        api, f, h = step.api, step.f, step.h
        assert api is not None and step.provider is not None
        if h.abort and not f.get("cancel_sent"):
            try:
                await api.cancel(f["pbatch"])
            except ProviderError as e:
                if e.status not in (404, 409):  # 409: it ended meanwhile; the poll below finds out how
                    raise
            await self._write(step, cancel_sent=1)
            step.log.info("delegate_cancel_sent", reason=h.abort)
        try:
            pbatch = await api.retrieve(f["pbatch"])
        except ProviderError as e:
            if e.status != 404:
                raise
            await self._fill_and_settle(
                step,
                "provider_batch_not_found",
                f"The provider '{step.plan.provider}' no longer knows its batch {f['pbatch']}.",
            )
            return
        status = str(pbatch.get("status"))
        reported = pbatch.get("request_counts")
        counts = reported if isinstance(reported, dict) else {}
        done = (_int(counts.get("completed")), _int(counts.get("failed")))
        if status in PROVIDER_TERMINAL:
            await self._collect(step, pbatch, status, done)
            return
        seen = f"{status} {done[0]} {done[1]}"
        polls = 0 if seen != f.get("seen") else int(f.get("polls") or 0) + 1
        delay = min(step.provider.batch_poll_max_s, step.provider.batch_poll_s * 2 ** min(polls, 16))
        if h.abort:
            delay = step.provider.batch_poll_s  # cancelling: its end is near and the batch waits for it
        await self._write(step, delay_s=delay, shown=done, pstatus=status, seen=seen, polls=polls, errors=0)

    # ------------------------------------------------------------------ collecting results
    async def _index(self, step: _Step) -> dict[str, int]:
        if step.index_of is None:
            step.index_of = {
                request.custom_id: index
                async for index, request, _ in part_lines(self.storage, self.settings, step.h, step.plan)
            }
        return step.index_of

    async def _collect(self, step: _Step, pbatch: dict[str, Any], status: str, done: tuple[int, int]) -> None:
        api = step.api
        assert api is not None
        index_of = await self._index(step)
        recorded: set[int] = set()
        seen = [0, 0]
        for file_id in (pbatch.get("output_file_id"), pbatch.get("error_file_id")):
            if not file_id:
                continue
            try:
                async for lines in api.lines(str(file_id)):
                    results: list[tuple[int, str, str, bytes, str]] = []
                    for line in lines:
                        got = classify(line)
                        index = index_of.get(got[0]) if got else None
                        if got is None or index is None or index in recorded:
                            step.log.warning("delegate_unexpected_line", line=line[:200].decode("utf-8", "replace"))
                            continue
                        recorded.add(index)
                        tokens = (
                            usage.from_result_line(step.plan.provider, got[2]) if got[1] == Outcome.COMPLETED else ""
                        )
                        results.append((index, "", got[1], got[2], tokens))
                    for i in range(0, len(results), RECORD_CHUNK):
                        chunk = results[i : i + RECORD_CHUNK]
                        for result in chunk:
                            seen[result[2] == Outcome.FAILED] += 1
                        await self._record(step, chunk, done, seen)
            except ProviderError as e:
                if not e.permanent:
                    raise
                step.log.warning("delegate_file_missing", file=file_id, error=str(e))
        code, message = self._missing_reason(step, pbatch, status)
        await self._fill(step, code, message)
        if status == "expired" and not step.h.abort:
            # The provider's window ran out: so did the batch's (its unfinished lines end as batch_expired).
            await store.transition(
                self.r,
                step.batch_id,
                allowed=["in_progress"],
                fields={_F.ABORT: "batch_expired"},
                remove_from=[keys.active_batches],
            )
        await self._delete_files(step, [step.f.get("file"), pbatch.get("output_file_id"), pbatch.get("error_file_id")])
        if step.f.get("reconciled"):
            await self._cancel_strays(step, await self._find_batches(step))
        await self._write(step, settle=True, pstatus=status)
        step.log.info("delegate_settled", status=status, completed=seen[0], failed=seen[1])

    async def _record(
        self, step: _Step, results: list[tuple[int, str, str, bytes, str]], done: tuple[int, int], seen: list[int]
    ) -> None:
        # The part's shown counts drop as its results land, in one transaction: the batch's
        # request_counts neither count a line twice nor dip while results are downloaded.
        shown = (max(0, done[0] - seen[0]), max(0, done[1] - seen[1]))
        pipe = self.r.pipeline(transaction=True)
        _WRITE.queue(pipe, lease=step.lease, **self._write_call(step, shown=shown))
        store.queue_record(pipe, step.batch_id, results)
        try:
            written, _ = await pipe.execute()
        except NoScriptError:  # Redis restarted and forgot its scripts: the plain calls load them
            await self._write(step, shown=shown)
            await store.record_results(self.r, step.batch_id, results)
            return
        except ResponseError as e:
            if str(e).startswith(leases.FENCED):
                raise Stale from None
            raise
        if written != 1:
            raise Stale

    def _missing_reason(self, step: _Step, pbatch: dict[str, Any], status: str) -> tuple[str, str]:
        abort = step.h.abort
        if status == "failed":
            return "provider_batch_failed", _failure(step.plan.provider, pbatch)
        if status == "expired":
            return "batch_expired", ABORT_MESSAGES["batch_expired"]
        if status == "cancelled":
            reason = abort or "batch_cancelled"
            if abort:
                return reason, ABORT_MESSAGES.get(reason, reason)
            return (
                reason,
                f"The provider '{step.plan.provider}' cancelled its batch {pbatch.get('id')} before this request ran.",
            )
        return "provider_missing_result", (
            f"The provider '{step.plan.provider}' finished its batch {pbatch.get('id')} "
            "without a result for this request."
        )

    async def _fill(self, step: _Step, code: str, message: str) -> None:
        """Give every line of the part still without a result an error line."""
        bitmap = await self.r.get(keys.done(step.batch_id)) or b""
        missing: list[tuple[int, str, str, bytes]] = []
        async for index, request, _ in part_lines(self.storage, self.settings, step.h, step.plan):
            byte = index >> 3
            if byte < len(bitmap) and bitmap[byte] & (0x80 >> (index & 7)):
                continue
            missing.append((index, "", Outcome.FAILED, error_line(request.custom_id, code, message)))
            if len(missing) >= RECORD_CHUNK:
                await store.record_results(self.r, step.batch_id, missing)
                missing = []
        await store.record_results(self.r, step.batch_id, missing)

    async def _fill_and_settle(self, step: _Step, code: str, message: str) -> None:
        await self._fill(step, code, message)
        await self._write(step, settle=True, pstatus=code)
        step.log.info("delegate_settled", status=code)

    async def _delete_files(self, step: _Step, file_ids: list[Any]) -> None:
        if step.provider is None or not step.provider.batch_delete_files or step.api is None:
            return
        for file_id in file_ids:
            if file_id:
                try:
                    await step.api.delete_file(str(file_id))
                except ProviderError as e:
                    step.log.warning("delegate_file_not_deleted", file=file_id, error=str(e))


def _filename(step: _Step) -> str:
    """The name of a part's input file at the provider: how a retry finds an upload it did not see end."""
    return f"sluice_{step.batch_id}_part{step.part_no}.jsonl"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
