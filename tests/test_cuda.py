"""The backends on a real CUDA device: zero-copy views, page-locked exact-size host memory,
device memory actually freed, outputs identical to the model without offload.

Marked ``cuda``: skipped on machines without a CUDA device (CI has none).
"""

from __future__ import annotations

import pytest
import torch

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM

pytestmark = pytest.mark.cuda

PREFETCH = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}


def model_on_cuda(**sizes: int) -> DecoderLM:
    torch.manual_seed(0)
    defaults = {"vocab_size": 1024, "hidden_size": 1024, "num_layers": 8, "num_heads": 8,
                "intermediate_size": 2816}  # fmt: skip
    defaults.update(sizes)
    return DecoderLM(**defaults).cuda().eval()


def inputs(model: DecoderLM) -> torch.Tensor:
    return torch.randint(0, model.embed_tokens.num_embeddings, (2, 64), device="cuda")


def uva(gb: float) -> dict:
    return {"uva": {"cpu_offload_gb": gb}}


@torch.no_grad()
def test_zero_copy_views_read_host_memory():
    model = model_on_cuda()
    ids = inputs(model)
    with apply_offload(model, uva(0.05)) as handle:
        entry = handle._installed.staged.params[-1]
        assert handle._installed.mode == "zero_copy"
        assert entry.param.is_cuda
        assert entry.hosts[0].is_pinned()
        assert entry.param.data_ptr() == entry.hosts[0].data_ptr()  # one address, host and device
        before = model(ids)
        torch.cuda.synchronize()  # the forward's kernels read the host memory written next
        entry.hosts[0].mul_(2)  # writing the host tensor changes what the kernels read
        torch.cuda.synchronize()
        after = model(ids)
        assert not torch.equal(before, after)
        entry.hosts[0].div_(2)
        assert torch.equal(model(ids), before)


@pytest.mark.parametrize("config", [uva(0.05), PREFETCH], ids=["uva", "prefetch"])
@torch.no_grad()
def test_outputs_equal_the_model_without_offload(config):
    model = model_on_cuda()
    ids = inputs(model)
    expected = model(ids)
    with apply_offload(model, config) as handle:
        for _ in range(3):
            assert torch.equal(model(ids), expected)
        assert handle.stats.stalls == 0
    assert torch.equal(model(ids), expected)


@pytest.mark.parametrize("config", [uva(0.05), PREFETCH], ids=["uva", "prefetch"])
def test_device_memory_saved_within_one_percent_of_stats(config):
    model = model_on_cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = apply_offload(model, config)
    torch.cuda.synchronize()
    saved = before - torch.cuda.memory_allocated()
    stats = handle.stats
    assert stats.measured
    assert stats.device_bytes_saved == saved
    assert abs(saved - handle.plan.device_bytes_saved) <= 0.01 * handle.plan.device_bytes_saved
    handle.remove()


@pytest.mark.parametrize("config", [uva(0.05), PREFETCH], ids=["uva", "prefetch"])
def test_host_bytes_pinned_within_two_percent_of_bytes_offloaded(config):
    model = model_on_cuda()
    with apply_offload(model, config) as handle:
        stats = handle.stats
        assert stats.host_bytes_pinned == stats.host_bytes
        assert stats.offloaded_bytes <= stats.host_bytes_pinned <= 1.02 * stats.offloaded_bytes
        assert all(h.is_pinned() for e in handle._installed.staged.params for h in e.hosts)


@torch.no_grad()
def test_prefetch_copies_on_a_side_stream_and_measures_waits():
    model = model_on_cuda()
    ids = inputs(model)
    with apply_offload(model, PREFETCH) as handle:
        ring = handle._installed.rings[0]
        assert ring.copy_stream != torch.cuda.current_stream()
        for _ in range(3):
            model(ids)
        torch.cuda.synchronize()
        stats = handle.stats
        assert stats.wait_ms is not None
        assert stats.wait_ms >= 0
        assert stats.h2d_bytes_per_forward == pytest.approx(handle.plan.offloaded_bytes, rel=0.5)


