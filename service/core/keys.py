"""Every Redis key Sluice uses, in one place.

Every key carries a hash tag (``{...}``) naming what it belongs to, so that each Lua script and
transaction touches one Redis Cluster slot (docs/cluster-design.md):

- a **shard** (one of ``SHARDS``): a batch's and a file's keys, and what is indexed or counted with
  them. A file or batch id's last hex digit is its shard (``shard_of``); a batch takes its input
  file's shard and its result files take the batch's, so they share a slot;
- an **owner** (an API token's quota counters, op records and lists): ``{<owner>}``;
- a **provider** (its rate and concurrency limits): ``{<provider>}``;
- a few small global groups (``{procs}``, ``{tokens}``, ``{owners}``, a chore's lease).

On a single Redis the tags are just part of the names: one layout, one code path.
"""

import re
from collections.abc import Callable

PREFIX = "sluice"

# Hash tags whose cluster slots are evenly spaced over the slot range (service/devtools/shard_tags.py
# prints them; tests/unit/test_shard_tags.py checks them), so any contiguous split of the slots over
# M masters gives them out evenly (5/6/5 over 3). The number is fixed by the key names: changing it
# is a migration.
SHARD_TAGS = (
    "smj1", "segi", "s4et", "s4a4", "s85k", "se2c", "s4tv", "s4p6",
    "sgao", "sol7", "s6g2", "s6cr", "sg4e", "sv25", "s628", "s66x",
)  # fmt: skip
SHARDS = len(SHARD_TAGS)
_HEX = "0123456789abcdef"


def shard_of(object_id: str) -> int:
    """The shard of a file or batch id: its last hex digit (the random part of every id Sluice makes).

    Anything else (a client's malformed id, looked up only to answer 404) still maps to a shard.
    """
    last = object_id[-1:].lower()
    return _HEX.index(last) if last and last in _HEX else sum(object_id.encode()) % SHARDS


def shard_digit(shard: int) -> str:
    """The last hex digit of the ids made for ``shard`` (see ``shard_of``)."""
    return _HEX[shard]


def _in_shard(object_id: str) -> str:
    return f"{PREFIX}:{{{SHARD_TAGS[shard_of(object_id)]}}}"


# Consumer group of the workers on every batch's lines stream.
WORKER_GROUP = "workers"

# Monotonic counter giving every file and batch a sort position (created_at has 1 s resolution).
SEQ = f"{PREFIX}:seq"


def _shard(shard: int) -> str:
    return f"{PREFIX}:{{{SHARD_TAGS[shard]}}}"


# The indexes of batches and files, one per shard, in the slot of the batches and files they list (a
# batch is in its own shard's sets only), so the scripts that move a batch or a file between them
# stay in one slot. Readers go over every shard (service/core/shards.py).
def active_batches(shard: int) -> str:
    """Ids of the shard's batches whose lines workers may read (in_progress and not aborting)."""
    return f"{_shard(shard)}:batches:active"


def live_batches(shard: int) -> str:
    """Ids of the shard's batches the finalizers watch (between validation and a terminal state)."""
    return f"{_shard(shard)}:batches:live"


def feeding_batches(shard: int) -> str:
    """Ids of the shard's batches whose lines a web process is still feeding into their stream."""
    return f"{_shard(shard)}:batches:feeding"


def pending_validation(shard: int) -> str:
    """The shard's batches waiting for validation, scored by when a web process may next claim them
    (a claim pushes the score past its validator lease)."""
    return f"{_shard(shard)}:batches:validating"


def delegated_batches(shard: int) -> str:
    """The shard's batches with lines handed to a provider's own Batch API, not settled yet."""
    return f"{_shard(shard)}:batches:delegated"


def webhooks_due(shard: int) -> str:
    """The shard's completion webhooks to send: batch ids scored by their next attempt (s).

    A batch with a webhook URL is added by the script that moves it to a terminal state
    (store.transition); the finalizer holding the shard's "webhooks" chore lease sends what is due
    (service/core/webhooks.py) and removes it once answered.
    """
    return f"{_shard(shard)}:webhooks:due"


def file_expiry(shard: int) -> str:
    """The shard's files with an expiry, scored by expires_at: the finalizer holding the shard's
    "sweep" chore lease removes them when due."""
    return f"{_shard(shard)}:files:expiry"


# Managed API tokens: SHA-256 digest -> record, and name -> digest.
TOKENS = f"{PREFIX}:{{tokens}}:tokens"
TOKEN_NAMES = f"{PREFIX}:{{tokens}}:names"


# Finalizers at work, scored by their last tick (ms): the live batches are shared among them.
FINALIZERS = f"{PREFIX}:finalizers"

