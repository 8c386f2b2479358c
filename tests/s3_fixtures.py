"""A real S3-protocol server on 127.0.0.1 for slow tests (moto's standalone server), its buckets, and a
`pathlib.Path`-like view of a bucket folder so that the local-folder test helpers read S3 unchanged.

``s3_server`` (module-scoped) starts ``moto_server -H 127.0.0.1 -p PORT`` in a session of its own, waits until it
answers, and stops exactly that process afterwards, also when a test fails. ``s3_bucket`` creates a fresh bucket
and yields the storage URI a sweep is given, ``s3://BUCKET/rr?endpoint_override=127.0.0.1:PORT&scheme=http``
(pyarrow's and so Ray Tune's query parameters), and empties and deletes the bucket afterwards. The credentials
are moto's dummy ones (any key is accepted), region ``us-east-1``: `S3_ENV` is what every process that talks to
the server gets (README "S3 storage").
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.cluster_fixtures import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}   # no instance-metadata lookups for credentials
START_TIMEOUT_S = 60.0


class S3Server(NamedTuple):
    endpoint: str        # host:port
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self):
        """A boto3 S3 client of this server (moto installs boto3)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                            region_name=S3_ENV["AWS_DEFAULT_REGION"])

    def uri(self, bucket: str, path: str = "") -> str:
        """`s3://bucket/path?...` as pyarrow and Ray Tune read it: this endpoint, plain HTTP."""
        return f"s3://{bucket}/{path}".rstrip("/") + f"?endpoint_override={self.endpoint}&scheme=http"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)   # its own session: the server and nothing else
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, stopped when the module's tests are done (also on failure)."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if moto is None:
        pytest.fail("moto_server is not installed: pip install -c constraints.txt -e '.[dev]'")
    port = free_port()
    process = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **S3_ENV})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server on 127.0.0.1:{port} did not start") from None
                time.sleep(0.2)
        yield S3Server(f"127.0.0.1:{port}", process)
    finally:
        _stop(process)


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty bucket (its name); emptied and deleted after the test, also when it fails. Sets S3_ENV."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    bucket = f"tune-bir-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)


class ArrowPath:
    """The part of `pathlib.Path` the sweep test helpers use (`/`, `glob`, `exists`, `read_text`, `name`), over a
    pyarrow filesystem: `ArrowPath.of("s3://b/rr/x?endpoint_override=...")` reads a bucket folder like a local one."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path.rstrip("/")

    @classmethod
    def of(cls, uri: str) -> ArrowPath:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        return cls(fs, path)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __truediv__(self, part: str) -> ArrowPath:
        return ArrowPath(self.fs, f"{self.path}/{part}")

    def __str__(self) -> str:
        return self.path

    def __lt__(self, other: ArrowPath) -> bool:
        return self.path < other.path

    def exists(self) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def glob(self, pattern: str) -> list[ArrowPath]:
        """Matches of a relative pattern, one `/`-separated level per part (no `**`)."""
        import pyarrow.fs

        found = [self]
        for part in pattern.split("/"):
            matched = []
            for folder in found:
                selector = pyarrow.fs.FileSelector(folder.path, allow_not_found=True, recursive=False)
                matched += [ArrowPath(self.fs, info.path) for info in self.fs.get_file_info(selector)
                            if fnmatch.fnmatchcase(info.base_name, part)]
            found = matched
        return sorted(found)

    def copy_to(self, local: Path) -> Path:
        """The whole folder copied to `local` (a local folder), e.g. to compare with a local sweep's."""
        import pyarrow.fs

        local.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.path, str(local), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return local