@torch.no_grad()
def test_prefetch_out_of_order_layers_stall_but_stay_correct():
    model = model_on_cuda(num_layers=6)
    x = torch.randn(2, 32, 1024, device="cuda")
    order = [5, 1, 3, 3, 0, 4, 2, 1]

    def run_layers() -> torch.Tensor:
        h = x
        for i in order:
            h = model.layers[i](h)
        return h

    expected = run_layers()
    with apply_offload(model, PREFETCH) as handle:
        assert torch.equal(run_layers(), expected)
        assert handle.stats.stalls > 0


def test_remove_restores_parameters_on_the_device():
    model = model_on_cuda()
    params = dict(model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    for config in (uva(0.05), PREFETCH):
        apply_offload(model, config).remove()
        for name, param in model.named_parameters():
            assert param is params[name]
            assert param.is_cuda
            assert torch.equal(param, values[name])


def _capped_predict(module, data, callbacks):
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cuda", devices=1, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)  # fmt: skip
    return trainer.predict(module, data)


@pytest.mark.parametrize(
    "config",
    [
        {"uva": {"cpu_offload_gb": 3.0}},
        {"prefetch": {"offload_group_size": 4, "offload_num_in_group": 3}},
    ],
    ids=["uva", "prefetch"],
)
def test_callback_runs_a_model_larger_than_the_memory_cap(config):
    from hydra_offload import OffloadCallback
    from hydra_offload.models import LitDecoderLM, random_tokens

    def module() -> LitDecoderLM:
        torch.manual_seed(0)
        return LitDecoderLM(DecoderLM(vocab_size=1024, hidden_size=2048, num_layers=16,
                                      num_heads=16, intermediate_size=5632))  # fmt: skip

    model_bytes = sum(p.numel() * p.element_size() for p in module().parameters())
    cap = model_bytes // 2
    total = torch.cuda.get_device_properties(0).total_memory
    data = random_tokens(1024, 64, 4, 2)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            _capped_predict(module(), data, [])
        torch.cuda.empty_cache()
        callback = OffloadCallback(config)
        predictions = _capped_predict(module(), data, [callback])
        assert len(predictions) == 2
        assert callback.last_stats is not None
        assert callback.last_stats.device_bytes_saved > model_bytes // 2
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("config", [uva(0.05), PREFETCH], ids=["uva", "prefetch"])
@torch.no_grad()
def test_parameters_still_on_the_cpu_are_offloaded_for_a_cuda_device(config):
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=1024, hidden_size=1024, num_layers=8, num_heads=8,
                      intermediate_size=2816).eval()  # fmt: skip
    ids = torch.randint(0, 1024, (2, 64))
    expected = model.cuda()(ids.cuda())
    model.cpu()
    with apply_offload(model, config, device="cuda") as handle:
        model.to("cuda")  # the rest follows; offloaded weights stay where the offload put them
        assert torch.equal(model(ids.cuda()), expected)
        assert handle.stats.stalls == 0


# --------------------------------------------------------------------------------------------
# Training on the device
# --------------------------------------------------------------------------------------------


