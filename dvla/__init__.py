"""dvla: an asyncio orchestration engine for asynchronous RL of vision-language-action policies.

Importing the package is cheap and needs no optional dependency: torch-backed pieces
live in sub-modules imported on use, and backends load through entry points on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
