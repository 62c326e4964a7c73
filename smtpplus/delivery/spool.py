"""
The message spool under C{state_dir/spool}: C{tmp/} holds messages being
received (written out at the end of DATA, or earlier when large), C{msg/}
holds accepted ones, one file per queue id, and C{free/} holds the files of
finished messages, kept for reuse.

A file reaches C{msg/} only by rename after an fsync of its content, and the
rename is made durable by an fsync of the directory.  Every method that
syncs or reads is meant for a worker thread; only L{TempMessage.write}
runs on the reactor.

Why C{free/}: creating a file costs an inode allocation, and on ext4 that
search skips every recently deleted inode, so a spool that creates and
deletes hundreds of files a second spent a quarter of the daemon's CPU in
C{open(O_CREAT)}.  A finished small message's file is renamed into C{free/}
instead of deleted, and the next message is written over it and renamed
into C{msg/}: no inode is allocated or freed per message.
"""

from __future__ import annotations

import base64
import errno
import os
from collections import deque
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from twisted.logger import Logger

from smtpplus.smtp.interfaces import SMTPReply

log = Logger()

_WRITE_BUFFER = 64 * 1024
# A message up to this size is held in memory until the end of DATA (as a
# buffered file would hold it anyway), and read whole for relaying.
MEMORY_LIMIT = 64 * 1024
# Files kept in free/ for reuse: enough for the messages in flight of a busy
# daemon; each holds at most MEMORY_LIMIT bytes of disk.
FREE_LIMIT = 1024


# Random bytes for ids, drawn from the OS a page at a time rather than with
# one getrandom() call per message.
_random = bytearray()


def new_queue_id(now: float) -> str:
    """
    A short, URL-safe, unique id: 48 bits of milliseconds and 32 random
    bits, base32 (16 characters, no padding).
    """
    if not _random:
        _random.extend(os.urandom(4096))
    millis = int(now * 1000) & (2**48 - 1)
    raw = millis.to_bytes(6, "big") + _random[-4:]
    del _random[-4:]
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
        self._spool = spool
        self.id = message_id
        self.path = os.path.join(spool.tmp_dir, message_id)
        self.final_path = spool.path(message_id)
        self.size = 0
        self.error: OSError | None = None
        # What was written, once synced, when it was held in memory: the
        # first delivery attempt sends it without reading the file back.
        self.content: bytes | None = None
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
            self._file = self._spool.reuse()
            if self._file is None:
                self._file = open(self.path, "wb")  # noqa: SIM115 - closed below or by discard
            else:
                self.path = self._file.name
            self.content = b"".join(self._chunks)
            self._chunks = []
            self._file.write(self.content)
            self._file.truncate()
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
        self.free_dir = os.path.join(root, "free")
        for path in (root, self.tmp_dir, self.msg_dir, self.free_dir):
            os.makedirs(path, mode=0o750, exist_ok=True)
        # Names in free/; worker threads share it (deque appends and pops
        # are atomic), so its length is a bound, not an exact count.
        self._free: deque[str] = deque()

    def reuse(self) -> BinaryIO | None:
        """A file from C{free/} opened for overwriting, or None when there is none (worker thread)."""
        while True:
            try:
                name = self._free.pop()
            except IndexError:
                return None
            try:
                return open(os.path.join(self.free_dir, name), "r+b")  # noqa: SIM115 - the caller closes it
            except OSError as e:
                log.warn("cannot reuse spool file {name}: {error}", name=name, error=e)

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
        """Retire accepted messages that are finished: into C{free/} when small, else deleted (worker thread)."""
        for message_id in message_ids:
            path = self.path(message_id)
            try:
                if len(self._free) < FREE_LIMIT and os.stat(path).st_size <= MEMORY_LIMIT:
                    os.rename(path, os.path.join(self.free_dir, message_id))
                    self._free.append(message_id)
                else:
                    os.unlink(path)
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
        self._free.clear()
        for name in os.listdir(self.free_dir):
            if len(self._free) < FREE_LIMIT:
                self._free.append(name)
            else:
                os.unlink(os.path.join(self.free_dir, name))
        return partial, orphans
