"""
What the rest of the daemon tells the notifications and statistics side.

Auth and delivery record events and counts through these; they never wait
on them for an SMTP reply longer than one database write.
"""

from __future__ import annotations

from zope.interface import Interface


class IEventRecorder(Interface):
    """Stores notification events and hands them to the notifier."""

    def record(type: str, user: str | None, message_id: str | None, detail: str):
        """
        Record one event of C{type} (one of L{smtpplus.config.EVENT_TYPES});
        return a Deferred firing with the stored event dict.
        """


class IStatsRecorder(Interface):
    """
    Counts messages and recipients into the statistics groups.

    C{message} arguments are dicts with at least: C{id}, C{user}, C{mail_from},
    C{header_from} (the raw From: value), C{subject}, C{campaign_code}
    (or None), C{created_at} (ISO 8601 UTC), C{recipients} (count).
    """

    def accepted(message: dict):
        """A message was queued (counts C{messages} and C{recipients})."""

    def rejected(user: str, mail_from: str, header_from: str, subject: str):
        """A message was refused by the sender rules (counts C{rejected})."""

    def recipient_result(message: dict, status: str, previous: str | None = None):
        """
        One recipient reached C{status} (C{"sent"}, C{"deferred"} or
        C{"bounced"}), leaving C{previous} (its status before; None or
        C{"queued"} when new).  Counts are current state: deferred -> sent
        moves the recipient out of C{deferred}.
        """
