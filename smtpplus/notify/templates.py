"""
Mail templates for notifications: shipped in C{smtpplus/templates/}, each
file overridable by one of the same name in C{[notifications] templates_dir}.

A template is a C{Subject:} line, a blank line and the body, with
C{$variables} filled by C{string.Template.safe_substitute} from a fixed set
of strings: no attribute access, no expressions, unknown names stay as
written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from string import Template

import attrs
from twisted.logger import Logger

from smtpplus.model import EventType

log = Logger()

# Per event type one single-event mail, plus the follow-up that collects a
# burst of one type and user, plus the hourly/daily digest.
TEMPLATE_NAMES = tuple(f"{name}.mail.txt" for name in (*EventType, "summary", "digest"))

_SUBJECT_MAX = 200
# Everything but tab and newline that could end a header or confuse a terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@attrs.frozen
class MailTemplate:
    """One parsed template: the subject line and the body."""

    subject: str
    body: str

    @classmethod
    def parse(cls, text: str) -> MailTemplate:
        """Split C{Subject: ...}, an optional blank line, and the body."""
        first, _, rest = text.partition("\n")
        if first.lower().startswith("subject:"):
            subject = first[len("subject:") :].strip()
            body = rest[1:] if rest.startswith("\n") else rest
        else:
            subject, body = "[smtpplus] $type notification", text
        return cls(subject=subject, body=body)

    def render(self, variables: Mapping[str, str]) -> tuple[str, str]:
        """Return C{(subject, body)} with C{variables} substituted safely."""
        one_line = {k: " ".join(_CONTROL.sub(" ", v).split()) for k, v in variables.items()}
        multi_line = {k: _CONTROL.sub(" ", v.replace("\r\n", "\n")) for k, v in variables.items()}
        subject = " ".join(_CONTROL.sub(" ", Template(self.subject).safe_substitute(one_line)).split())
        return subject[:_SUBJECT_MAX], Template(self.body).safe_substitute(multi_line)


def load_templates(templates_dir: str = "") -> dict[str, MailTemplate]:
    """
    Read every template: from C{templates_dir} when it holds a file of that
    name, else the shipped default.  An unreadable override is logged and
    the default used, so a typo never silences notifications.
    """
    shipped = resources.files("smtpplus").joinpath("templates")
    templates = {}
    for name in TEMPLATE_NAMES:
        text = None
        if templates_dir:
            path = os.path.join(templates_dir, name)
            if os.path.exists(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError) as e:
                    log.warn("template {path} unusable ({error}); using the shipped one", path=path, error=e)
        if text is None:
            text = shipped.joinpath(name).read_text(encoding="utf-8")
        templates[name] = MailTemplate.parse(text.replace("\r\n", "\n"))
    return templates
