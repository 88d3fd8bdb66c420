"""The one access check every frontend calls, and the audit trail of what it let through.

A frontend gathers the caller's ``Credentials`` from its transport (a bearer token, the
verified names of a client certificate or CURVE key, the peer, whether the peer is local) and
calls ``AccessControl.check(call, credentials)`` before running the call, then
``AccessControl.record(...)`` with the outcome. ``check`` raises ``UnauthenticatedError`` or
``PermissionDeniedError`` (edged.core.errors), which each frontend maps to its wire code in
its one error table.

Who gets which roles:

* a valid bearer token: the token's roles; an invalid one is refused (UNAUTHENTICATED) even
  where the call would be open;
* verified names (client certificate subject CN and SANs, ``curve:<key>``) listed in
  ``auth.identities``: the union of their roles;
* always also ``auth.anonymous_roles`` (default infer and read);
* with no credential configured at all (no tokens file, no client CA, no CURVE) and
  ``auth.trust_loopback``, a caller over loopback or a Unix socket gets every role; this is
  the default policy and the daemon says so at start.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from edged.core.errors import PermissionDeniedError, UnauthenticatedError, clip
from edged.security.roles import ACCESS, ALL_ROLES, AUDITED, Role
from edged.security.tokens import TokenStore

audit_log = structlog.get_logger("edged.audit")

#: longest string kept of one audited argument
MAX_ARG_CHARS = 128
#: allowances kept for callers without a token (``AccessControl.cached``; cleared when full)
DECISION_CACHE = 1024


@dataclass(frozen=True)
class Credentials:
    """What a frontend knows of a caller."""

    transport: str  # "grpc", "zmq", ...
    peer: str  # the transport's peer address ("ipv4:127.0.0.1:50000", "ipc", ...)
    local: bool  # over loopback or a Unix socket
    token: str | None = None  # bearer token, as presented
    names: tuple[str, ...] = ()  # verified certificate CN/SANs, or "curve:<Z85 key>"


@dataclass(frozen=True)
class Principal:
    """An authenticated (or anonymous) caller and its roles."""

    who: str  # "token:<name>", "cert:<CN>", "curve:<key>", "anonymous", "local"
    roles: frozenset[Role]
    peer: str
    transport: str


@dataclass(frozen=True)
class Decision:
    """``check``'s answer: who called what, needing which role."""

    call: str
    role: Role | None
    principal: Principal

    @property
    def audited(self) -> bool:
        return self.role in AUDITED


def truncate(value: object) -> object:
    """An argument as the audit log keeps it: numbers and booleans as they are, text clipped
    (``edged.core.errors.clip``)."""
    if isinstance(value, bool | int | float):
        return value
    return clip(value, MAX_ARG_CHARS)


def audited(call: str) -> bool:
    """Whether ``call``'s arguments should be gathered for the audit log."""
    return ACCESS.get(call, Role.MANAGE) in AUDITED


