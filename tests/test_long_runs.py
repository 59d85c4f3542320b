"""Long runs and interrupted runs: nothing grows, nothing is left offloaded."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from hydra_offload import OffloadCallback, apply_offload
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens


def tiny() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(num_layers=4, hidden_size=16, num_heads=2, intermediate_size=32,
                     vocab_size=32).eval()  # fmt: skip


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.slow
@torch.no_grad()
def test_ten_thousand_prefetch_forwards_grow_neither_memory_nor_objects():
    model = tiny()
    ids = torch.randint(0, 32, (1, 4))
    expected = model(ids)
    with apply_offload(model, {"prefetch": {"offload_group_size": 2}}) as handle:
        for _ in range(200):  # warm up allocator and caches
            model(ids)
        gc.collect()
        objects, rss = len(gc.get_objects()), rss_bytes()
        for _ in range(10_000):
            out = model(ids)
        gc.collect()
        grown_objects = len(gc.get_objects()) - objects
        grown_rss = rss_bytes() - rss
        assert torch.equal(out, expected)
        assert handle.stats.stalls == 0
        assert handle.stats.forwards == 10_200
        slots = [slot for entry in handle._installed.pool.slots for slot in entry]
        assert all(type(slot.free).__name__ == "NullEvent" for slot in slots)  # no events pile up
    assert grown_objects < 50, grown_objects
    assert grown_rss < 16 * 2**20, grown_rss


def test_keyboard_interrupt_during_fit_still_restores_the_model():
    module = LitDecoderLM(tiny())
    params = dict(module.named_parameters())

    class Interrupt(LitDecoderLM):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    module.__class__ = Interrupt
    callback = OffloadCallback({"prefetch": {"offload_group_size": 2}})
    trainer = Trainer(accelerator="cpu", max_steps=5, callbacks=[callback], logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits
            trainer.fit(module, random_tokens(32, 8, 16, 4))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert callback.handle is None
    assert callback.last_stats is not None
    for name, param in module.named_parameters():
        assert param is params[name]
        assert param.device.type == "cpu"
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())
