"""An S3-compatible endpoint on loopback for the tests: moto's server mode (``moto_server``) in a subprocess,
reached through s3fs exactly as a deployment reaches AWS S3 or MinIO (credentials and endpoint from the
standard ``AWS_*`` environment variables, which botocore reads)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    env: dict[str, str]  # what a process needs in its environment to reach the endpoint

    def new_bucket(self) -> str:
        """A fresh bucket: ``s3://<bucket>`` (tests never share one)."""
        import s3fs

        name = f"retrogen-{uuid.uuid4().hex[:16]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command() -> list[str] | None:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else None


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """Start ``moto_server`` on a free loopback port for the session; the process environment points botocore
    at it (and at fake credentials). Missing moto skips, except in CI (``CI=true``), where it fails."""
    command = _server_command()
    if command is None:
        if os.environ.get("CI") == "true":
            pytest.fail("moto_server is not installed (the dev extra's moto[server])")
        pytest.skip("moto_server is not installed (the dev extra's moto[server])")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield S3Endpoint(url, env)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
