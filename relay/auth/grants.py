"""Grants and principals: what a verified credential may do, and where.

A grant is ``{"path": GLOB, "actions": [...], "public": bool}``, the same shape in the API key
file and in a JWT's ``grants`` claim. Paths are relative to ``/v1/stream/`` and use
``protocol.glob`` (``*`` one segment, ``**`` zero or more).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from protocol.errors import BadRequest
from protocol.glob import Matcher, check_pattern, compile_glob

Action = Literal["read", "append", "admin"]
ACTIONS: frozenset[str] = frozenset({"read", "append", "admin"})
READ: Action = "read"
APPEND: Action = "append"
ADMIN: Action = "admin"
DECISIONS_PER_PRINCIPAL = 256


class GrantError(ValueError):
    """A grant list that is not the documented shape."""


@dataclass(frozen=True, slots=True)
class Grant:
    pattern: str
    matches: Matcher
    actions: frozenset[str]
    public: bool = False


def parse_grants(raw: Any) -> tuple[Grant, ...]:
    """A validated grant list; GrantError names what is wrong."""
    if not isinstance(raw, list):
        raise GrantError("grants must be a list")
    grants = []
    for item in raw:
        if not isinstance(item, Mapping):
            raise GrantError("each grant must be an object")
        pattern, actions, public = item.get("path"), item.get("actions"), item.get("public", False)
        if not isinstance(pattern, str):
            raise GrantError("a grant's path must be a string")
        try:
            check_pattern(pattern)
        except BadRequest as exc:
            raise GrantError(f"grant path {pattern!r}: {exc.message}") from None
        if not isinstance(actions, list) or not all(a in ACTIONS for a in actions):
            raise GrantError(f"grant actions must be a list of {sorted(ACTIONS)}")
        if not isinstance(public, bool):
            raise GrantError("a grant's public must be true or false")
        grants.append(Grant(pattern, compile_glob(pattern), frozenset(actions), public))
    return tuple(grants)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified credential speaks for.

    ``key_id`` is what revocation by ``kid`` names: an API key's ``id``, or the ``kid`` of
    the key that signed a JWT. ``expires_at`` (epoch seconds, skew included) is checked again
    while a live reader holds the credential.
    """

    subject: str
    grants: tuple[Grant, ...]
    key_id: str | None = None
    jti: str | None = None
    expires_at: float | None = None
    kind: Literal["anonymous", "api_key", "jwt"] = "jwt"

    _decided: dict[tuple[str, str], Grant | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    def grant_for(self, action: Action, path: str) -> Grant | None:
        """The first grant allowing ``action`` on ``path`` (stream-root-relative), preferring
        a public one so a read that may be shared is marked so.

        Remembered per principal (a producer appends to one path many times, and a glob
        match costs more than the rest of the check); grants never change under a principal.
        """
        key = (action, path)
        try:
            return self._decided[key]
        except KeyError:
            pass
        if len(self._decided) >= DECISIONS_PER_PRINCIPAL:
            self._decided.clear()
        found = self._decided[key] = self._grant_for(action, path)
        return found

    def _grant_for(self, action: Action, path: str) -> Grant | None:
        found = None
        for grant in self.grants:
            if action in grant.actions and grant.matches(path):
                if grant.public:
                    return grant
                found = found or grant
        return found


ANONYMOUS = Principal(
    "anonymous", (Grant("**", compile_glob("**"), ACTIONS, public=True),), kind="anonymous"
)
"""Who acts while access control is off: anyone, with every action on every path."""
