"""A real S3-protocol server for tests: moto's, over HTTP, in this process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

from modelpress import _stack

CREDS = {"aws_access_key_id": "AKIDTEST", "aws_secret_access_key": "secret-test"}


class Moto:
    """moto's S3 server. Its buckets live in this process, so a server started again on the same
    port serves the same objects, as a restarted S3 endpoint would."""

    def __init__(self) -> None:
        self.port = _stack.free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **CREDS)

    def env(self, store_url: str, **extra: str) -> dict[str, str]:
        """The settings a production deployment sets to use this server as its store."""
        return {"MODELPRESS_STORE_URL": store_url, "MODELPRESS_S3_ENDPOINT": self.endpoint,
                "MODELPRESS_S3_REGION": "us-east-1",
                "MODELPRESS_S3_ACCESS_KEY_ID": CREDS["aws_access_key_id"],
                "MODELPRESS_S3_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"],
                "MODELPRESS_S3_ALLOW_HTTP": "true", **extra}


def serving(bucket: str) -> Iterator[Moto]:
    """A running server with ``bucket`` created, stopped afterwards: a module fixture's body is
    ``yield from serving(BUCKET)``."""
    m = Moto()
    m.start()
    try:
        m.client().create_bucket(Bucket=bucket)
        yield m
    finally:
        m.stop()
