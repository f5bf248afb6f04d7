"""GPU checks; each is marked ``gpu`` and skipped (with a reason) where CUDA is absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvla.backends.models.tiny_vla import TinyVLA, TinyVLAOptions
from dvla.backends.simulators.toy import ToyOptions, ToySimulator


@pytest.mark.gpu
def test_tiny_vla_on_cuda_matches_cpu() -> None:
    sim = ToySimulator(ToyOptions(), 8, 0)
    ids = np.arange(8)
    obs = sim.reset(ids, ids % 3, ids)
    torch.manual_seed(0)
    cpu = TinyVLA(TinyVLAOptions(head="binned-gaussian"), sim.spec)
    gpu = TinyVLA(TinyVLAOptions(head="binned-gaussian"), sim.spec).cuda()
    gpu.load_state_dict(cpu.state_dict())
    inputs = cpu.prepare(obs)
    tokens = torch.zeros(8, 7, dtype=torch.long)
    ref = cpu.evaluate(inputs, tokens).logprobs
    out = gpu.evaluate({k: v.cuda() for k, v in inputs.items()}, tokens.cuda()).logprobs
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    actions, toks, logp = gpu.act({k: v.cuda() for k, v in inputs.items()}, deterministic=True)
    assert actions.shape == (8, 7) and toks.dtype == np.int64 and np.isfinite(logp).all()