# Lease of the process auditing every owner's usage counters (store.audit_usage); one at a time.
USAGE_AUDIT_LOCK = f"{PREFIX}:{{owners}}:lease:audit"

# Heartbeats: names of the web, worker and finalizer processes, scored by their last beat (Redis
# time, s). These keys expire unless heartbeats keep them (service/core/heartbeat.py).
PROCESSES = f"{PREFIX}:{{procs}}:processes"

# How long a day of per-token usage (usage_day) is kept.
USAGE_RETENTION_DAYS = 400


# Cluster-wide counters, kept per shard and summed by their readers (service/core/cluster.py):
# the script that records results (store._RECORD) moves the hashes of the batch's shard, exactly
# once per line (service/core/counters.py). Lines by outcome; upstream retries, 429s and pauses
# ("retries|<provider>", ...); upstream requests and their latency histogram by provider and
# status ("<provider>|<status>|<le>" non-cumulative buckets, "...|count", "...|sum_us"). They never
# expire: 16 shards x 4 hashes, with fields bounded by the providers, statuses and models, and a
# shard's counters vanishing alone would look like a counter going backwards to Prometheus.
def metrics_lines(shard: int) -> str:
    """Hash of the shard's recorded lines by outcome."""
    return f"{_shard(shard)}:metrics:lines"


def metrics_upstream(shard: int) -> str:
    """Hash of the shard's upstream retries, 429s and pauses by provider."""
    return f"{_shard(shard)}:metrics:upstream"


def metrics_latency(shard: int) -> str:
    """Hash of the shard's upstream requests and latency histogram by provider and status."""
    return f"{_shard(shard)}:metrics:latency"


def metrics_tokens(shard: int) -> str:
    """Hash of the shard's tokens of successful lines by ``<provider>|<model>|<kind>`` (kind: requests,
    input, cached, output, reasoning)."""
    return f"{_shard(shard)}:metrics:tokens"


def history(shard: int, minute: int) -> str:
    """Hash of the shard's counts of one minute (its start, unix s), expiring after the history window."""
    return f"{_shard(shard)}:history:{minute}"


def history_index(shard: int) -> str:
    """Sorted set of the minutes (member and score) the shard has a history hash for, not yet folded."""
    return f"{_shard(shard)}:history:index"


def history_folding(shard: int, minute: int) -> str:
    """The shard's counts of one minute taken by a fold under way (counters.fold_history), with its op id."""
    return f"{_shard(shard)}:history:{minute}:folding"


def history_total(minute: int) -> str:
    """Hash of one minute's counts over every shard, folded from the shards' hashes once the minute is past."""
    return f"{PREFIX}:history:{minute}"


def usage_day(shard: int, day: str) -> str:
    """Hash of the shard's usage of one UTC day (``YYYY-MM-DD``): ``<owner>|<provider>|<model>|<kind>`` -> count."""
    return f"{_shard(shard)}:usage:{day}"


def process(name: str) -> str:
    """Hash a process publishes with each heartbeat (role, host, pid, state, in-flight, ...)."""
    return f"{PREFIX}:{{procs}}:process:{name}"


def outbox(shard: int) -> str:
    """The shard's owner-side effects still to apply: ``"<op> <owner> <id> <purpose> <deltas>"`` scored by ms.

    A release or a forget adds its entry in the script that makes it on the shard; the entry goes once
    its deltas are applied on the owner (exactly once, under ``owner_op(owner, op)``). Entries left by
    a process that died in between are replayed (``store.replay_outbox``).
    """
    return f"{_shard(shard)}:outbox"


def creation(object_id: str) -> str:
    """On the shard: whether a file's or batch's creation ran (``created``) or was given up (``aborted``).

    The second step of a creation writes the record only if this is absent, and ``store.settle``
    writes ``aborted`` only if it is absent: of a late creation and its settlement, exactly one wins.
    """
    return f"{_in_shard(object_id)}:op:{object_id}"


def file(file_id: str) -> str:
    """Hash with a file's metadata."""
    return f"{_in_shard(file_id)}:file:{file_id}"


def file_refs(file_id: str) -> str:
    """Set of unfinished batches reading this file; its content outlives a delete until empty."""
    return f"{_in_shard(file_id)}:file:{file_id}:refs"


def file_tombstone(file_id: str) -> str:
    """Short-lived marker of a deleted file naming the operation that deleted it (store.forget_file).

    A delete that redis-py re-sends after a lost reply finds its own operation id here and still
    answers "deleted"; any other delete of the same file answers "not found".
    """
    return f"{_in_shard(file_id)}:file:{file_id}:deleted"


def owner_files(owner: str, purpose: str | None = None) -> str:
    """Sorted set of an owner's file ids (all, or of one purpose), scored by creation sequence."""
    base = f"{PREFIX}:owner:{{{owner}}}:files"
    return base if purpose is None else f"{base}:{purpose}"


