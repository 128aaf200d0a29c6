"""Training output: written to node-local scratch, then uploaded to the run's output URI (S3 or a path).

Training writes large files fast (checkpoints, exported models), which object stores cannot take as a
filesystem, so everything is first written under `scratch` and uploaded when complete. Each uploaded
directory has one file that is uploaded last (its marker: trainer_state.json of a checkpoint,
phase_result.json of a phase, merge.json of a merge): a directory without its marker is incomplete and
ignored, so an upload cut short never looks like a checkpoint. Resume reads the remote side, so a retry
on another node (empty scratch) continues from the last uploaded checkpoint.

Remote layout under the output URI (local scratch mirrors it):

    alignment/  sft/                 exported HF model dirs (+ phase_result.json, the marker)
    checkpoints/<phase>/step-NNNNNNN/ FSDP checkpoint (torch.distributed.checkpoint) + trainer_state.json
    merged/                          the merge at merge.alpha (bf16) + merge.json
    eval.json  summary.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from babelsynth import storage


def default_scratch(out_uri: str) -> Path:
    """$BABELSYNTH_TRAIN_SCRATCH, else a temp dir keyed by the output URI (a retry on the same node
    finds its own scratch again)."""
    root = os.environ.get("BABELSYNTH_TRAIN_SCRATCH") or os.path.join(
        tempfile.gettempdir(), "babelsynth-train"
    )
    return Path(root) / hashlib.sha256(out_uri.encode()).hexdigest()[:16]


class Outputs:
    """One training run's output: `local(rel)` in scratch, `remote(rel)` under the output URI."""

    def __init__(self, out_uri: str, scratch: str | os.PathLike | None = None):
        self.uri = out_uri.rstrip("/")
        self.scratch = Path(scratch) if scratch else default_scratch(self.uri)
        self.s3 = self.uri.startswith("s3://")
        self.same = not self.s3 and self._local_path(self.uri).resolve() == self.scratch.resolve()

    @staticmethod
    def _local_path(uri: str) -> Path:
        return Path(uri[len("file://") :]) if uri.startswith("file://") else Path(uri)

    def local(self, rel: str = "") -> Path:
        return self.scratch / rel if rel else self.scratch

    def remote(self, rel: str = "") -> str:
        return storage.join(self.uri, rel) if rel else self.uri

    # ------------------------------------------------------------------------------------------- listing
    def remote_files(self, rel: str) -> list[str]:
        """Paths relative to remote(rel) of every file under it (dotfiles included: DCP's .metadata)."""
        if self.s3:
            base = self.remote(rel).rstrip("/") + "/"
            return [u[len(base) :] for u in storage.list_prefix(self.remote(rel))]
        root = self._local_path(self.remote(rel))
        if not root.is_dir():
            return []
        return sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.name
        )

    def remote_exists(self, rel: str) -> bool:
        return storage.exists(self.remote(rel))

    def read_remote_json(self, rel: str) -> dict | None:
        return json.loads(storage.read_bytes(self.remote(rel))) if self.remote_exists(rel) else None

    # ------------------------------------------------------------------------------------------- transfer
    def upload_dir(self, rel: str, last: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """Every file under local(rel) to remote(rel); `last` (the marker) after all the others."""
        if self.same:
            return
        root = self.local(rel)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        for f in files:
            if f != last and f not in skip:
                storage.upload_file(root / f, storage.join(self.remote(rel), f))
        if last is not None and (root / last).exists():
            storage.upload_file(root / last, storage.join(self.remote(rel), last))

    def upload_file(self, rel: str) -> None:
        if not self.same:
            storage.upload_file(self.local(rel), self.remote(rel))

    def download_dir(self, rel: str) -> Path:
        """remote(rel) into local(rel), atomically (temp dir + rename); returns the local dir."""
        dst = self.local(rel)
        if self.same:
            return dst
        tmp = dst.with_name(f".{dst.name}.download")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in self.remote_files(rel):
            storage.download_file(storage.join(self.remote(rel), f), tmp / f)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return dst

    def delete_remote(self, rel: str, marker: str | None = None) -> None:
        """Marker first, so a delete cut short leaves an incomplete (ignored) dir, never a broken one."""
        if self.same:
            return
        if marker:
            storage.delete(storage.join(self.remote(rel), marker))
        if self.s3:
            storage.delete_prefix(self.remote(rel))
        else:
            shutil.rmtree(self._local_path(self.remote(rel)), ignore_errors=True)