def _train(model: DecoderLM, steps: int = 3) -> list[float]:
    ids = inputs(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("config", [PREFETCH, uva(0.05)], ids=["prefetch", "uva"])
def test_training_matches_the_model_without_offload(config):
    # Same kernels on the device; the optimizer of prefetch-offloaded parameters runs on the
    # host (other arithmetic): close, not bit-identical.
    reference = model_on_cuda().train()
    model = model_on_cuda().train()
    expected = _train(reference)
    with apply_offload(model, config) as handle:
        got = _train(model)
        assert handle.stats.stalls == 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_prefetch_gradients_go_to_page_locked_host_memory_after_backward():
    model = model_on_cuda().train()
    ids = inputs(model)
    with apply_offload(model, PREFETCH) as handle:
        offloaded = {p.name for p in handle.plan.params}
        model(ids).float().logsumexp(-1).mean().backward()
        for name, param in model.named_parameters():
            if name in offloaded:
                assert param.grad is not None, name
                assert not param.grad.is_cuda, name
                assert param.grad.is_pinned(), name
                assert not param.is_cuda, name  # the optimizer steps on the host weights
            else:
                assert param.grad.is_cuda, name


def test_uva_gradients_accumulate_in_host_memory():
    model = model_on_cuda().train()
    ids = inputs(model)
    with apply_offload(model, uva(0.05)) as handle:
        entry = handle._installed.staged.params[-1]
        for _ in range(2):
            model(ids).float().logsumexp(-1).mean().backward()
        grad = entry.param.grad
        assert grad.is_cuda  # a zero-copy view: the device type of its parameter
        storage = handle._installed._grad_storage
        assert storage is not None
        assert storage.pinned_bytes > 0
        start = storage.tensors[0].data_ptr()
        assert start <= grad.data_ptr() < start + storage.nbytes  # read and written in place


def test_backward_prefetches_in_reverse_without_stalls():
    model = model_on_cuda().train()
    ids = inputs(model)
    config = {"prefetch": {"offload_group_size": 1, "offload_prefetch_step": 2}}
    with apply_offload(model, config) as handle:
        for _ in range(3):
            model(ids).float().logsumexp(-1).mean().backward()
        assert handle.stats.stalls == 0
        layers = len(handle.plan.stacks[0].offloaded_layers)
        assert handle.stats.loads == 3 * 2 * (layers - 2)


# ------------------------------------------------------------------------------ the timeline

ALL_OFFLOADED = {"prefetch": {"offload_group_size": 1, "offload_prefetch_step": 2}}


@pytest.mark.parametrize("training", [False, True], ids=["forward", "training-step"])
def test_the_timeline_is_timed_on_the_device_and_copies_run_beside_compute(training):
    model = model_on_cuda().train(training)
    ids = inputs(model)

    def step() -> None:
        if training:
            model(ids).float().logsumexp(-1).mean().backward()
        else:
            with torch.no_grad():
                model(ids)

    with apply_offload(model, ALL_OFFLOADED) as handle:
        step()
        with handle.trace() as trace:
            step()
    assert trace.clock == "device timing events"
    assert trace.stalls == []
    layers = list(range(8))  # every layer offloaded, two copies ahead
    assert [s.layer for s in trace.lane("compute", "forward")] == layers
    expected = layers[::-1] if training else []
    assert [s.layer for s in trace.lane("compute", "backward")] == expected
    compute, copies = trace.lane("compute"), trace.lane("copy")
    for span in compute:
        loaded = [c for c in copies if c.layer == span.layer and c.start_ms <= span.start_ms]
        if loaded:  # the copy it waited for ended before it started (device time)
            assert loaded[-1].end_ms <= span.start_ms + 1e-3
    # The side stream copies the layer two ahead while the compute stream runs the next one.
    assert any(c.start_ms < s.end_ms and s.start_ms < c.end_ms for c in copies for s in compute)


def test_the_callback_draws_a_cuda_step_s_timeline():
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import Logger

    from hydra_offload import OffloadCallback
    from hydra_offload.integrations.lightning import TIMELINE_IMAGE_TAG
    from hydra_offload.models import LitDecoderLM, random_tokens

    class Images(Logger):
        name, version = "images", "0"

        def __init__(self) -> None:
            super().__init__()
            self.keys: list[str] = []

        def log_image(self, key: str, images: list, step: int | None = None) -> None:
            self.keys.append(key)

        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            pass

        def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
            pass

    torch.manual_seed(0)
    logger = Images()
    trainer = Trainer(accelerator="cuda", devices=1, max_steps=3, logger=logger,
                      callbacks=[OffloadCallback(ALL_OFFLOADED)], enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    module = LitDecoderLM(DecoderLM(vocab_size=1024, hidden_size=512, num_layers=4,
                                    num_heads=8, intermediate_size=1024))  # fmt: skip
    trainer.fit(module, random_tokens(1024, 64, 6, 2))
    assert logger.keys.count(TIMELINE_IMAGE_TAG) == 1
