"""One small storage layer for local paths and S3 URIs.

Writes are atomic (temp + rename locally; a single PUT on S3), so a reader never sees a half-written
shard. Everything above this module speaks URIs (`/abs/path`, `file:///abs/path`, `s3://bucket/key`).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> Path:
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


def local_path(uri: str) -> Path | None:
    """The filesystem path of a local URI (a path or file://); None for S3."""
    return None if _is_s3(uri) else _local(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


class StoragePermissionError(PermissionError):
    """The store refused access (HTTP 403): a wrong credential or policy, never taken for "missing"."""


def _s3_client():
    import boto3  # lazy: only S3 users pay for it
    from botocore.config import Config

    # Throttling (503 SlowDown), 5xx and connection resets are retried with backoff, a request at a time;
    # the whole body is sent again, so a PUT is never half-applied.
    retries = {"mode": "standard", "max_attempts": s3_max_attempts()}
    config = Config(retries=retries, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=config)


def _split_s3(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    return u.netloc, u.path.lstrip("/")


def read_bytes(uri: str) -> bytes:
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return _local(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old object or the whole new one, never a prefix."""
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = _local(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            _s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return False
            if status == 403 or code in ("403", "AccessDenied", "Forbidden"):
                raise StoragePermissionError(
                    f"access to {uri} denied (HTTP 403): check the credentials and the bucket policy; "
                    "it is not treated as missing"
                ) from None
            raise
    return _local(uri).exists()


def list_prefix(uri: str) -> list[str]:
    """All object URIs under a prefix (recursive), sorted."""
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        prefix = key.rstrip("/") + "/"
        out: list[str] = []
        for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])]
        return sorted(out)
    root = _local(uri)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def delete(uri: str) -> None:
    """Remove one object or file; a missing one is not an error (retries stay idempotent)."""
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        _local(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    for u in list_prefix(uri):
        delete(u)


def delete_tree(uri: str) -> None:
    """Everything under a prefix; locally the directories too (hidden temp files included)."""
    if _is_s3(uri):
        delete_prefix(uri)
    else:
        import shutil

        if _local(uri).exists():  # a missing tree is not an error (retries stay idempotent)
            shutil.rmtree(_local(uri))


def s3_endpoint() -> str | None:
    """A non-AWS S3 endpoint (MinIO, a local S3 server); None means AWS itself."""
    return os.environ.get("BABELSYNTH_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_max_attempts() -> int:
    return int(os.environ.get("BABELSYNTH_S3_MAX_ATTEMPTS", "8"))


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to `uri` without reading it into memory (S3: managed multipart upload;
    local: copy to a temp name + rename, so a reader never sees a partial file)."""
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client().upload_file(str(path), bucket, key)
        return
    import shutil

    dst = _local(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(uri: str, path: str | os.PathLike) -> None:
    """Copy `uri` to a local file without reading it into memory; the file appears complete or not at all."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if _is_s3(uri):
            bucket, key = _split_s3(uri)
            _s3_client().download_file(bucket, key, tmp)
        else:
            import shutil

            shutil.copyfile(_local(uri), tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _s3_filesystem(endpoint: str | None, region: str | None):
    from pyarrow import fs

    # the standard AWS credential chain (env, ~/.aws, instance profile); only the endpoint is ours
    # the same retry budget as the boto3 client: throttling, 5xx and resets are retried with backoff
    retry = fs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts())
    return fs.S3FileSystem(endpoint_override=endpoint, region=region or "us-east-1", retry_strategy=retry)


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI: reads through it are ranged (S3 GETs with a Range)."""
    if _is_s3(uri):
        bucket, key = _split_s3(uri)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(s3_endpoint(), region), f"{bucket}/{key}"
    from pyarrow import fs

    return fs.LocalFileSystem(), str(_local(uri).absolute())


def open_input(uri: str):
    """A random-access file (pyarrow NativeFile): only the byte ranges asked for are read."""
    fs, path = arrow_filesystem(uri)
    return fs.open_input_file(path)


def parquet_source(uri: str):
    """What pyarrow reads: a local path, or a ranged S3 file (never the whole object in memory)."""
    return open_input(uri) if _is_s3(uri) else _local(uri)
