"""The weight (control) plane: versioned weight distribution, separate from the data plane."""

from __future__ import annotations
