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
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
# Threads that fsync the files of one batch at the same time: fsyncs that
# wait for the same journal commit share its cache flush, and on a virtual
# disk the flushes are what costs.
SYNC_THREADS = 16


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
        # A spilled message's buffered file, or else the descriptor the
        # worker thread writes the held content through.
        self._file: BinaryIO | None = None
        self._fd: int | None = None

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
                self._file = open(self.path, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed by finish/discard
            except OSError as e:
                self.error = e
                return
        try:
            self._file.write(data)
        except OSError as e:
            self.error = e

    def write_out(self) -> None:
        """Hand the whole content to the file system, unsynced (worker thread)."""
        if self.error is not None:
            raise self.error
        if self._file is not None:
            self._file.flush()
            return
        # Plain descriptors rather than a file object: six system calls a
        # message instead of fourteen, and after each one this thread has
        # to win the GIL back from the reactor.
        reused = self._spool.reuse()
        if reused is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        else:
            self._fd, self.path = reused
        self.content = b"".join(self._chunks)
        self._chunks = []
        view = memoryview(self.content)
        while view:
            view = view[os.write(self._fd, view) :]
        if reused is not None:
            os.ftruncate(self._fd, len(self.content))

    def _fileno(self) -> int:
        if self._fd is not None:
            return self._fd
        assert self._file is not None
        return self._file.fileno()

    def sync_content(self) -> None:
        """fsync what L{write_out} wrote (worker thread)."""
        os.fsync(self._fileno())

    def finish(self) -> None:
        """Close and rename into C{msg/}, once synced (worker thread)."""
        self._close()
        os.rename(self.path, self.final_path)

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        file, self._file = self._file, None
        if fd is not None:
            os.close(fd)
        if file is not None:
            file.close()

    def discard(self) -> None:
        """Close and delete, wherever the file is (worker thread)."""
        self._chunks = []
        try:
            self._close()
        except OSError:
            pass
        for path in (self.path, self.final_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("cannot remove {path}: {error}", path=path, error=e)


def _try(fn: Callable[[], None]) -> OSError | None:
    try:
        fn()
    except OSError as e:
        return e
    return None


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
        # Made on first use, by a worker thread: no thread may exist before
        # twistd forks.
        self._syncers: ThreadPoolExecutor | None = None
        self._syncers_lock = threading.Lock()

    def reuse(self) -> tuple[int, str] | None:
        """
        A file from C{free/} opened for overwriting, as a descriptor and its
        path, or None when there is none (worker thread).
        """
        while True:
            try:
                name = self._free.pop()
            except IndexError:
                return None
            path = os.path.join(self.free_dir, name)
            try:
                return os.open(path, os.O_WRONLY | os.O_CLOEXEC), path
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
        # Phase by phase rather than message by message: the first fsync
        # commits the file system journal with every file's new size in it,
        # and no fsync has to commit the rename of the message before it
        # (one message at a time, every fsync was a journal commit of its
        # own).  The fsyncs run side by side; see SYNC_THREADS.
        errors: list[OSError | None] = [None] * len(temps)
        self._each(temps, errors, TempMessage.write_out)
        written = [i for i, error in enumerate(errors) if error is None]
        if len(written) > 1:
            synced = list(self._sync_pool().map(_try, [temps[i].sync_content for i in written]))
            for i, error in zip(written, synced, strict=True):
                if error is not None:
                    temps[i].discard()
                    errors[i] = error
        else:
            self._each(temps, errors, TempMessage.sync_content)
        self._each(temps, errors, TempMessage.finish)
        if any(e is None for e in errors):
            try:
                self._sync_directory(self.msg_dir)
            except OSError as e:
                for temp in temps:
                    temp.discard()
                return [e] * len(temps)
        return errors

    def _each(self, temps: Sequence[TempMessage], errors: list[OSError | None], step: Callable[[TempMessage], None]) -> None:
        """Apply C{step} to every message without an error yet; a failing one is discarded."""
        for i, temp in enumerate(temps):
            if errors[i] is None:
                try:
                    step(temp)
                except OSError as e:
                    temp.discard()
                    errors[i] = e

    def _sync_pool(self) -> ThreadPoolExecutor:
        with self._syncers_lock:
            if self._syncers is None:
                self._syncers = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="smtpplus-fsync")
            return self._syncers

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
