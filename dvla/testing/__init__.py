"""Test doubles for dvla's own tests and for plugin authors.

:mod:`dvla.testing.fakes` holds a tiny deterministic simulator, a tiny linear policy and
helpers that build trajectories and groups with chosen returns, so a lane, an algorithm
or a new backend can be exercised in milliseconds without the toy scene or a real model.
"""

from __future__ import annotations

from dvla.testing.fakes import (
    FakePolicy,
    FakePolicyOptions,
    FakeSimulator,
    FakeSimulatorOptions,
    fake_spec,
    make_group,
    make_obs,
    make_trajectory,
)

__all__ = [
    "FakePolicy",
    "FakePolicyOptions",
    "FakeSimulator",
    "FakeSimulatorOptions",
    "fake_spec",
    "make_group",
    "make_obs",
    "make_trajectory",
]
