"""Shared test set-up: ``gpu``, ``libero`` and ``hf`` tests skip with a reason where unusable."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    no_libero = pytest.mark.skip(reason="needs the [libero] extra, which is not installed")
    has_libero = importlib.util.find_spec("libero") is not None
    no_hf = pytest.mark.skip(reason="needs the [hf] extra (transformers, peft), not installed")
    has_hf = importlib.util.find_spec("transformers") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "libero" in item.keywords and not has_libero:
            item.add_marker(no_libero)
        if "hf" in item.keywords and not has_hf:
            item.add_marker(no_hf)
