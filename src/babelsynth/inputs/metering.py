"""Byte accounting of input reads: what a shard task really pulled from storage, and buffered scans.

The runner wraps every input file a shard opens in a `Meter`, so the ingest stats (and the manifest) say
how many bytes each shard read against the bytes its plan assigned it: the proof that a shard reads its
own ranges and not the whole input. `inspect-input` and the I/O benchmark use the same counter.
"""

from __future__ import annotations

import io


class Meter:
    """Counts bytes and read calls through the files it wraps."""

    def __init__(self) -> None:
        self.bytes = 0
        self.reads = 0

    def wrap(self, native):
        """A pyarrow file reading through `native` (a pyarrow NativeFile), counting what it reads."""
        import pyarrow as pa

        return pa.PythonFile(CountingReader(native, self), mode="r")


class RangeFile(io.RawIOBase):
    """A seekable raw file over a pyarrow random-access file: subclasses say how `read` fetches bytes."""

    pos: int
    length: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class CountingReader(RangeFile):
    """Sequential/seekable view of a pyarrow random-access file that adds every read to a Meter."""

    def __init__(self, native, meter: Meter):
        super().__init__()
        self.native, self.meter = native, meter
        self.pos = 0
        self.length = native.size()

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        if n <= 0:
            return b""
        data = self.native.read_at(n, self.pos)
        self.pos += len(data)
        self.meter.bytes += len(data)
        self.meter.reads += 1
        return data

    def close(self) -> None:
        self.native.close()
        super().close()


class ReadAhead(RangeFile):
    """A seekable reader over a random-access file that fetches `block` bytes at a time.

    Scanning tar headers reads 512 bytes, then seeks past the member: on S3 each small read is one GET, so
    headers are read through blocks (a member smaller than the block costs no extra request)."""

    def __init__(self, native, block: int = 1 << 20):
        super().__init__()
        self.native, self.block = native, block
        self.length = native.size()
        self.pos = 0
        self.buf_start, self.buf = 0, b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.length - self.pos
        out = bytearray()
        while n > 0 and self.pos < self.length:
            lo = self.pos - self.buf_start
            if not 0 <= lo < len(self.buf):
                self.buf_start = self.pos
                self.buf = self.native.read_at(min(max(self.block, n), self.length - self.pos), self.pos)
                lo = 0
            piece = self.buf[lo : lo + n]
            out += piece
            self.pos += len(piece)
            n -= len(piece)
        return bytes(out)
