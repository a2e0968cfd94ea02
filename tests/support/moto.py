"""An S3-compatible object store: moto's server mode, on loopback, in memory."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .env import STARTUP_TIMEOUT_S, base_env
from .http import http_request
from .ports import free_port
from .processes import ManagedProcess, ProcessDied, ProcessRunner, raise_if_exited
from .waiting import wait_until

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class MotoServer:
    """``python -m moto.server`` on a free loopback port; it keeps everything in memory."""

    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        """A boto3 S3 client for it (synchronous: for set-up and checks)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


def start_moto(runner: ProcessRunner, *, attempts: int = 3) -> MotoServer:
    """Start moto's server on a free port of 127.0.0.1 and wait until it answers."""
    last_error: BaseException | None = None
    for _ in range(attempts):
        port = free_port()
        proc = runner.start(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**base_env(), **S3_CREDENTIALS},
            stop_stage=0,
        )
        server = MotoServer(port, proc)
        try:
            wait_until(
                lambda server=server: http_request("GET", f"{server.url}/moto-api/", timeout=2).status < 500,
                timeout=STARTUP_TIMEOUT_S,
                interval=0.1,
                message=f"moto server on port {port} to answer",
                ignore=(OSError,),
                check=lambda proc=proc: raise_if_exited(proc),
            )
            return server
        except ProcessDied as exc:  # most likely the port was taken in the meantime: retry
            last_error = exc
            proc.stopping = True
    raise AssertionError(f"could not start moto server: {last_error}")


@dataclass
class S3Bucket:
    """One bucket on a :class:`MotoServer`, with the prefix Sluice stores under."""

    server: MotoServer
    name: str
    prefix: str = "sluice"

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes a Sluice process store file contents here."""
        return {
            **S3_CREDENTIALS,
            "SLUICE_STORAGE_URL": f"s3://{self.name}/{self.prefix}",
            "SLUICE_S3_ENDPOINT_URL": self.server.url,
        }

    def keys(self) -> list[str]:
        """Every object name in the bucket."""
        client = self.server.client()
        found = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            found += [obj["Key"] for obj in page.get("Contents", ())]
        return found
