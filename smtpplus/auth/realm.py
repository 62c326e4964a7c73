"""
The cred realm: turns an authenticated username into the SMTP avatar.

What an avatar does (sender rules, queueing) is the delivery side's
business; this realm only fetches the user and hands it, with the
session's L{Standing} (is the account still enabled?), to the injected
C{avatar_factory}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from zope.interface import implementer

from smtpplus.auth.store import Standing
from smtpplus.interfaces import IUserStore
from smtpplus.model import User
from smtpplus.smtp.interfaces import ISubmitter

AvatarFactory = Callable[[User, Standing], Any]


@implementer(IRealm)
class SubmitterRealm:
    """
    An L{IRealm} for L{ISubmitter} avatars.

    @param avatar_factory: C{avatar_factory(user, standing)} returns
        an L{ISubmitter} (or a Deferred of one) that stops sending once
        C{standing.revoked()} says so; if the avatar has a C{logout()}
        method it is called when the session ends.
    """

    def __init__(self, store: IUserStore, avatar_factory: AvatarFactory) -> None:
        self._store = store
        self._avatar_factory = avatar_factory

    @inlineCallbacks
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if ISubmitter not in interfaces:
            raise NotImplementedError("smtpplus only provides ISubmitter avatars")
        # Taken before the read: a disable or delete committed while it
        # runs is then seen either in the row or by the standing.
        standing = self._store.standing(avatarId)
        user = yield self._store.get(avatarId)
        if user is None or not user.enabled or standing.revoked() is not None:
            # Deleted or disabled between the password check and now.
            raise UnauthorizedLogin()
        avatar = yield maybeDeferred(self._avatar_factory, user, standing)
        return ISubmitter, avatar, getattr(avatar, "logout", lambda: None)
