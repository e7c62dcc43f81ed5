"""Where requests meet access control: one function for any route, one check for streams.

Authorization is decided before the store is touched, from the method, the path and the
credential alone, so a 401 or 403 is the same whether or not the stream exists.
"""

from __future__ import annotations

from aiohttp import web

from protocol import headers as h
from relay.auth.authorizer import ACCESS, Access
from relay.auth.grants import ADMIN, ANONYMOUS, APPEND, READ, Action, Principal
from relay.http.context import context
from relay.http.paths import source_path, stream_path

ACTION_BY_METHOD: dict[str, Action] = {
    "GET": READ,
    "HEAD": READ,
    "POST": APPEND,  # appends, and closing (an append of nothing that closes)
    "PUT": ADMIN,
    "DELETE": ADMIN,
}


async def authorize(request: web.Request, action: Action, path: str) -> Principal:
    """The principal allowed to do ``action`` on ``path``, or raise Unauthorized (401) or
    Forbidden (403). ``path`` is relative to ``/v1/stream/`` (the namespace grants name).

    The one entry point for routes (the stream route, and later ``__ds/`` routes). While access
    control is off it answers ANONYMOUS, who may do anything. Also records on the request
    whether a read may be cached publicly (``ACCESS``).
    """
    auth = context(request).auth
    if auth is None:
        return ANONYMOUS
    principal = await auth.authenticate(request.headers.get("Authorization"))
    grant = auth.permit(principal, action, path)
    request[ACCESS] = Access(principal, grant.public)
    return principal


async def authorize_stream(request: web.Request) -> Principal:
    """Access control for ``/v1/stream/{path}``: read for GET and HEAD, append for POST, admin
    for PUT and DELETE; a fork (PUT with ``Stream-Forked-From``) also needs read on its
    source."""
    max_path = context(request).config.max_path_length
    path = stream_path(request.raw_path, max_path)
    principal = await authorize(request, ACTION_BY_METHOD[request.method], path)
    source = request.headers.get(h.STREAM_FORKED_FROM) if request.method == "PUT" else None
    if source is not None:
        auth = context(request).auth
        assert auth is not None
        auth.permit(principal, READ, source_path(source, max_path))
    return principal
