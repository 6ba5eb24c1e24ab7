"""The disk spool: batches the store could not take, kept until it acknowledges them.

One file per batch, written to a temporary name, fsynced, then renamed (and the folder fsynced),
so a crash leaves either a whole batch or none. Files are named by a growing sequence number and
replayed oldest first; a file is deleted only after the store has acknowledged its batch. Replaying
a batch twice (a crash between acknowledgement and deletion) is harmless: writes are idempotent
on request_id.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gateway.usage.record import UsageRecord


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in directory.glob("*.tmp"):
            leftover.unlink()  # a write that never completed; its batch was still queued or spooled again
        self.size = sum(p.stat().st_size for p in self.files())
        self._seq = 0

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.batch"))

    def has_room(self) -> bool:
        return self.size < self.max_bytes

    def append(self, batch: list[UsageRecord]) -> Path:
        """Write one batch durably (blocking: call it from a worker thread)."""
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}"
        tmp = self.directory / (name + ".tmp")
        data = "".join(json.dumps(list(r), separators=(",", ":")) + "\n" for r in batch).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.directory / (name + ".batch")
        os.rename(tmp, final)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.size += len(data)
        return final

    @staticmethod
    def read(path: Path) -> list[UsageRecord]:
        """A batch's records; none if another worker replayed and removed it meanwhile."""
        try:
            with path.open() as f:
                return [UsageRecord(*json.loads(line)) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        # Counted out before the file goes, so nobody sees an empty spool with bytes still in it.
        self.size = max(0, self.size - size)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            self.size += size  # still on disk, still counted against the cap
            raise
