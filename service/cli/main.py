"""The ``sluice`` command: one subcommand per process type, ``up`` for the local stack, and a client of the API."""

from __future__ import annotations

import argparse
import sys

from service.core.config import ConfigError, Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as e:
        print(f"sluice: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _web(args: argparse.Namespace) -> None:
    from service.web.app import run

    settings = _settings()
    if not settings.api_tokens:
        print("sluice: SLUICE_API_TOKENS is empty; only tokens made with `sluice tokens create` will work",
              file=sys.stderr)
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
    )


def _up(args: argparse.Namespace) -> None:
    from .up import run

    run(_settings())


def _tokens(args: argparse.Namespace) -> None:
    import asyncio

    from .tokens import run_command

    raise SystemExit(asyncio.run(run_command(args, _settings())))


def _status(args: argparse.Namespace) -> None:
    import asyncio

    from .status import run

    try:
        raise SystemExit(asyncio.run(run(_settings(), watch=args.watch)))
    except KeyboardInterrupt:
        raise SystemExit(0) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sluice`` command."""
    parser = argparse.ArgumentParser(prog="sluice", description="Self-hosted OpenAI-compatible Batch API service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("web", help="serve the Files and Batches APIs on $PORT").set_defaults(func=_web)
    sub.add_parser("worker", help="call the provider for queued request lines").set_defaults(func=_worker)
    sub.add_parser("finalizer", help="write result files and end batches").set_defaults(func=_finalizer)
    sub.add_parser("up", help="run the whole stack locally (embedded Redis and mock provider)").set_defaults(func=_up)
    status = sub.add_parser("status", help="show live workers, running batches and provider state")
    status.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    status.set_defaults(func=_status)
    tokens = sub.add_parser("tokens", help="manage API tokens stored (as digests) in Redis")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--max-active-batches", type=int)
    create.add_argument("--max-stored-bytes", type=int)
    create.add_argument("--max-enqueued-lines", type=int)
    tokens_sub.add_parser("list", help="list tokens (never the tokens themselves)").add_argument(
        "--json", action="store_true")
    tokens_sub.add_parser("revoke", help="revoke a token by name").add_argument("name")
    tokens.set_defaults(func=_tokens)
    mock = sub.add_parser("mock-provider", help="run a fake OpenAI-compatible upstream")
    mock.add_argument("--port", type=int, default=8001)
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--error-rate", type=float, default=0.0)
    mock.add_argument("--seed", type=int, default=None)
    mock.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="answer 429 beyond N in flight")
    mock.add_argument("--rpm", type=int, default=None, metavar="N", help="accepted requests per minute (sliding)")
    mock.add_argument(
        "--window-s", type=float, default=60.0, metavar="S", help="rpm window: floor(rpm*S/60) requests per S seconds"
    )
    batch = mock.add_argument_group("its Batch API (delegated batches)")
    batch.add_argument("--batch-line-ms", type=float, default=0.0, metavar="MS", help="time each batch line takes")
    batch.add_argument("--batch-start-ms", type=float, default=0.0, metavar="MS", help="time a batch validates")
    batch.add_argument("--batch-cancel-ms", type=float, default=0.0, metavar="MS", help="time a batch cancels")
    batch.add_argument("--batch-window-ms", type=float, default=None, metavar="MS",
                       help="a batch still running this long after creation expires")
    mock.set_defaults(func=_mock_provider)
    from .commands import (
        add_client_commands,  # submit, batches, files: an HTTP client of the API
    )

    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sluice`` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
