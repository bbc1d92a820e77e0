"""Who may call what. A route declares the scope it needs as one dependency,
`dependencies=[requires(Scope.live)]` (or takes the `Caller` it returns), and gets:

- the key, sent as `x-api-key` (Neuronpedia's header) or `Authorization: Bearer`, checked
  against the stored hashes: 401 without a valid one, 403 when its scope is short of the route's;
- no key needed for the scopes in FEATURESCOPE_OPEN_SCOPES (reading, by default), nor for any
  scope from loopback when the server binds to loopback and the request was not forwarded by a
  proxy (`make run` just works); a key sent where none is needed is not checked (Neuronpedia's
  client always sends one);
- for what runs the model or writes, a refusal (403) of requests a browser sent from another
  site (Origin, Sec-Fetch-Site), so a page elsewhere cannot make a visitor's browser post here;
- for what runs the model, one request taken from the caller's token bucket (the key's, or
  the address's without one; none for a local caller): 429 with Retry-After when it is empty.

`requires(scope, explicit=True)` wants a key in the request whatever the settings: a GET that
runs the model does so only with one, since a link on any page can make a browser send a GET.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.config import Settings
from app.keys import KeyInfo, Scope, find_key, parse_scopes
from app.ratelimit import TokenBuckets

FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")

api_key_header = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="ApiKey",
                              description="an API key (`featurescope keys create`)")
bearer = HTTPBearer(auto_error=False, scheme_name="Bearer",
                    description="an API key as a bearer token")


def is_loopback(host: str | None) -> bool:
    """Whether an address (or the name `localhost`) is a loopback one."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Access:
    """One server's access settings and its rate limiter (`app.state.access`)."""

    def __init__(self, settings: Settings):
        self.open = parse_scopes(settings.open_scopes)
        self.loopback_open = settings.loopback_open and is_loopback(settings.host)
        self.live_limit = (TokenBuckets(per_minute=settings.live_rate, burst=settings.live_burst)
                           if settings.live_rate > 0 else None)

    def is_local(self, request: Request) -> bool:
        """A request from loopback to a server bound to loopback, not forwarded by a proxy."""
        if not self.loopback_open or request.client is None:
            return False
        if any(h in request.headers for h in FORWARDED):
            return False
        return is_loopback(request.client.host)

    def free(self, scope: Scope) -> bool:
        """Whether `scope` needs no key on this server, for a caller from anywhere."""
        return scope in self.open or self.loopback_open


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its valid key (if it sent one that was checked), its address, and
    whether it came from loopback to a loopback server (it may then do anything)."""

    key: KeyInfo | None
    address: str
    local: bool

    @property
    def identity(self) -> str:
        """The rate limiter's name for the caller: its key, else its address."""
        return f"key:{self.key.id}" if self.key else f"address:{self.address}"

    def may(self, scope: Scope, access: Access) -> bool:
        return (self.local or scope in access.open
                or (self.key is not None and self.key.scope.covers(scope)))


def _lookup(engine: Engine, secret: str) -> KeyInfo | None:
    with Session(engine) as session:
        return find_key(session, secret=secret)


def _same_site(request: Request) -> None:
    """403 for a request a browser sent from a page of another site."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site == "cross-site":
        raise HTTPException(403, "a request from a page of another site cannot run the model "
                                 "or write here")
    if origin is not None:
        hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
        if origin == "null" or urlsplit(origin).netloc not in hosts:
            raise HTTPException(403, f"a request from {origin} cannot run the model or write "
                                     "here: it is another site")


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": 'Bearer realm="featurescope"'})


async def authorize(request: Request, scope: Scope, secret: str | None, *,
                    explicit: bool = False) -> Caller:
    """The caller of a request that needs `scope`, or the refusal (401, 403, 429)."""
    access: Access = request.app.state.access
    local = access.is_local(request)
    free = not explicit and (local or scope in access.open)
    key = None
    # A key sent to what is free is checked too, except for reading: it names the caller's
    # rate-limit bucket and what it owns.
    if secret and (not free or scope is not Scope.read):
        key = await run_in_threadpool(_lookup, request.app.state.engine, secret)
        if key is None and not free:
            raise unauthorized("the key sent is unknown or revoked")
    if not free:
        if key is None:
            why = ("a GET runs the model only with a key; or POST it" if explicit
                   else "this needs a key")
            raise unauthorized(f"{why}: send a key with scope {scope.value!r} as x-api-key or "
                               "Authorization: Bearer (featurescope keys create)")
        if not key.scope.covers(scope):
            raise HTTPException(403, f"the key {key.name!r} has scope {key.scope.value!r}; this "
                                     f"needs scope {scope.value!r}")
    if scope is not Scope.read:
        _same_site(request)
    caller = Caller(key=key, address=request.client.host if request.client else "unknown",
                    local=local)
    if scope is Scope.live and access.live_limit is not None and not local:
        wait = access.live_limit.take(caller.identity)
        if wait is not None:
            who = f"the key {key.name!r}" if key else "this address"
            raise HTTPException(429, f"too many requests that run the model from {who}; try "
                                     f"again in {wait} s", headers={"Retry-After": str(wait)})
    return caller


def sent_key(x_api_key: str | None, credentials: HTTPAuthorizationCredentials | None
             ) -> str | None:
    return x_api_key or (credentials.credentials if credentials else None)


def _guard(scope: Scope, explicit: bool):
    async def guard(request: Request,
                    x_api_key: Annotated[str | None, Security(api_key_header)] = None,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Security(bearer)] = None) -> Caller:
        return await authorize(request, scope, sent_key(x_api_key, credentials),
                               explicit=explicit)

    guard.scope = scope
    guard.explicit = explicit
    guard.__name__ = f"requires_{scope.value}{'_key' if explicit else ''}"
    return guard


_GUARDS = {(s, e): _guard(s, e) for s in Scope for e in (False, True)}


def requires(scope: Scope, *, explicit: bool = False):
    """The dependency that lets a request through to a route needing `scope` (and gives the
    route its `Caller`)."""
    return Security(_GUARDS[scope, explicit])


def scope_of(route) -> tuple[Scope, bool] | None:
    """(scope, explicit) a route declares: the widest of its guards; None without one."""
    found = []
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if getattr(dep.call, "scope", None) is not None:
            found.append((dep.call.scope, dep.call.explicit))
        stack.extend(dep.dependencies)
    if not found:
        return None
    order = list(Scope)
    return max(found, key=lambda se: (order.index(se[0]), se[1]))


async def key_in(request: Request) -> str | None:
    """The key a request carries in its headers, if any."""
    return await api_key_header(request) or sent_key(None, await bearer(request))


async def sender(request: Request) -> KeyInfo | None:
    """The valid key a request carries, if any (for what a key owns)."""
    secret = await key_in(request)
    return await run_in_threadpool(_lookup, request.app.state.engine, secret) if secret else None
