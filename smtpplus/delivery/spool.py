"""
The message spool under C{state_dir/spool}: C{tmp/} holds messages being
received (written out at the end of DATA, or earlier when large), C{msg/}
holds accepted ones, one file per queue id, C{free/} holds the files of
finished messages, kept for reuse, and C{corrupt/} holds accepted files
whose envelope cannot be read, set aside for the administrator.

Each accepted file is self-describing: the message is followed by its
envelope record (user, sender, recipients, priority...; see L{Envelope})
and a fixed-size tail that gives the record's length.  The database can be
rebuilt from the spool: at start-up a file without a queue row is queued
again from its record.  The record goes at the end because a large
message is streamed to disk before its header fields (priority, schedule)
are known; the relay sends only the bytes before it.

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
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import attrs
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
# Files and directories the daemon writes are its user's alone.
FILE_MODE = 0o600
DIR_MODE = 0o700

# The tail after an envelope record: newline, the record's length in ten
# digits, a space and this marker.  A message ends in CRLF, so the marker
# (ending in a bare LF) cannot be mistaken for the end of a message.
_MARKER = b"smtpplus-envelope-1\n"
_TAIL = 12 + len(_MARKER)


# Random bytes for ids, drawn from the OS a page at a time rather than with
# one getrandom() call per message.  A forked process (the SMTP workers,
# smtpplus.workers.fork) draws its own: two workers holding the same bytes
# would give two messages of the same millisecond the same id.
_random = bytearray()
os.register_at_fork(after_in_child=_random.clear)


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
        return SMTPReply(452, "4.3.1", "Insufficient system storage, try again later", reason="storage")
    return SMTPReply(451, "4.3.0", "Local error in processing, try again later", reason="storage")


@attrs.frozen
class Envelope:
    """What the queue needs to know of an accepted message besides its bytes."""

    user: str | None
    mail_from: str
    header_from: str
    subject: str
    priority: int
    recipients: tuple[str, ...]
    campaign_name: str | None
    campaign_code: str | None
    schedule_at: float | None
    size: int
    internal: bool
    created_at: float
    # Absent from the records of older versions.
    header_message_id: str | None = None
    # Absent from the records of older releases.
    sandbox: bool = False


class EnvelopeError(ValueError):
    """A spool file whose envelope record is missing or unreadable."""


_FIELDS = tuple(field.name for field in attrs.fields(Envelope))
_encoder = json.JSONEncoder(check_circular=False)


def envelope_record(envelope: object) -> bytes:
    """
    The bytes that follow a message in its spool file: the record of
    C{envelope} (an L{Envelope}, or anything with its fields: the queue's
    C{NewMessage}, without a copy per message) and its tail.
    """
    record = _encoder.encode({name: getattr(envelope, name) for name in _FIELDS}).encode("ascii")
    return b"%s\n%010d %s" % (record, len(record), _MARKER)


def _parse_tail(tail: bytes) -> int | None:
    """The record length from the last L{_TAIL} bytes of a file, or None without a record."""
    if len(tail) < _TAIL or not tail.endswith(_MARKER) or tail[-_TAIL : -_TAIL + 1] != b"\n":
        return None
    digits = tail[-_TAIL + 1 : -_TAIL + 11]
    return int(digits) if digits.isdigit() else None


def _decode_record(record: bytes) -> Envelope:
    try:
        fields: dict[str, Any] = json.loads(record)
        fields["recipients"] = tuple(fields["recipients"])
        envelope = Envelope(**fields)
    except (ValueError, TypeError, KeyError) as e:
        raise EnvelopeError(f"unreadable envelope record: {e}") from None
    if not envelope.recipients or not all(isinstance(r, str) for r in envelope.recipients):
        raise EnvelopeError("envelope record without recipients")
    return envelope


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
        # Set by the committer before L{write_out}, written after the
        # message: see L{envelope_record}.
        self.envelope: object | None = None

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
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
                self._file = open(fd, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - closed by finish/discard
            except OSError as e:
                self.error = e
                return
        try:
            self._file.write(data)
        except OSError as e:
            self.error = e

    def overwrite(self, offset: int, data: bytes) -> None:
        """
        Replace the bytes written at C{offset} with C{data} of the same
        length (a header value decided at the end of DATA); a failure is
        kept in L{error}.  The part replaced lies within one L{write}.
        """
        if self.error is not None:
            return
        if self._file is None:
            start = 0
            for i, chunk in enumerate(self._chunks):
                end = start + len(chunk)
                if start <= offset and offset + len(data) <= end:
                    at = offset - start
                    self._chunks[i] = chunk[:at] + data + chunk[at + len(data) :]
                    return
                start = end
            raise ValueError(f"no written bytes at {offset}")
        try:
            # A spilled message: its buffer goes to the page cache first,
            # as every later write would.
            self._file.flush()
            os.pwrite(self._file.fileno(), data, offset)
        except OSError as e:
            self.error = e

    def write_out(self) -> None:
        """Hand the whole content and its envelope record to the file system, unsynced (worker thread)."""
        if self.error is not None:
            raise self.error
        assert self.envelope is not None, "the committer sets the envelope"
        record = envelope_record(self.envelope)
        if self._file is not None:
            self._file.write(record)
            self._file.flush()
            return
        # Plain descriptors rather than a file object: six system calls a
        # message instead of fourteen, and after each one this thread has
        # to win the GIL back from the reactor.
        reused = self._spool.reuse()
        if reused is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        else:
            self._fd, self.path = reused
        self.content = b"".join(self._chunks)
        self._chunks = []
        total = len(self.content) + len(record)
        written = os.writev(self._fd, [self.content, record])
        if written < total:
            view = memoryview(self.content + record)[written:]
            while view:
                view = view[os.write(self._fd, view) :]
        if reused is not None:
            os.ftruncate(self._fd, total)

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
    """
    The spool directories; see the module docstring.

    @param worker: an SMTP worker process's index: its partial files go
        into C{tmp/w<index>}, which the coordinator empties when that
        worker dies (L{clear_partial}) while the other workers go on.
    """

    def __init__(self, root: str, worker: int = 0) -> None:
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        if worker:
            self.tmp_dir = os.path.join(self.tmp_dir, f"w{worker}")
        self.msg_dir = os.path.join(root, "msg")
        self.free_dir = os.path.join(root, "free")
        self.corrupt_dir = os.path.join(root, "corrupt")
        for path in (root, self.tmp_dir, self.msg_dir, self.free_dir, self.corrupt_dir):
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
            os.chmod(path, DIR_MODE)
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

    def take_free(self, names: Iterable[str]) -> None:
        """Files of C{free/} handed to this process (by the coordinator, to a worker) to write over."""
        for name in names:
            if len(self._free) >= FREE_LIMIT:
                break
            self._free.append(name)

    def give_free(self, count: int) -> list[str]:
        """Up to C{count} names of C{free/} this process gives away: they are no longer its to reuse."""
        names = []
        while len(names) < count:
            try:
                names.append(self._free.popleft())
            except IndexError:
                break
        return names

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

    def read_small(self, message_id: str) -> tuple[bytes | None, int]:
        """
        The message's bytes if it is up to L{MEMORY_LIMIT} bytes (else None)
        and its length, without the envelope record (worker thread).
        """
        with open(self.path(message_id), "rb") as f:
            data = f.read(2 * MEMORY_LIMIT)
            if len(data) < 2 * MEMORY_LIMIT:
                length = _message_length(data, len(data))
            else:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - _TAIL))
                length = _message_length(f.read(_TAIL), size)
        return (data[:length] if length <= MEMORY_LIMIT else None), length

    def read_message(self, message_id: str) -> bytes:
        """The whole message's bytes, without the envelope record, whatever its size (worker thread)."""
        with open(self.path(message_id), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - _TAIL))
            length = _message_length(f.read(_TAIL), size)
            f.seek(0)
            return f.read(length)

    def read_envelope(self, path: str) -> Envelope:
        """The envelope record of the spool file at C{path} (worker thread)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - _TAIL))
            length = _parse_tail(f.read(_TAIL))
            if length is None or length > size - _TAIL:
                raise EnvelopeError("no envelope record")
            f.seek(size - _TAIL - length)
            return _decode_record(f.read(length))

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

    def erase(self, message_id: str) -> None:
        """
        Delete an accepted message's file outright, never keeping it in
        C{free/} for reuse: an administrator dropped it, its content goes
        (worker thread).
        """
        try:
            os.unlink(self.path(message_id))
        except FileNotFoundError:
            pass

    def recover(self) -> tuple[int, list[str]]:
        """
        At start-up: delete partial files in C{tmp/} (no client was told
        250 for them) and reload C{free/}.  Returns the partial count and
        the ids in C{msg/}, for the caller to match with the queue.
        """
        partial = self.clear_partial(self.tmp_dir)
        self._free.clear()
        for name in os.listdir(self.free_dir):
            if len(self._free) < FREE_LIMIT:
                self._free.append(name)
            else:
                os.unlink(os.path.join(self.free_dir, name))
        return partial, os.listdir(self.msg_dir)

    def clear_partial(self, directory: str) -> int:
        """Delete the partial files under C{directory} (a C{tmp/} tree); returns how many."""
        removed = 0
        for parent, _, names in os.walk(directory):
            for name in names:
                try:
                    os.unlink(os.path.join(parent, name))
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def set_aside(self, message_id: str) -> str:
        """Move an accepted file whose envelope cannot be read into C{corrupt/}; returns its new path."""
        target = os.path.join(self.corrupt_dir, message_id)
        os.rename(self.path(message_id), target)
        return target

    def secure(self) -> None:
        """Give the spool's directories and files mode 0700/0600, whatever they had (start-up)."""
        for directory in (self.root, self.tmp_dir, self.msg_dir, self.free_dir, self.corrupt_dir):
            os.chmod(directory, DIR_MODE)
            if directory != self.root:
                for name in os.listdir(directory):
                    path = os.path.join(directory, name)
                    # tmp/ holds the SMTP workers' own directories.
                    os.chmod(path, DIR_MODE if os.path.isdir(path) else FILE_MODE)


def _message_length(tail: bytes, size: int) -> int:
    """
    How many of a spool file's C{size} bytes are the message, given its
    last bytes: all of them in a file written before envelope records.
    """
    length = _parse_tail(tail[-_TAIL:])
    if length is None or length > size - _TAIL:
        return size
    return size - _TAIL - length
