"""
The AMP commands between the coordinator and its SMTP workers, over one
UNIX socket pair per worker.

The worker asks for what only the node as a whole may decide (connection
slots, the login throttle, the queue rows) and for the users; the
coordinator tells the workers what changed (users, the configuration) and
asks them for their metrics.  Messages themselves never travel here: a
worker writes them into the shared spool, and only their envelopes (with
the bytes of a small message, which spares the first delivery a read)
cross over.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.protocols import amp

from smtpplus.delivery.queue import NewMessage
from smtpplus.model import User
from smtpplus.smtp.tls import TLSMaterial
from smtpplus.storage.database import StorageUnavailable

# AMP carries at most this many bytes in one value.
_CHUNK = 65535


class Blob(amp.Argument):
    """
    Bytes of any length, split across several AMP values (C{name},
    C{name.1}, C{name.2}, ...): AMP limits one value to 64 KiB, and a batch
    of envelopes with their contents is often larger.
    """

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        value = objects[name.decode("ascii")]
        strings[name] = value[:_CHUNK]
        for n, start in enumerate(range(_CHUNK, len(value), _CHUNK), 1):
            strings[b"%s.%d" % (name, n)] = value[start : start + _CHUNK]

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        parts = [strings[name]]
        n = 1
        while (key := b"%s.%d" % (name, n)) in strings:
            parts.append(strings.pop(key))
            n += 1
        objects[name.decode("ascii")] = b"".join(parts)


def pack_messages(batch: list[tuple[NewMessage, bytes | None]]) -> bytes:
    """A batch of envelopes and (optional) contents as one L{Blob}: a JSON head line, then the contents."""
    head = []
    for message, content in batch:
        fields = attrs.asdict(message, recurse=False)
        fields["recipients"] = list(message.recipients)
        head.append([fields, -1 if content is None else len(content)])
    return b"".join([json.dumps(head).encode("utf-8"), b"\n", *(c for _, c in batch if c is not None)])


def unpack_messages(blob: bytes) -> list[tuple[NewMessage, bytes | None]]:
    """The inverse of L{pack_messages}."""
    end = blob.index(b"\n")
    head = json.loads(blob[:end])
    offset = end + 1
    batch: list[tuple[NewMessage, bytes | None]] = []
    for fields, length in head:
        fields["recipients"] = tuple(fields["recipients"])
        content = None
        if length >= 0:
            content = blob[offset : offset + length]
            offset += length
        batch.append((NewMessage(**fields), content))
    return batch


def user_to_json(user: User) -> str:
    """A L{User} as AMP carries it."""
    return json.dumps(attrs.asdict(user))


def user_from_json(text: str) -> User:
    """The inverse of L{user_to_json}."""
    return User(**json.loads(text))


class QuietAMP(amp.AMP):
    """
    AMP without its lines for every connection made and lost: the pool
    logs each worker's start and end itself, with what matters (index,
    pid, why it ended).
    """

    def makeConnection(self, transport: Any) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class StoreUnavailable(StorageUnavailable):
    """
    The coordinator's store failed to record or answer (PostgreSQL down,
    say): the worker answers 4xx, and the link stays up.
    """


def pack_tls(material: TLSMaterial) -> bytes:
    """The TLS material as a L{Blob}."""
    pairs = [[chain.decode("ascii"), key.decode("ascii")] for chain, key in material.pairs]
    return json.dumps({"profile": material.profile, "pairs": pairs}).encode("ascii")


def unpack_tls(blob: bytes) -> TLSMaterial:
    """The inverse of L{pack_tls}."""
    data = json.loads(blob)
    return TLSMaterial(data["profile"], tuple((chain.encode("ascii"), key.encode("ascii")) for chain, key in data["pairs"]))


# Worker -> coordinator.


class Configure(amp.Command):
    """
    What a starting worker runs with: the configuration (the file's text
    and the command line's overrides, as the coordinator read them before
    dropping privileges), the TLS certificates and keys, the log level.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [
        (b"config", amp.Unicode()),
        (b"overrides", amp.Unicode()),
        (b"tls", Blob()),
        (b"log_level", amp.Unicode()),
        (b"log_format", amp.Unicode()),
    ]


class Ready(amp.Command):
    """The worker serves every port it was given."""

    arguments = [(b"ports", amp.Integer())]
    response: list[tuple[bytes, amp.Argument]] = []


