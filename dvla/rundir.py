"""The run directory: resolved config, per-iteration metrics, the JSON log and the summary.

Metrics are appended one JSON line per iteration and flushed at once, so a run that
fails or is killed keeps everything it measured up to that moment.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from dvla.config import PipelineFile


class RunDir:
    """Files of one run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.metrics_path = root / "metrics.jsonl"
        self.log_path = root / "log.jsonl"
        self.summary_path = root / "summary.json"
        self._metrics = self.metrics_path.open("a", encoding="utf-8")

    @staticmethod
    def for_config(cfg: PipelineFile, override: str | None = None) -> RunDir:
        if override:
            return RunDir(Path(override))
        if cfg.run.dir:
            return RunDir(Path(cfg.run.dir))
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return RunDir(Path("runs") / f"{cfg.name}-{stamp}-{os.getpid()}")

    def write_config(self, cfg: PipelineFile) -> None:
        data = cfg.model_dump(mode="json")
        (self.root / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row, default=float) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=float))
        os.replace(tmp, self.summary_path)

    def save_policy(self, state: dict[str, Any]) -> Path:
        """Write the final policy weights atomically (load with ``weights_only=True``)."""
        import torch

        path = self.root / "policy.pt"
        tmp = path.with_suffix(".pt.tmp")
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._metrics.close()
