"""Which files an `input_uri` names: a file, a directory, a glob or a list of them, local or s3://.

Listing and reads go through pyarrow filesystems (`storage.arrow_filesystem`): S3 with the standard AWS
credential chain and `BABELSYNTH_S3_ENDPOINT_URL` / `AWS_ENDPOINT_URL` for non-AWS stores.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from babelsynth import storage

GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputFile:
    uri: str  # local path or s3://bucket/key
    rel: str  # path below the entry it came from: stable names for positional record ids
    size: int


def glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob on '/'-separated paths: `*` and `?` stay inside one segment, `**` crosses them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _scheme(uri: str) -> str:
    return "s3://" if uri.startswith("s3://") else ""


def _visible(rel: str) -> bool:
    return not any(part.startswith((".", "_")) for part in rel.split("/"))


def _list(uri: str) -> list[tuple[str, int]]:
    """(path inside the filesystem, size) of every file under a directory, recursively."""
    from pyarrow import fs as pafs

    fs, path = storage.arrow_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((i.path, i.size) for i in infos if i.type == pafs.FileType.File)


def _entry(uri: str, suffixes: tuple[str, ...]) -> list[InputFile]:
    from pyarrow import fs as pafs

    scheme = _scheme(uri)
    fs, path = storage.arrow_filesystem(uri)
    m = GLOB_CHARS.search(path)
    if m:  # a glob: list the folder above its first wildcard, keep what matches
        base = posixpath.dirname(path[: m.start()])
        rx = glob_regex(path[len(base) :].lstrip("/"))
        found = []
        for p, size in _list(scheme + base):
            rel = posixpath.relpath(p, base)
            if rx.match(rel) and _visible(rel):
                found.append(InputFile(scheme + p, rel, size))
        return found
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return [
            InputFile(scheme + p, posixpath.relpath(p, path), size)
            for p, size in _list(uri)
            if p.endswith(suffixes) and _visible(posixpath.relpath(p, path))
        ]
    if info.type == pafs.FileType.File:
        return [InputFile(uri, posixpath.basename(path), info.size)]
    return []


def resolve(input_uri: str | list[str], suffixes: tuple[str, ...]) -> list[InputFile]:
    """Every input file, in a stable order (entries as given, files sorted within each)."""
    entries = [input_uri] if isinstance(input_uri, str) else list(input_uri)
    files: list[InputFile] = []
    seen: set[str] = set()
    for e in entries:
        found = _entry(e, suffixes)
        if not found:
            raise ValueError(
                f"input_uri {e!r} matched no input file (a directory is searched for {', '.join(suffixes)})"
            )
        for f in found:
            if f.uri not in seen:
                seen.add(f.uri)
                files.append(f)
    if len({f.rel for f in files}) < len(files):  # two entries hold files of the same name: use full paths
        files = [InputFile(f.uri, f.uri.removeprefix("s3://").lstrip("/"), f.size) for f in files]
    return files
