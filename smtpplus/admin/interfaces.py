"""
The read models the admin API serves; each is implemented by the concern
that owns the data (delivery: messages; notify: events and statistics).
"""

from __future__ import annotations

from zope.interface import Interface


class IMessageQuery(Interface):
    def list_messages(user: str | None, status: str | None, limit: int):
        """Deferred list of message dicts (contract section 4), newest first."""

    def get_message(message_id: str):
        """Deferred message dict, or None when there is no such message."""


class IEventQuery(Interface):
    def list_events(type: str | None, user: str | None, limit: int):
        """Deferred list of event dicts (contract section 4), newest first."""


class IStatsQuery(Interface):
    def stats(user: str | None, policy: str | None):
        """
        Deferred C{{"policy": ..., "groups": [...]}}; C{policy} None means the
        user's own aggregation (or C{"day"} when no user is given).
        """
