"""Connection settings: constructor options, which may also come from the URL's query string.

``postgresql://user:pw@host/db?pool_max_size=20&statement_timeout=10`` works as well as
``PostgresStore(url, pool_max_size=20, statement_timeout=10)``; explicit options win. Runlane's options
(``application_name`` and ``connect_timeout`` included, since every connection gets them) are taken out of the
query string; other libpq parameters (``sslmode``, ``options`` …) pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runlane.store.postgres.trip import KEYED_PLANNING

KEYED_ROLES = frozenset({"heartbeat"})
"""Connections whose every statement finds its rows by key (the heartbeat renews leases by run id): their
sessions plan as flights do (``trip.KEYED_PLANNING``)."""


@dataclass(frozen=True, slots=True)
class PostgresOptions:
    pool_min_size: int = 1
    """Connections kept open per event loop."""
    pool_max_size: int = 10
    """Connections at most per event loop."""
    pool_timeout: float = 30.0
    """Seconds to wait for a pooled connection before StoreUnavailable."""
    statement_timeout: float | None = 30.0
    """Seconds before the server cancels a statement; None or 0 disables."""
    idle_in_transaction_timeout: float | None = 1.0
    """Seconds one of Runlane's transactions may sit idle before the server ends it (rolling it back) and
    releases its row locks. Runlane's transactions never wait on anything but the next round trip, so idleness
    means the process was stopped, starved or cut off: without the bound, its locked runs would outlive their
    lease (the reaper skips locked rows) and be reclaimed only once it woke. None or 0 disables."""
    connect_timeout: float = 10.0
    application_name: str = "runlane"
    prepare_threshold: int | None = 5
    """psycopg's server-side prepare threshold; None disables it (PgBouncer before 1.21)."""

    @classmethod
    def parse(cls, url: str, options: dict[str, Any]) -> tuple[str, PostgresOptions]:
        """Split ``url`` into a libpq conninfo and the options, explicit ``options`` winning over the URL."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(options) - set(known) - {"pool_size"}
        if unknown:
            raise TypeError(f"unknown PostgreSQL store option(s): {', '.join(sorted(unknown))}")
        parts = urlsplit(url)
        query: list[tuple[str, str]] = []
        from_url: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            name = "pool_max_size" if key == "pool_size" else key
            if name in known:
                from_url[name] = value
            else:
                query.append((key, value))
        if "pool_size" in options:
            options = {**options, "pool_max_size": options["pool_size"]}
            del options["pool_size"]
        merged = {**from_url, **options}
        values: dict[str, Any] = {}
        for name, raw in merged.items():
            values[name] = _coerce(name, raw, cls)
        opts = cls(**values)
        if opts.pool_min_size > opts.pool_max_size:
            opts = cls(**{**values, "pool_min_size": opts.pool_max_size})
        scheme = "postgresql" if parts.scheme in {"postgres", "postgresql"} else parts.scheme
        conninfo = urlunsplit(
            (scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), parts.fragment)
        )
        return conninfo, opts

    def connect_kwargs(self, *, role: str = "") -> dict[str, Any]:
        """libpq parameters every connection gets: UTC sessions, the application name, the timeouts."""
        settings = "-c TimeZone=UTC"
        if self.statement_timeout:
            settings += f" -c statement_timeout={int(self.statement_timeout * 1000)}"
        if self.idle_in_transaction_timeout:
            settings += (
                f" -c idle_in_transaction_session_timeout={int(self.idle_in_transaction_timeout * 1000)}"
            )
        if role in KEYED_ROLES:
            settings += "".join(f" -c {name}={value}" for name, value in KEYED_PLANNING.items())
        name = f"{self.application_name}-{role}" if role else self.application_name
        return {
            "application_name": name[:63],
            "connect_timeout": max(1, round(self.connect_timeout)),
            "options": settings,
        }


def _coerce(name: str, raw: Any, cls: type[PostgresOptions]) -> Any:
    if not isinstance(raw, str):
        return raw
    if name in {"pool_min_size", "pool_max_size"}:
        return int(raw)
    if name == "prepare_threshold":
        return None if raw.lower() in {"", "none", "off"} else int(raw)
    if name in {"statement_timeout", "idle_in_transaction_timeout"}:
        return None if raw.lower() in {"", "none", "off", "0"} else float(raw)
    if name in {"pool_timeout", "connect_timeout"}:
        return float(raw)
    return raw


def merge_conninfo(conninfo: str, extra: dict[str, Any]) -> str:
    """``conninfo`` with ``extra`` libpq options; ``options`` strings are appended, not replaced."""
    base = conninfo_to_dict(conninfo)
    if "options" in base and "options" in extra:
        extra = {**extra, "options": f"{base['options']} {extra['options']}"}
    return make_conninfo(conninfo, **extra)


def hide_password(url: str) -> str:
    """The URL with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(
        (parts.scheme, netloc, parts.path, urlencode(query, safe="*", quote_via=quote), parts.fragment)
    )
