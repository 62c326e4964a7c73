"""
The message spool under C{state_dir/spool}: C{tmp/} holds messages being
received (written out at the end of DATA, or earlier when large), C{msg/}
holds accepted ones, one file per queue id.

A file reaches C{msg/} only by rename after an fsync of its content, and the
rename is made durable by an fsync of the directory.  Every method that
syncs or reads is meant for a worker thread; only L{TempMessage.write}
runs on the reactor.
"""

from __future__ import annotations

import base64
import errno
import os
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from twisted.logger import Logger

from smtpplus.smtp.interfaces import SMTPReply

log = Logger()

_WRITE_BUFFER = 64 * 1024
# A message up to this size is held in memory until the end of DATA (as a
# buffered file would hold it anyway), and read whole for relaying.
MEMORY_LIMIT = 64 * 1024


def new_queue_id(now: float) -> str:
    """
    A short, URL-safe, unique id: 48 bits of milliseconds and 32 random
    bits, base32 (16 characters, no padding).
    """
    millis = int(now * 1000) & (2**48 - 1)
    raw = millis.to_bytes(6, "big") + os.urandom(4)
    return base64.b32encode(raw).decode("ascii")


def local_failure(error: BaseException) -> SMTPReply:
    """The temporary reply for a local storage failure: never 5xx, never 250."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or "full" in str(error).lower()
    if full:
        return SMTPReply(452, "4.3.1", "Insufficient system storage, try again later")
    return SMTPReply(451, "4.3.0", "Local error in processing, try again later")


class TempMessage:
    """
    One message being received.  Up to L{MEMORY_LIMIT} bytes it stays in
    memory and the worker thread writes it out at the end of DATA, so that
    the reactor does not wait on the file system for a typical message;
    past that it spills into a file in C{tmp/} (buffered writes into the
    page cache, as Twisted's own C{FileMessage} does).
    """

    def __init__(self, spool: Spool, message_id: str) -> None:
        self.id = message_id
        self.path = os.path.join(spool.tmp_dir, message_id)
        self.final_path = spool.path(message_id)
        self.size = 0
        self.error: OSError | None = None
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        """Append C{data}; a failure is kept and reported at the end of DATA."""
        if self.error is not None:
            return
        self.size += len(data)
        if self._file is None:
            self._chunks.append(data)
            if self.size <= MEMORY_LIMIT:
                return
            data = b"".join(self._chunks)
            self._chunks = []
            try:
                self._file = open(self.path, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed by sync/discard
            except OSError as e:
                self.error = e
                return
        try:
            self._file.write(data)
        except OSError as e:
            self.error = e

    def sync(self) -> None:
        """Write out, fsync, close and rename into C{msg/} (worker thread)."""
        if self.error is not None:
            raise self.error
        if self._file is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed below or by discard
            self._file.write(b"".join(self._chunks))
            self._chunks = []
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self.path, self.final_path)

    def discard(self) -> None:
        """Close and delete, wherever the file is (worker thread)."""
        self._chunks = []
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        for path in (self.path, self.final_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("cannot remove {path}: {error}", path=path, error=e)


class Spool:
    """The spool directories; see the module docstring."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        self.msg_dir = os.path.join(root, "msg")
        for path in (root, self.tmp_dir, self.msg_dir):
            os.makedirs(path, mode=0o750, exist_ok=True)

    def create(self, message_id: str) -> TempMessage:
        """Open a new temporary file for C{message_id}."""
        return TempMessage(self, message_id)

    def path(self, message_id: str) -> str:
        """Where the accepted message C{message_id} lives."""
        return os.path.join(self.msg_dir, message_id)

    def make_durable(self, temps: Sequence[TempMessage]) -> list[OSError | None]:
        """
        Sync and rename every message of a batch, then fsync C{msg/} once for
        all of them (the group commit).  Returns one error or None per
        message, in order (worker thread).
        """
        errors: list[OSError | None] = []
        for temp in temps:
            try:
                temp.sync()
                errors.append(None)
            except OSError as e:
                temp.discard()
                errors.append(e)
        if any(e is None for e in errors):
            try:
                self._sync_directory(self.msg_dir)
            except OSError as e:
                for temp in temps:
                    temp.discard()
                return [e] * len(temps)
        return errors

    def _sync_directory(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_small(self, message_id: str) -> bytes | None:
        """The whole message if it is up to L{MEMORY_LIMIT} bytes, else None (worker thread)."""
        with open(self.path(message_id), "rb") as f:
            data = f.read(MEMORY_LIMIT + 1)
        return data if len(data) <= MEMORY_LIMIT else None

    def remove(self, message_ids: Iterable[str]) -> None:
        """Delete accepted messages that are finished (worker thread)."""
        for message_id in message_ids:
            try:
                os.unlink(self.path(message_id))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("cannot remove spooled message {id}: {error}", id=message_id, error=e)

    def recover(self, known_ids: set[str]) -> tuple[int, int]:
        """
        At start-up: delete partial files in C{tmp/} and files in C{msg/}
        that have no queue record (their commit never finished, so nobody
        was told 250).  Returns both counts.
        """
        partial = 0
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))
            partial += 1
        orphans = 0
        for name in os.listdir(self.msg_dir):
            if name not in known_ids:
                os.unlink(os.path.join(self.msg_dir, name))
                orphans += 1
        return partial, orphans
