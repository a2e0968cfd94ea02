"""The ``sluice`` command: one subcommand per process type, ``up`` for the local stack, and a client of the API."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap

from service.core.config import ClientSettings, ConfigError, Settings, load_providers
from service.core.log import redact_url

from . import localstack

DOCS = "docs/configuration.md"

# What each command reads from the environment, shown by its --help.
WEB_ENV = f"""\
environment (every variable: {DOCS}):
  REDIS_URL              Redis holding metadata and queues (default redis://localhost:6379/0)
  PORT                   the HTTP port (default 8000)
  SLUICE_API_TOKENS      comma-separated API tokens (those of `sluice tokens create` work too)
  SLUICE_DATA_DIR        where file contents live (default ./var/data), unless
  SLUICE_STORAGE_URL     names an object store: s3://BUCKET[/PREFIX] (with the AWS_* variables)
  SLUICE_CONFIG          a TOML file of providers and quotas (or SLUICE_UPSTREAM_URL: one provider)
  SLUICE_MAX_BATCH_LINES request lines per batch (default 50000)
  SLUICE_MAX_BATCH_FILE_BYTES, SLUICE_MAX_FILE_BYTES   upload limits (default 200 MB, 512 MB)
  SLUICE_WINDOW_LINES, SLUICE_WINDOW_BYTES   how much of a running batch Redis holds
  SLUICE_COMPLETION_WINDOW_S   how long "24h" lasts (default 86400); every window scales with it
  SLUICE_SHUTDOWN_GRACE_S   how long a stop waits for requests under way (default 20)
  SLUICE_SECRET_KEY, SLUICE_WEBHOOK_SECRET, SLUICE_METRICS_TOKEN, SLUICE_LOG_LEVEL
"""
WORKER_ENV = f"""\
environment (every variable: {DOCS}):
  REDIS_URL              Redis holding metadata and queues (default redis://localhost:6379/0)
  SLUICE_UPSTREAM_URL, SLUICE_UPSTREAM_API_KEY   one provider; or SLUICE_CONFIG, a TOML
                         file of several (one of the two is required)
  SLUICE_WORKER_CONCURRENCY   upstream requests in flight in this process (default 32)
  SLUICE_MAX_ATTEMPTS    attempts per line for transient failures (default 5)
  SLUICE_REQUEST_TIMEOUT_S   timeout of one request to the default provider (default 600)
  SLUICE_ADAPTIVE_CONCURRENCY   find each provider's concurrency limit from its 429s (default on)
  SLUICE_LEASE_S, SLUICE_MAX_DELIVERIES   when a dead worker's lines are taken over, given up
  SLUICE_SHUTDOWN_GRACE_S   how long a stop lets requests in flight finish (default 20)
  SLUICE_SECRET_KEY      decrypts clients' own provider keys; SLUICE_LOG_LEVEL
"""
FINALIZER_ENV = f"""\
environment (every variable: {DOCS}):
  REDIS_URL              Redis holding metadata and queues (default redis://localhost:6379/0)
  SLUICE_DATA_DIR, SLUICE_STORAGE_URL   where result files are written (as for `sluice web`)
  SLUICE_RETENTION_S     how long a finished batch's record is kept (default 30 days)
  SLUICE_WEBHOOK_SECRET or SLUICE_SECRET_KEY   signs completion webhooks
  SLUICE_WEBHOOK_MAX_ATTEMPTS, SLUICE_WEBHOOK_BACKOFF_S, SLUICE_WEBHOOK_TIMEOUT_S, SLUICE_LOG_LEVEL
"""
UP_ENV = f"""\
environment (every other variable goes to the processes it starts; {DOCS}):
  PORT                   the API's port (default 8000)
  SLUICE_DATA_DIR        where it keeps Redis's data, files, the dev token and stack.json
                         (default ./var/data)
  REDIS_URL              use this Redis instead of starting one
  SLUICE_API_TOKENS      the API tokens (default: a development token, kept in
                         $SLUICE_DATA_DIR/dev-token)
  SLUICE_UPSTREAM_URL, SLUICE_CONFIG   the provider(s) (default: a mock provider it starts)
  SLUICE_SHUTDOWN_GRACE_S   how long each process may take to stop (default 20)
"""
STATUS_ENV = """\
environment:
  REDIS_URL              the cluster's Redis. When it is not set: the Redis of the `sluice up`
                         stack in $SLUICE_DATA_DIR/stack.json (SLUICE_DATA_DIR: default ./var/data,
                         or this checkout's var/data), else redis://localhost:6379/0. A line on
                         stderr says which.
  SLUICE_CONFIG, SLUICE_UPSTREAM_URL   the providers shown (under `sluice up`: its mock provider)
"""
TOKENS_ENV = """\
environment:
  REDIS_URL              where tokens are kept. When it is not set: the Redis of the `sluice up`
                         stack ($SLUICE_DATA_DIR/stack.json), else redis://localhost:6379/0. A line
                         on stderr says which.
  SLUICE_CONFIG          its [quotas] are the defaults a new token's quotas start from
"""
MIGRATE_ENV = """\
environment:
  REDIS_URL              the single Redis holding the old layout. When it is not set: the Redis of
                         the `sluice up` stack ($SLUICE_DATA_DIR/stack.json), else
                         redis://localhost:6379/0. A line on stderr says which.

exit status: 0 done (or nothing to do), 1 Redis unreachable or keys left that could not be
merged, 2 refused (a process beat in the last minute, or REDIS_URL names a cluster).
"""
MOCK_ENV = """\
It reads no environment variable. A request line's body may carry "mock_status": 404 or
"mock_latency_ms": 300 to force an answer; GET /_mock/stats shows what reached it.
"""


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as e:
        print(f"sluice: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _client_settings() -> ClientSettings:
    return ClientSettings.from_env()


def _admin_settings() -> Settings:
    """Settings of ``status`` and ``tokens``: REDIS_URL, else the `sluice up` stack's Redis, else the default."""
    settings = _settings()
    client = _client_settings()
    if client.redis_url:
        return settings
    stack = localstack.find(client)
    if stack is None:
        localstack.announce(
            f"REDIS_URL is not set and no `sluice up` stack runs here; using {redact_url(settings.redis_url)}"
        )
        return settings
    localstack.announce(f"using Redis {redact_url(stack.redis_url)} of {stack.describe()}")
    settings = dataclasses.replace(settings, redis_url=stack.redis_url)
    if not settings.providers and stack.upstream_url:
        providers, _ = load_providers({"SLUICE_UPSTREAM_URL": stack.upstream_url})
        settings = dataclasses.replace(settings, providers=providers)
    return settings


def _web(args: argparse.Namespace) -> None:
    from service.web.app import run

    settings = _settings()
    if not settings.api_tokens:
        print(
            "sluice: SLUICE_API_TOKENS is empty; only tokens made with `sluice tokens create` will work",
            file=sys.stderr,
        )
    run(settings)


def _worker(args: argparse.Namespace) -> None:
    from workers.worker import run

    settings = _settings()
    if not settings.providers:
        print("sluice: no provider configured; set SLUICE_UPSTREAM_URL or SLUICE_CONFIG", file=sys.stderr)
        raise SystemExit(2)
    run(settings)


def _finalizer(args: argparse.Namespace) -> None:
    from workers.finalizer import run

    run(_settings())


def _mock_provider(args: argparse.Namespace) -> None:
    from service.devtools.mock_provider import run

    run(
        args.port,
        host=args.host,
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        seed=args.seed,
        max_concurrency=args.max_concurrency,
        rpm=args.rpm,
        window_s=args.window_s,
        batch_line_ms=args.batch_line_ms,
        batch_start_ms=args.batch_start_ms,
        batch_cancel_ms=args.batch_cancel_ms,
        batch_window_ms=args.batch_window_ms,
        retry_after=not args.no_retry_after,
    )


def _up(args: argparse.Namespace) -> None:
    from .up import run

    run(_settings(), _client_settings())


def _tokens(args: argparse.Namespace) -> None:
    import asyncio

    from .tokens import run_command

    raise SystemExit(asyncio.run(run_command(args, _admin_settings())))


def _status(args: argparse.Namespace) -> None:
    import asyncio

    from .status import run

    try:
        raise SystemExit(asyncio.run(run(_admin_settings(), watch=args.watch)))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


def _migrate_keys(args: argparse.Namespace) -> None:
    import asyncio

    from .migrate import run

    raise SystemExit(asyncio.run(run(_admin_settings(), force=args.force, dry_run=args.dry_run)))


def _command(
    sub: argparse._SubParsersAction, name: str, summary: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 78),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sluice`` command."""
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="Self-hosted OpenAI-compatible Batch API service.",
        epilog="`sluice COMMAND --help` tells what a command does and which environment variables it reads.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(
        sub,
        "web",
        "serve the Files and Batches APIs on $PORT",
        "Serve the Files and Batches APIs, validate new batches and feed their lines to the workers. "
        "Stops on SIGTERM or Ctrl-C, letting requests under way finish.",
        WEB_ENV,
    ).set_defaults(func=_web)
    _command(
        sub,
        "worker",
        "call the provider for queued request lines",
        "Read request lines from Redis, call the provider, record each result once. Stops on SIGTERM or "
        "Ctrl-C, letting requests in flight finish and handing the rest back.",
        WORKER_ENV,
    ).set_defaults(func=_worker)
    _command(
        sub,
        "finalizer",
        "write result files and end batches",
        "Write the output and error files of running batches and move them to their final state "
        "(run any number: they share the running batches, a lease per batch).",
        FINALIZER_ENV,
    ).set_defaults(func=_finalizer)
    _command(
        sub,
        "up",
        "run the whole stack locally (its own Redis, mock provider unless configured)",
        "Run Redis, the web, one worker, the finalizer and a mock provider on this machine, print how to use "
        "them, and write their connection details to $SLUICE_DATA_DIR/stack.json for the other commands. "
        "Ctrl-C stops them in order: the web, the worker (drained), the finalizer, Redis last; a second "
        "Ctrl-C kills them.",
        UP_ENV,
    ).set_defaults(func=_up)
    status = _command(
        sub,
        "status",
        "show live workers, running batches and provider state",
        "The cluster at a glance, read from Redis: processes and their heartbeats, running batches, "
        "providers. Exits with 1 when Redis does not answer.",
        STATUS_ENV,
    )
    status.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    status.set_defaults(func=_status)
    tokens = _command(
        sub,
        "tokens",
        "manage API tokens stored (as digests) in Redis",
        "Create, list and revoke API tokens kept in Redis (only as SHA-256 digests), besides the "
        "static SLUICE_API_TOKENS.",
        TOKENS_ENV,
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="{create,list,revoke}")
    create = _command(
        tokens_sub,
        "create",
        "create a token and print it once",
        "Create a token and print it on stdout, once: it is stored only as a digest. Quotas not "
        "given are the defaults ([quotas] of SLUICE_CONFIG).",
        TOKENS_ENV,
    )
    create.add_argument("--name", required=True, help="a unique name, to list and revoke it by")
    create.add_argument("--max-active-batches", type=int, metavar="N", help="unfinished batches at a time")
    create.add_argument("--max-stored-bytes", type=int, metavar="N", help="bytes of files kept (uploads and results)")
    create.add_argument("--max-enqueued-lines", type=int, metavar="N", help="lines of unfinished batches")
    _command(
        tokens_sub,
        "list",
        "list tokens (never the tokens themselves)",
        "List the managed tokens: name, id (a digest prefix), creation time, quotas.",
        TOKENS_ENV,
    ).add_argument("--json", action="store_true", help="print a JSON array")
    _command(
        tokens_sub,
        "revoke",
        "revoke a token by name",
        "Revoke a token: every web process refuses it within 5 s.",
        TOKENS_ENV,
    ).add_argument("name", help="the name given at creation")
    tokens.set_defaults(func=_tokens)
    migrate = _command(
        sub,
        "migrate-keys",
        "move a stopped deployment's Redis data to this version's key layout",
        "Move the files, batches, managed tokens, owners' usage and counters of a deployment from the key "
        "layout of the versions before Redis Cluster support to this version's, on one Redis, with every "
        "Sluice process stopped. Safe to run twice and to interrupt and run again.",
        MIGRATE_ENV,
    )
    migrate.add_argument("--dry-run", action="store_true", help="print what would move; change nothing")
    migrate.add_argument(
        "--force", action="store_true", help="run even though a process beat in the last minute (it is dead)"
    )
    migrate.set_defaults(func=_migrate_keys)
    mock = _command(
        sub,
        "mock-provider",
        "run a fake OpenAI-compatible upstream (development)",
        "A deterministic fake upstream: chat completions, completions, embeddings, responses and moderations.",
        MOCK_ENV,
    )
    mock.add_argument("--port", type=int, default=8001, help="port to listen on (default 8001; 0: any free port)")
    mock.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    mock.add_argument("--latency-ms", type=float, default=0.0, metavar="MS", help="delay before each answer")
    mock.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of requests failed, half with 429 and half with 500 (0..1)",
    )
    mock.add_argument("--seed", type=int, default=None, help="seed of the random errors")
    mock.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="answer 429 beyond N in flight")
    mock.add_argument("--rpm", type=int, default=None, metavar="N", help="accepted requests per minute (sliding)")
    mock.add_argument(
        "--window-s", type=float, default=60.0, metavar="S", help="rpm window: floor(rpm*S/60) requests per S seconds"
    )
    mock.add_argument("--no-retry-after", action="store_true", help="send no Retry-After header with a 429")
    batch = mock.add_argument_group("its Batch API (delegated batches)")
    batch.add_argument("--batch-line-ms", type=float, default=0.0, metavar="MS", help="time each batch line takes")
    batch.add_argument("--batch-start-ms", type=float, default=0.0, metavar="MS", help="time a batch validates")
    batch.add_argument("--batch-cancel-ms", type=float, default=0.0, metavar="MS", help="time a batch cancels")
    batch.add_argument(
        "--batch-window-ms",
        type=float,
        default=None,
        metavar="MS",
        help="a batch still running this long after creation expires",
    )
    mock.set_defaults(func=_mock_provider)
    from .commands import (
        add_client_commands,  # submit, batches, files: an HTTP client of the API
    )

    add_client_commands(sub)
    return parser


def _quiet_stdout() -> None:
    # The reader went away (`| head`): further writes, and the flush at exit, must not fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sluice`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(1) from None
    except SystemExit:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
            raise SystemExit(1) from None
        raise


if __name__ == "__main__":
    main()
