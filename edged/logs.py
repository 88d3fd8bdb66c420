"""Structured logging: configured once, in the entry point."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: each logging method's level, for the level filter
_METHOD_LEVELS = {
    **_LEVELS,
    "warn": logging.WARNING,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "msg": logging.INFO,
}
_threshold = logging.INFO


def set_level(level: str) -> None:
    """Log ``level`` and above from now on (SIGHUP applies a changed ``log.level`` this way).

    Raises:
        KeyError: not one of debug, info, warning, error.
    """
    global _threshold  # noqa: PLW0603 - the one setting every logger reads
    _threshold = _LEVELS[level]


def _filter_level(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    if _METHOD_LEVELS.get(method, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event


def configure(level: str = "info", fmt: str = "json") -> None:
    """Render every event as one JSON line on stdout (or readable lines for a terminal), with
    the context variables (model, version, request_id) merged in first."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    set_level(level)
    structlog.configure(
        processors=[
            _filter_level,  # first: a dropped event costs one call (the level can change)
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