def owner_usage(owner: str) -> str:
    """Hash of an owner's usage counted against quotas: active_batches, stored_bytes, enqueued_lines.

    Its ``rev`` field counts the scripts that moved it, so the audit can tell it apart from a copy
    read a moment earlier even when the counters came back to the same values.
    """
    return f"{PREFIX}:owner:{{{owner}}}:usage"


# Every owner that ever reserved quota (the usage audit walks them instead of SCAN). Added to before
# each reservation (SADD is idempotent); never shrinks.
OWNERS = f"{PREFIX}:{{owners}}:all"


def owner_pending(owner: str) -> str:
    """Hash of an owner's creations reserved but not yet known to be recorded on their shard.

    ``<file or batch id>`` -> ``"<ms> <deltas> <purpose>"`` (when reserved, what was reserved, e.g.
    ``stored_bytes:700``, and a file's purpose or ``-``), written by the reservation and removed once
    the record exists or the reservation was given back (service/core/store.py, ``settle``).
    """
    return f"{PREFIX}:owner:{{{owner}}}:pending"


def owner_op(owner: str, op_id: str) -> str:
    """The answer of one operation on an owner's usage, recorded by the script that applied it.

    A script that finds it returns it instead of applying the operation again: redis-py re-sends
    a command whose reply was lost, and the second run must change nothing.
    """
    return f"{PREFIX}:owner:{{{owner}}}:op:{op_id}"


def owner_batches(owner: str) -> str:
    """Sorted set of an owner's batch ids, scored by creation sequence."""
    return f"{PREFIX}:owner:{{{owner}}}:batches"


def batch(batch_id: str) -> str:
    """Hash with a batch's state, timestamps and counters."""
    return f"{_in_shard(batch_id)}:batch:{batch_id}"


def lines(batch_id: str) -> str:
    """Stream of the batch's request lines, read by the worker group."""
    return f"{_in_shard(batch_id)}:lines:{batch_id}"


def results(batch_id: str) -> str:
    """Stream of recorded results, drained by the finalizer into the output and error files."""
    return f"{_in_shard(batch_id)}:results:{batch_id}"


def feeder(batch_id: str) -> str:
    """Lease naming the web process that feeds this batch's stream (expires if it dies)."""
    return f"{_in_shard(batch_id)}:feeder:{batch_id}"


def validator(batch_id: str) -> str:
    """Lease naming the web process that validates and starts this batch."""
    return f"{_in_shard(batch_id)}:validator:{batch_id}"


def finalizer(batch_id: str) -> str:
    """Lease naming the finalizer that drains this batch's results and ends it."""
    return f"{_in_shard(batch_id)}:finalizer:{batch_id}"


def housekeeping(chore: str, shard: int) -> str:
    """Lease of a shard's chore ("sweep": its expired files; "webhooks": its due completion webhooks),
    which one finalizer at a time runs, in the slot of the sets it covers."""
    return f"{_shard(shard)}:lease:{chore}"


def done(batch_id: str) -> str:
    """Bitmap: bit i is set once line i has a recorded result (the exactly-once guard)."""
    return f"{_in_shard(batch_id)}:done:{batch_id}"


def delegation(batch_id: str) -> str:
    """Hash of the batch's provider batches ("parts"): ``n``, then ``<part>:<field>`` (plan, state, ids, fence)."""
    return f"{_in_shard(batch_id)}:deleg:{batch_id}"


def part_lease(batch_id: str, part: int) -> str:
    """Lease naming the finalizer process working on one provider batch of a batch right now."""
    return f"{_in_shard(batch_id)}:deleg-lease:{batch_id}:{part}"


def lease_seq(lease: str) -> str:
    """The counter giving the fencing tokens of ``lease`` (service/core/leases.py), in the lease's slot.

    Fencing needs each lease's tokens to grow, not one global order, so the counter lives beside
    the lease: it shares the lease key's hash tag, or, for a key without one, takes the whole key as
    its tag (which is how Redis Cluster places such a key). It never expires.
    """
    start = lease.find("{")
    end = lease.find("}", start + 1) if start != -1 else -1
    tag = lease[start + 1 : end] if end > start + 1 else lease
    return f"{PREFIX}:{{{tag}}}:seq:leases"


def batch_id_of(key: str) -> str:
    """The batch id inside a per-batch key that ends in it (``batch``, ``lines``, ``validator``, ...)."""
    return key.rsplit(":", 1)[1]


def provider_inflight(name: str) -> str:
    """Sorted set of a provider's requests in flight (leases scored by expiry, ms)."""
    return f"{PREFIX}:provider:{{{name}}}:inflight"


def provider_bucket(name: str) -> str:
    """Hash with a provider's RPM/TPM token buckets."""
    return f"{PREFIX}:provider:{{{name}}}:bucket"


