"""
One list of schema migrations per component, each step written for both
backends: a database of either kind records how many steps it has applied,
so the SQLite and the PostgreSQL schemas evolve from the same list and keep
the same version numbers.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Migration:
    """
    One schema step in each dialect.  None where a backend has nothing to
    do at this step (the step still counts, so the numbers stay aligned).
    """

    sqlite: str | None
    postgresql: str | None


def sqlite_steps(migrations: list[Migration] | tuple[Migration, ...]) -> list[str]:
    """The SQLite text of each step, an empty script where SQLite has nothing to do."""
    return [m.sqlite or "" for m in migrations]


def postgresql_steps(migrations: list[Migration] | tuple[Migration, ...]) -> list[str]:
    """The PostgreSQL text of each step, an empty script where PostgreSQL has nothing to do."""
    return [m.postgresql or "" for m in migrations]
