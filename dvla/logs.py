"""structlog set-up: readable lines on the console, JSON lines in the run directory.

Both outputs go through the standard library's logging, so third-party loggers land in
the same files and the JSON log keeps debug detail even when the console is quiet.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import structlog

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
#: Loggers under this name reach the JSON file only: e.g. a run's failure, which the CLI
#: already reports on the console as its one ``error:`` line.
FILE_ONLY = "dvla.fileonly"


def configure(level: str = "info", json_file: Path | None = None) -> None:
    """(Re)configure logging; safe to call again for a new run directory."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level.upper())
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
            ],
            foreign_pre_chain=_SHARED,
        )
    )
    console.addFilter(lambda record: not record.name.startswith(FILE_ONLY))
    console._dvla = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if json_file is not None:
        fh = logging.FileHandler(json_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                ],
                foreign_pre_chain=_SHARED,
            )
        )
        fh._dvla = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.setLevel(logging.DEBUG)


def close() -> None:
    """Flush and close dvla's handlers (the run's JSON log is complete after this)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dvla", False):
            h.flush()
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
                h.close()


def get(name: str) -> Any:
    """A structlog logger for a module."""
    return structlog.get_logger(name)
