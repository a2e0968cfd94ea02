"""Every Redis key Sluice uses, in one place.

Keys that belong to one batch carry the batch id in a hash tag (``{batch_...}``) so that the
Lua scripts touching several of them stay within one cluster slot.
"""

PREFIX = "sluice"

# Consumer group of the workers on every batch's lines stream.
WORKER_GROUP = "workers"

# Monotonic counter giving every file and batch a sort position (created_at has 1 s resolution).
SEQ = f"{PREFIX}:seq"

# Batch ids whose lines workers may read (in_progress and not aborting).
ACTIVE_BATCHES = f"{PREFIX}:batches:active"
# Batch ids the finalizer watches (every batch between validation and a terminal state).
LIVE_BATCHES = f"{PREFIX}:batches:live"
# Batch ids whose lines a web process is still feeding into their stream, a window at a time.
FEEDING_BATCHES = f"{PREFIX}:batches:feeding"
# Batch ids waiting for validation and publishing, scored by when a web process may next claim
# them (a claim pushes the score past its validator lease).
PENDING_VALIDATION = f"{PREFIX}:batches:validating"
# Batch ids with lines handed to a provider's own Batch API that are not settled yet (workers/delegate.py).
DELEGATED_BATCHES = f"{PREFIX}:batches:delegated"

# Completion webhooks to send: batch ids scored by the time of their next attempt (s). A batch
# with a webhook URL is added by the script that moves it to a terminal state (store.transition);
# the finalizer holding the "webhooks" chore lease sends what is due (service/core/webhooks.py)
# and removes it once answered.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"

# Files with an expiry, scored by expires_at: the finalizer removes their content when due.
FILE_EXPIRY = f"{PREFIX}:files:expiry"

# Managed API tokens: SHA-256 digest -> record, and name -> digest.
TOKENS = f"{PREFIX}:tokens"
TOKEN_NAMES = f"{PREFIX}:tokens:names"

# Monotonic counter giving every lease its fencing token (service/core/leases.py).
LEASE_SEQ = f"{PREFIX}:seq:leases"

# Finalizers at work, scored by their last tick (ms): the live batches are shared among them.
FINALIZERS = f"{PREFIX}:finalizers"

# Lease of the process auditing every owner's usage counters (store.audit_usage); one at a time.
USAGE_AUDIT_LOCK = f"{PREFIX}:usage:audit:lock"

# Heartbeats: names of the web, worker and finalizer processes, scored by their last beat (Redis
# time, s). These keys expire unless heartbeats keep them (service/core/heartbeat.py).
PROCESSES = f"{PREFIX}:processes"

# Cluster-wide counters, moved by the script that records results (store._RECORD), exactly once
# per line (service/core/counters.py): lines by outcome; upstream retries, 429s and pauses
# ("retries|<provider>", ...); upstream requests and their latency histogram by provider and
# status ("<provider>|<status>|<le>" non-cumulative buckets, "...|count", "...|sum_us"; "...|sum"
# in seconds from versions that folded counts in with heartbeats). Heartbeats keep them from
# expiring.
METRICS_LINES = f"{PREFIX}:metrics:lines"
METRICS_UPSTREAM = f"{PREFIX}:metrics:upstream"
METRICS_LATENCY = f"{PREFIX}:metrics:latency"
# Tokens of successful lines, cluster-wide, by "<provider>|<model>|<kind>" (kind: requests, input,
# cached, output, reasoning); counted exactly once per line by the script that records it.
METRICS_TOKENS = f"{PREFIX}:metrics:tokens"
# How long a day of per-token usage (usage_day) is kept.
USAGE_RETENTION_DAYS = 400


def history(minute: int) -> str:
    """Hash of the counts of one minute (its start, unix s), expiring after the history window."""
    return f"{PREFIX}:history:{minute}"


def process(name: str) -> str:
    """Hash a process publishes with each heartbeat (role, host, pid, state, in-flight, ...)."""
    return f"{PREFIX}:process:{name}"


def usage_day(day: str) -> str:
    """Hash of one UTC day's (``YYYY-MM-DD``) usage: ``<owner>|<provider>|<model>|<kind>`` -> count."""
    return f"{PREFIX}:usage:{day}"


def file(file_id: str) -> str:
    """Hash with a file's metadata."""
    return f"{PREFIX}:file:{file_id}"


def file_refs(file_id: str) -> str:
    """Set of unfinished batches reading this file; its content outlives a delete until empty."""
    return f"{PREFIX}:file:{file_id}:refs"


def file_tombstone(file_id: str) -> str:
    """Short-lived marker of a deleted file naming the operation that deleted it (store.forget_file).

    A delete that redis-py re-sends after a lost reply finds its own operation id here and still
    answers "deleted"; any other delete of the same file answers "not found".
    """
    return f"{PREFIX}:file:{file_id}:deleted"


