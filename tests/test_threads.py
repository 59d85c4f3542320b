"""An offloaded model used from several threads: in turn works; at once is refused."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from hydra_offload import OffloadError, apply_offload
from hydra_offload.models import DecoderLM


def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64,
                     vocab_size=64).eval()  # fmt: skip


@torch.no_grad()
def test_threads_taking_turns_get_correct_outputs():
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    results: list[bool] = []
    with apply_offload(m, {"prefetch": {"offload_group_size": 2}}):
        for _ in range(3):
            worker = threading.Thread(target=lambda: results.append(torch.equal(m(ids), expected)))
            worker.start()
            worker.join()
    assert results == [True, True, True]


class _Gate(nn.Module):
    """Blocks the first forward inside the model until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.go_on = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inside.is_set():
            self.inside.set()
            self.go_on.wait(timeout=30)
        return x


@torch.no_grad()
def test_a_second_thread_entering_a_running_forward_is_refused():
    m = model()
    gate = _Gate()
    m.norm = nn.Sequential(gate, m.norm)  # the first forward stops here, inside the model
    ids = torch.randint(0, 64, (2, 8))
    with apply_offload(m, {"prefetch": {"offload_group_size": 2}}):
        first = threading.Thread(target=lambda: m(ids))
        first.start()
        assert gate.inside.wait(timeout=30)
        try:
            with pytest.raises(OffloadError, match="not thread-safe"):
                m(ids)
        finally:
            gate.go_on.set()
            first.join()
        m(ids)  # free again once the first forward has finished


def test_forwards_are_counted_however_the_model_is_entered():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids)

    wrapper = Wrapper()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), apply_offload(wrapper, {"prefetch": {"offload_group_size": 2}}) as h:
        wrapper(ids)  # through the wrapper
        wrapper.model(ids)  # straight to the inner model
        assert h.stats.forwards == 2
        assert h.stats.h2d_bytes_per_forward == h.plan.offloaded_bytes
