"""GraphedCall: CUDA-graph replay of a function called with fixed shapes (runs only where CUDA is)."""

from __future__ import annotations

import pytest
import torch

from foldcp_hpc.model.graphed import GraphedCall

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphed_call_runs_eagerly_on_cpu():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    graphed = GraphedCall(fn)
    for _ in range(4):
        assert torch.equal(graphed(torch.ones(3)), torch.full((3,), 2.0))
    assert len(calls) == 4 and graphed.replays == 0 and not graphed.recordings


@cuda
def test_graphed_call_replays_and_matches_eager():
    torch.manual_seed(0)
    weight = torch.randn(64, 64, device="cuda")

    def fn(x, t):
        return torch.tanh(x @ weight + t[:, None]).sum(-1, keepdim=True) * x

    graphed = GraphedCall(fn)
    for step in range(5):
        x = torch.randn(8, 64, device="cuda")
        t = torch.randn(8, device="cuda")
        torch.testing.assert_close(graphed(x, t), fn(x, t))
    assert graphed.replays == 3
    # a second shape gets its own recording; a third runs eagerly
    for rows in (4, 4, 4, 2, 2, 2):
        x, t = torch.randn(rows, 64, device="cuda"), torch.randn(rows, device="cuda")
        torch.testing.assert_close(graphed(x, t), fn(x, t))
    assert len(graphed.recordings) == 2 and graphed.replays == 4
    graphed.release()
    assert not graphed.recordings