@dataclass
class AccessControl:
    """The access policy of one daemon (tokens re-read by ``tokens.refresh`` elsewhere)."""

    tokens: TokenStore | None = None
    identities: Mapping[str, frozenset[Role]] = field(default_factory=dict)
    anonymous_roles: frozenset[Role] = frozenset({Role.INFER, Role.READ})
    trust_loopback: bool = True
    #: a client CA or CURVE client keys are configured (certificate or key identities)
    identities_configured: bool = False
    _counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _allowed: dict[tuple[str, Hashable], Decision] = field(default_factory=dict)

    @property
    def credentials_configured(self) -> bool:
        """Some credential exists that a caller could present."""
        return self.tokens is not None or self.identities_configured

    @property
    def local_trusted(self) -> bool:
        """Loopback and Unix-socket callers get every role (the default policy)."""
        return self.trust_loopback and not self.credentials_configured

    def principal(self, credentials: Credentials) -> Principal:
        """Who ``credentials`` prove, with their roles.

        Raises:
            UnauthenticatedError: a bearer token that is not valid (unknown or revoked).
        """
        roles = set(self.anonymous_roles)
        who = ""
        if credentials.token is not None:
            entry = self.tokens.verify(credentials.token) if self.tokens is not None else None
            if entry is None:
                raise UnauthenticatedError("the bearer token is not valid (unknown or revoked)")
            roles |= entry.roles
            who = f"token:{entry.name}"
        for name in credentials.names:
            roles |= self.identities.get(name, frozenset())
        if credentials.names and not who:
            who = credentials.names[0]
            if not who.startswith("curve:"):
                who = f"cert:{who}"
        if credentials.local and self.local_trusted:
            roles |= ALL_ROLES
            who = who or "local"
        return Principal(
            who or "anonymous", frozenset(roles), credentials.peer, credentials.transport
        )

    def cached(self, call: str, caller: Hashable) -> Decision | None:
        """The decision ``check`` made before for ``call`` and a caller without a token
        that the frontend knows by ``caller`` (what its ``Credentials`` are made of: the
        socket, the peer's address, its verified names), when it allowed the call; None:
        call ``check``. What a caller without a token may do follows from the policy fixed
        at start (identities, anonymous roles, loopback trust), not from the tokens file
        that ``refresh`` re-reads, so a kept allowance is what ``check`` would decide again.
        Refusals are not kept: each one is counted and audited."""
        return self._allowed.get((call, caller))

    def check(
        self,
        call: str,
        credentials: Credentials,
        args: Mapping[str, Any] | None = None,
        *,
        caller: Hashable = None,
    ) -> Decision:
        """Allow ``call`` for ``credentials`` or raise; a refusal is counted and, for an
        audited call (or any refusal), written to the audit log with ``args``. ``caller``:
        the key under which ``cached`` finds an allowance of a caller without a token.

        Raises:
            UnauthenticatedError: an invalid token, or no credentials for a call that needs
                a role anonymous callers lack (where credentials are configured).
            PermissionDeniedError: the caller lacks the role; or nothing is configured that
                could grant it (management from a non-local peer under the default policy).
        """
        role = ACCESS.get(call, Role.MANAGE)
        known = call in ACCESS
        try:
            principal = self.principal(credentials)
        except UnauthenticatedError as e:
            self._refused(call, role, credentials, "UNAUTHENTICATED", str(e), args)
            raise
        decision = Decision(call, role, principal)
        if not known:
            message = f"call {call!r} is not in the access table"
            self._refused(call, role, credentials, "PERMISSION_DENIED", message, args, principal)
            raise PermissionDeniedError(message)
        if role is None or role in principal.roles:
            if caller is not None and credentials.token is None:
                if len(self._allowed) >= DECISION_CACHE:
                    self._allowed.clear()
                self._allowed[(call, caller)] = decision
            return decision
        anonymous = credentials.token is None and not credentials.names
        if anonymous and self.credentials_configured:
            message = f"{_short(call)} needs the '{role}' role: present a token or certificate"
            code = "UNAUTHENTICATED"
            self._refused(call, role, credentials, code, message, args, principal)
            raise UnauthenticatedError(message)
        if anonymous and self.trust_loopback:
            message = (
                f"{_short(call)} needs the '{role}' role: with no tokens, client certificates "
                "or CURVE keys configured it is only accepted over loopback or a Unix socket "
                "(docs/security.md)"
            )
        else:
            message = f"{principal.who} lacks the '{role}' role that {_short(call)} needs"
        self._refused(call, role, credentials, "PERMISSION_DENIED", message, args, principal)
        raise PermissionDeniedError(message)

    def record(self, decision: Decision, outcome: str, args: Mapping[str, Any] | None) -> None:
        """The outcome (a status code name, "OK" on success) of an allowed call: counted and,
        for an audited call, written to the audit log."""
        if not decision.audited:
            return
        self._count(decision.role, outcome)
        p = decision.principal
        audit_log.info(
            "audit",
            who=p.who,
            peer=p.peer,
            transport=p.transport,
            call=decision.call,
            role=str(decision.role),
            args=_args(args),
            outcome=outcome,
        )

    def _refused(
        self,
        call: str,
        role: Role | None,
        credentials: Credentials,
        outcome: str,
        reason: str,
        args: Mapping[str, Any] | None,
        principal: Principal | None = None,
    ) -> None:
        self._count(role, outcome)
        audit_log.warning(
            "audit",
            who=principal.who if principal else "unauthenticated",
            peer=credentials.peer,
            transport=credentials.transport,
            call=call,
            role=str(role),
            args=_args(args),
            outcome=outcome,
            reason=reason,
        )

    def _count(self, role: Role | None, outcome: str) -> None:
        key = (str(role or "none"), outcome)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def counts(self) -> dict[tuple[str, str], int]:
        """{(role, outcome): calls} so far."""
        with self._lock:
            return dict(self._counts)

    def describe(self) -> dict[str, Any]:
        """The policy in force, for the start-up log line."""
        return {
            "tokens": self.tokens is not None,
            "identities": sorted(self.identities),
            "anonymous_roles": sorted(self.anonymous_roles),
            "local_roles": sorted(ALL_ROLES if self.local_trusted else self.anonymous_roles),
        }


def _short(call: str) -> str:
    return call.rpartition("/")[2] if call.startswith("/") else call


def _args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: truncate(v) for k, v in (args or {}).items()}


class AccessCollector(Collector):
    """edged_access_calls: audited calls (manage, learn) by outcome, and refusals of any
    role."""

    def __init__(self, access: AccessControl) -> None:
        self._access = access

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "edged_access_calls",
            "Management and learning calls by role and outcome (a status code name, OK on "
            "success), and refused calls of every role.",
            labels=["role", "outcome"],
        )
        for (role, outcome), count in sorted(self._access.counts().items()):
            family.add_metric([role, outcome], count)
        yield family
