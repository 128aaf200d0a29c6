"""One small storage layer for local paths and S3 URIs.

Writes are atomic (temp + rename locally; a single PUT on S3), so a reader never sees a half-written
shard. Everything above this module speaks URIs (`/abs/path`, `file:///abs/path`, `s3://bucket/key`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> Path:
    return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _s3_client():
    import boto3  # lazy: only S3 users pay for it

    endpoint = os.environ.get("BABELSYNTH_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


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
        except ClientError:
            return False
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


def parquet_source(uri: str):
    """What pyarrow reads: a local path (memory-mapped, read lazily) or the S3 object's bytes."""
    import io

    return io.BytesIO(read_bytes(uri)) if _is_s3(uri) else _local(uri)
