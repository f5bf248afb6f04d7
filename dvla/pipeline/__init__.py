"""The swimlane pipeline: sample, infer, learn and sync lanes and the coordinator that runs them."""

from dvla.pipeline.coordinator import Coordinator
from dvla.pipeline.runtime import RunSummary

__all__ = ["Coordinator", "RunSummary"]