def owner_files(owner: str, purpose: str | None = None) -> str:
    """Sorted set of an owner's file ids (all, or of one purpose), scored by creation sequence."""
    base = f"{PREFIX}:owner:{owner}:files"
    return base if purpose is None else f"{base}:{purpose}"


def owner_usage(owner: str) -> str:
    """Hash of an owner's usage counted against quotas: active_batches, stored_bytes, enqueued_lines.

    Its ``rev`` field counts the scripts that moved it, so the audit can tell it apart from a copy
    read a moment earlier even when the counters came back to the same values.
    """
    return f"{PREFIX}:owner:{owner}:usage"


# SCAN pattern matching every owner's usage hash (the audit walks them).
OWNER_USAGE_PATTERN = owner_usage("*")


def owner_of_usage(key: str) -> str:
    """The owner id inside an ``owner_usage`` key."""
    return key.split(":")[-2]


def owner_op(owner: str, op_id: str) -> str:
    """The answer of one operation on an owner's usage, recorded by the script that applied it.

    A script that finds it returns it instead of applying the operation again: redis-py re-sends
    a command whose reply was lost, and the second run must change nothing.
    """
    return f"{PREFIX}:owner:{owner}:op:{op_id}"


def owner_batches(owner: str) -> str:
    """Sorted set of an owner's batch ids, scored by creation sequence."""
    return f"{PREFIX}:owner:{owner}:batches"


def batch(batch_id: str) -> str:
    """Hash with a batch's state, timestamps and counters."""
    return f"{PREFIX}:{{{batch_id}}}:batch"


def lines(batch_id: str) -> str:
    """Stream of the batch's request lines, read by the worker group."""
    return f"{PREFIX}:{{{batch_id}}}:lines"


def results(batch_id: str) -> str:
    """Stream of recorded results, drained by the finalizer into the output and error files."""
    return f"{PREFIX}:{{{batch_id}}}:results"


def feeder(batch_id: str) -> str:
    """Lease naming the web process that feeds this batch's stream (expires if it dies)."""
    return f"{PREFIX}:{{{batch_id}}}:feeder"


def validator(batch_id: str) -> str:
    """Lease naming the web process that validates and starts this batch."""
    return f"{PREFIX}:{{{batch_id}}}:validator"


def finalizer(batch_id: str) -> str:
    """Lease naming the finalizer that drains this batch's results and ends it."""
    return f"{PREFIX}:{{{batch_id}}}:finalizer"


def housekeeping(chore: str) -> str:
    """Lease of a cluster-wide chore that one finalizer at a time runs ("sweep", "webhooks")."""
    return f"{PREFIX}:lease:{chore}"


def done(batch_id: str) -> str:
    """Bitmap: bit i is set once line i has a recorded result (the exactly-once guard)."""
    return f"{PREFIX}:{{{batch_id}}}:done"


def delegation(batch_id: str) -> str:
    """Hash of the batch's provider batches ("parts"): ``n``, then ``<part>:<field>`` (plan, state, ids, fence)."""
    return f"{PREFIX}:{{{batch_id}}}:deleg"


def part_lease(batch_id: str, part: int) -> str:
    """Lease naming the finalizer process working on one provider batch of a batch right now."""
    return f"{PREFIX}:{{{batch_id}}}:deleg:{part}:lease"


def batch_id_of(key: str) -> str:
    """The batch id inside a per-batch key (the part between the braces)."""
    return key.split("{", 1)[1].split("}", 1)[0]


def provider_inflight(name: str) -> str:
    """Sorted set of a provider's requests in flight (leases scored by expiry, ms)."""
    return f"{PREFIX}:provider:{name}:inflight"


def provider_bucket(name: str) -> str:
    """Hash with a provider's RPM/TPM token buckets."""
    return f"{PREFIX}:provider:{name}:bucket"


def provider_op(name: str, op_id: str) -> str:
    """Marks one admission to a provider without a concurrency lease (a rate token taken), for re-runs."""
    return f"{PREFIX}:provider:{name}:op:{op_id}"


def provider_window(name: str) -> str:
    """Hash of a provider's adaptive concurrency window (workers/limits.py): ``w`` (the window),
    ``ss`` (the slow-start threshold), ``wmax`` (the window at the last cut) and ``cut`` (when, ms).
    """
    return f"{PREFIX}:provider:{name}:window"


def provider_pause(name: str) -> str:
    """Until when (ms) a provider is paused after a 429; lives on through the ramp-up."""
    return f"{PREFIX}:provider:{name}:paused"


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