def provider_op(name: str, op_id: str) -> str:
    """Marks one admission to a provider without a concurrency lease (a rate token taken), for re-runs."""
    return f"{PREFIX}:provider:{{{name}}}:op:{op_id}"


def provider_window(name: str) -> str:
    """Hash of a provider's adaptive concurrency window (workers/limits.py): ``w`` (the window),
    ``ss`` (the slow-start threshold), ``wmax`` (the window at the last cut) and ``cut`` (when, ms).
    """
    return f"{PREFIX}:provider:{{{name}}}:window"


def provider_pause(name: str) -> str:
    """Until when (ms) a provider is paused after a 429; lives on through the ramp-up."""
    return f"{PREFIX}:provider:{{{name}}}:paused"


def work_keys(batch_id: str) -> tuple[str, ...]:
    """The keys that only matter while a batch runs; deleted when it ends."""
    return (
        lines(batch_id),
        results(batch_id),
        done(batch_id),
        feeder(batch_id),
        delegation(batch_id),
        validator(batch_id),
        finalizer(batch_id),
    )


# ----------------------------------------------------------------------------- the layout before the shards
# The key names of the versions before the sharded layout, read only by `sluice migrate-keys`
# (service/core/migrate.py), which moves a deployment's data from them to the names above.
# Their batch keys carried the batch id as the hash tag (``sluice:{batch_...}:<what>``); every
# other key had no tag.
LEGACY_PATTERN = f"{PREFIX}:*"

# Global sets -> the per-shard set each member (or the id at the head of a member) goes to.
LEGACY_SHARDED_SETS: dict[str, Callable[[int], str]] = {
    f"{PREFIX}:batches:active": active_batches,
    f"{PREFIX}:batches:live": live_batches,
    f"{PREFIX}:batches:feeding": feeding_batches,
    f"{PREFIX}:batches:validating": pending_validation,
    f"{PREFIX}:batches:delegated": delegated_batches,
    f"{PREFIX}:webhooks:due": webhooks_due,
    # Members are "<file_id> <storage_key> <owner> <size>".
    f"{PREFIX}:files:expiry": file_expiry,
}
# Cluster counters -> the per-shard hash they are added to (shard 0's: readers sum the shards).
LEGACY_METRICS: dict[str, Callable[[int], str]] = {
    f"{PREFIX}:metrics:lines": metrics_lines,
    f"{PREFIX}:metrics:upstream": metrics_upstream,
    f"{PREFIX}:metrics:latency": metrics_latency,
    f"{PREFIX}:metrics:tokens": metrics_tokens,
}
LEGACY_TOKENS = {f"{PREFIX}:tokens": TOKENS, f"{PREFIX}:tokens:names": TOKEN_NAMES}
# The one fencing counter every lease drew from.
LEGACY_LEASE_SEQ = f"{PREFIX}:seq:leases"
# Keys of running processes only (heartbeats, leases, finalizers at work); gone with the processes.
LEGACY_PROCESSES = f"{PREFIX}:processes"
LEGACY_TRANSIENT = (LEGACY_PROCESSES, f"{PREFIX}:usage:audit:lock", FINALIZERS)
# Keys the sharded layout reads under the same name: left where they are.
LEGACY_KEPT = (SEQ,)
LEGACY_PROCESS = re.compile(rf"^{PREFIX}:process:[^{{}}]+$")
LEGACY_CHORE_LEASE = re.compile(rf"^{PREFIX}:lease:[^{{}}:]+$")
LEGACY_PROVIDER = re.compile(rf"^{PREFIX}:provider:[^{{}}:]+:(inflight|bucket|window|paused|op:.+)$")
# Its per-minute history hashes are the sharded layout's folded totals (``history_total``).
LEGACY_HISTORY = re.compile(rf"^{PREFIX}:history:(?P<minute>\d+)$")
LEGACY_USAGE_DAY = re.compile(rf"^{PREFIX}:usage:(?P<day>\d{{4}}-\d{{2}}-\d{{2}})$")
LEGACY_FILE = re.compile(rf"^{PREFIX}:file:(?P<id>[^:{{}}]+)(?::(?P<what>refs|deleted))?$")
LEGACY_OWNER = re.compile(
    rf"^{PREFIX}:owner:(?P<owner>[^:{{}}]+):(?P<what>usage|batches|files(?::(?P<purpose>.+))?|op:(?P<op>.+))$"
)
LEGACY_BATCH = re.compile(
    rf"^{PREFIX}:\{{(?P<id>batch_[^{{}}]+)\}}:"
    r"(?P<what>batch|lines|results|done|deleg|feeder|validator|finalizer|deleg:(?P<part>\d+):lease)$"
)