class Admit(amp.Command):
    """A connection from C{ip} asks for one of the node's slots; C{refusal} is the 421 line when refused."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"refusal", amp.Unicode(optional=True))]


class Release(amp.Command):
    """A connection admitted by L{Admit} is gone."""

    arguments = [(b"ip", amp.Unicode())]
    requiresAnswer = False


class GetLoginRecord(amp.Command):
    """What a password check needs of a user (C{found} false: no such user)."""

    arguments = [(b"username", amp.Unicode())]
    response = [
        (b"found", amp.Boolean()),
        (b"username", amp.Unicode(optional=True)),
        (b"enabled", amp.Boolean(optional=True)),
        (b"password_hash", amp.String(optional=True)),
        (b"generation", amp.Integer(optional=True)),
    ]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class GetUser(amp.Command):
    """A user's record as JSON (absent: no such user)."""

    arguments = [(b"username", amp.Unicode())]
    response = [(b"user", amp.Unicode(optional=True))]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class LoginRefused(amp.Command):
    """Whether the throttle refuses an attempt for C{username} from C{ip} now."""

    arguments = [(b"username", amp.Unicode()), (b"ip", amp.Unicode())]
    response = [(b"refused", amp.Boolean())]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class LoginFailed(amp.Command):
    """Count a failed login; C{delay} is how long to wait before answering it."""

    arguments = [(b"username", amp.Unicode()), (b"ip", amp.Unicode()), (b"known_user", amp.Boolean())]
    response = [(b"delay", amp.Float())]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class LoginSucceeded(amp.Command):
    """A login succeeded (the throttle forgives and remembers the address)."""

    arguments = [(b"username", amp.Unicode()), (b"ip", amp.Unicode())]
    requiresAnswer = False


class Enqueue(amp.Command):
    """
    Record a batch of messages whose spool files are durable in C{msg/}:
    one transaction for the batch, then the scheduler.  Answered only once
    the rows are committed; the worker answers its clients 250 after that,
    with the first message's id for a resent copy.
    """

    arguments = [(b"batch", Blob())]
    # duplicates: per message in order, the id of the message it is a
    # resent copy of (not queued), or "" for a message queued.
    response = [(b"free", amp.ListOf(amp.Unicode())), (b"duplicates", amp.ListOf(amp.Unicode()))]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class FindSuppression(amp.Command):
    """Whether C{user} has C{address} suppressed: its reason and date when found."""

    arguments = [(b"user", amp.Unicode()), (b"address", amp.Unicode())]
    response = [
        (b"found", amp.Boolean()),
        (b"address", amp.Unicode(optional=True)),
        (b"reason", amp.Unicode(optional=True)),
        (b"created_at", amp.Float(optional=True)),
    ]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class GetSuppressionKeys(amp.Command):
    """
    The node's suppression keys as a filter (L{smtpplus.delivery.suppressions.KeyFilter}):
    a worker answers the RCPT TO lookups it rules out without asking.
    Empty bits: no filter (a store shared with other nodes); ask each time.
    """

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"bits", Blob())]


class EffectivePriority(amp.Command):
    """A priority-1 message's priority once C{user}'s priority budget is applied (the event recorded when spent)."""

    arguments = [(b"user", amp.Unicode()), (b"budget", amp.Integer()), (b"notify", amp.Boolean())]
    response = [(b"priority", amp.Integer())]
    errors = {StoreUnavailable: b"STORE_UNAVAILABLE"}


class Refused(amp.Command):
    """A message refused by the sender rules, for the event and the statistics."""

    arguments = [
        (b"user", amp.Unicode()),
        (b"mail_from", amp.Unicode()),
        (b"header_from", amp.Unicode()),
        (b"subject", amp.Unicode()),
        (b"detail", amp.Unicode()),
    ]
    requiresAnswer = False


class RefusedRecipient(amp.Command):
    """A recipient refused at RCPT (suppressed), for the statistics."""

    arguments = [(b"user", amp.Unicode()), (b"mail_from", amp.Unicode())]
    requiresAnswer = False


class Log(amp.Command):
    """One log event of the worker, as twisted.logger's JSON (for a log the coordinator formats: syslog)."""

    arguments = [(b"event", amp.Unicode())]
    requiresAnswer = False


class LogLines(amp.Command):
    """
    The worker's log lines since its last batch, formatted as the
    coordinator's log file takes them (L{smtpplus.log.line_formatter}):
    decoding and formatting each event in the coordinator cost it a sixth
    of its time under load.
    """

    arguments = [(b"lines", Blob())]
    requiresAnswer = False


# Coordinator -> worker.


class UserChanged(amp.Command):
    """A user was changed: drop cached logins; C{revoked} ("disabled", "deleted") ends its sessions' standing."""

    arguments = [(b"username", amp.Unicode()), (b"revoked", amp.Unicode(optional=True))]
    requiresAnswer = False


class SuppressionAdded(amp.Command):
    """C{user} suppressed C{address} (an address key): the worker's filter holds it before the add is answered."""

    arguments = [(b"user", amp.Unicode()), (b"address", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []


class Reload(amp.Command):
    """The configuration was reloaded (SIGHUP): the certificates and the log level for what comes next."""

    arguments = [(b"tls", Blob()), (b"log_level", amp.Unicode()), (b"log_format", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []


class Scrape(amp.Command):
    """The worker's metrics in the Prometheus text format."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"text", Blob())]
