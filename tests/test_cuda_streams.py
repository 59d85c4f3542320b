"""The backends on a real CUDA device, under stress: streams delayed on purpose and the CUDA
sanitizer find no race; training on the device resumes, accumulates, scales fp16 gradients
and steps fused AdamW like the model without offload; device and host memory are given back
and counted exactly; compiled models, a second device and a CUDA default device.

Races. ``torch.cuda._sleep`` queues a kernel that spins for a number of clock cycles. Queued
before every copy a backend makes (on the stream the copy runs on: the copy stream for
prefetch loads, the gradient stream for gradients going to host memory, the compute stream
for UVA per-forward copies) and in the middle of every layer (on the compute stream, forward
and backward), it makes every missing wait visible: a layer that does not wait for its copy
reads stale weights, a copy that does not wait for the layer before overwrites weights still
being read, a gradient read before it is complete is wrong. Outputs, gradients and parameters
are compared bit for bit with the model without offload.

Bit-identical training needs deterministic kernels and a host step that rounds like the
device's: the math attention kernels (the fused ones may add up their backward in a varying
order), and SGD without momentum at a power-of-two rate, whose update ``w - lr * g`` then
rounds once on the host and on the device alike (``lr * g`` is exact).

Marked ``cuda``: skipped on machines without a CUDA device (CI has none).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hydra_offload.integrations.lightning
from hydra_offload import OffloadCallback, apply_offload
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens
from hydra_offload.runtime.device import DeviceRuntime

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
]

SIZES = {"vocab_size": 1024, "hidden_size": 1024, "num_layers": 8, "num_heads": 8,
         "intermediate_size": 2816}  # fmt: skip
LIT_SIZES = {**SIZES, "num_layers": 4}  # under Lightning: layers 1 and 3 offloaded
PREFETCH = {"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}  # 1, 3, 5, 7
# Every layer offloaded, two slot sets: each copy overlaps the layer before it.
PREFETCH_EVERY_LAYER = {"prefetch": {"offload_group_size": 1, "offload_prefetch_step": 2}}
# Every layer offloaded, one slot set: each layer's copy starts when the one before is done.
PREFETCH_ONE_SLOT_SET = {"prefetch": {"offload_group_size": 1, "offload_prefetch_step": 1}}
LR = 2.0**-6  # a power of two: SGD updates round the same on the host and on the device
MIB = 1 << 20


def uva(gb: float) -> dict:
    return {"uva": {"cpu_offload_gb": gb}}


UVA = uva(0.2)  # the embedding and about the first four layers
BACKENDS = [
    pytest.param(PREFETCH, None, id="prefetch"),
    pytest.param(UVA, None, id="uva"),
    pytest.param(UVA, False, id="uva-copy"),
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def decoder(**sizes: int) -> DecoderLM:
    """The decoder at the test sizes, the same weights every time, on the CUDA device."""
    torch.manual_seed(0)
    return DecoderLM(**{**SIZES, **sizes}).cuda()


def token_ids(count: int = 1, seed: int = 1, device: str = "cuda") -> list[torch.Tensor]:
    """``count`` batches of token ids ``(2, 64)`` on ``device``, the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, SIZES["vocab_size"], (2, 64), generator=generator).to(device)
        for _ in range(count)
    ]


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float().logsumexp(-1).mean()


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies (on the CPU) of the gradients, by name; host gradients are reused later."""
    return {
        name: param.grad.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.grad is not None
    }


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()}


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str):
    assert got.keys() == expected.keys(), what
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{what}: {name}"


class Run(NamedTuple):
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]  # what each optimizer step was given
    params: dict[str, torch.Tensor]


def sgd_run(model: nn.Module, steps: list[list[torch.Tensor]]) -> Run:
    """One SGD step (no momentum, rate ``LR``) per entry of ``steps``, after a forward and a
    backward pass for each of its batches (the gradients add up)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for batches in steps:
        for ids in batches:
            loss = lm_loss(model, ids)
            loss.backward()
            losses.append(loss.detach().cpu())
        grads.append(grads_of(model))
        optimizer.step()
        optimizer.zero_grad()
    return Run(losses, grads, params_of(model))


def assert_runs_identical(got: Run, expected: Run) -> None:
    assert len(got.losses) == len(expected.losses) > 0
    for index, (a, b) in enumerate(zip(got.losses, expected.losses, strict=True)):
        assert torch.equal(a, b), f"loss {index}: {a.item()} != {b.item()}"
    assert len(got.grads) == len(expected.grads) > 0
    for step, (a, b) in enumerate(zip(got.grads, expected.grads, strict=True)):
        assert_identical(a, b, f"gradient before step {step}")
    assert_identical(got.params, expected.params, "parameter after training")


def adamw_run(
    model: nn.Module, batches: list[torch.Tensor], **options: Any
) -> tuple[list[float], torch.optim.AdamW]:
    """One AdamW step per batch; the losses, and the optimizer (its state)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **options)
    losses = []
    for ids in batches:
        loss = lm_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


@pytest.fixture
def exact_attention() -> Iterator[None]:
    """The math attention kernels: their backward adds up in a fixed order, so two runs of
    the same computation give the same bits (the fused kernels' backward may not)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.fixture(scope="module")
def cycles_per_ms() -> float:
    """How many clock cycles ``torch.cuda._sleep`` spins per millisecond here, measured with
    timing events (the clock rate varies between devices and with their load)."""
    torch.cuda._sleep(100_000_000)  # loads the kernel, and brings the clock up to speed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


class _Spin(torch.autograd.Function):
    """A copy of its input, after a spin kernel on the current stream, in forward and in
    backward (``cycles`` 0: the same copy, no spin)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cycles: int) -> torch.Tensor:
        ctx.cycles = cycles
        if cycles:
            torch.cuda._sleep(cycles)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.cycles:
            torch.cuda._sleep(ctx.cycles)
        return grad, None


def spin_inside_layers(model: DecoderLM, cycles: int) -> None:
    """Delay the compute stream halfway through every layer, after its attention and before
    its MLP, in forward and backward: a layer's weights are being read during the spin."""

    def spin(module: nn.Module, args: tuple) -> tuple:
        return (_Spin.apply(args[0], cycles), *args[1:])

    for layer in model.layers:
        layer.mlp.register_forward_pre_hook(spin)


def delay_copies(monkeypatch: pytest.MonkeyPatch, cycles: int) -> None:
    """Every copy a backend queues waits behind a spin kernel on the copy's own stream."""
    copy = DeviceRuntime.copy

    def delayed(self: DeviceRuntime, stream: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)
        copy(self, stream, dst, src)

    monkeypatch.setattr(DeviceRuntime, "copy", delayed)


def device_memory() -> tuple[int, int]:
    """``(requested, allocated)`` bytes of the CUDA caching allocator, once the device is idle.

    Requested: what tensors asked for. Allocated (``memory_allocated``): the blocks handed
    out, which may be larger: a request that lands in a free block less than 1 MiB larger
    takes all of it. Emptying the cache releases nothing a tensor holds; it completes the
    frees that waited for work queued on a side stream (``record_stream``).
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_stats()["requested_bytes.all.current"], torch.cuda.memory_allocated()


# --------------------------------------------------------------------------------------------
# Races: every stream delayed, the outputs stay bit-identical
# --------------------------------------------------------------------------------------------

COPY_DELAY_MS = 0.25  # before every copy: about as long as copying a layer's largest weight
COMPUTE_DELAY_MS = 1.0  # in every layer: several times as long as the layer computes
STRESSED = [
    pytest.param(PREFETCH, None, id="prefetch"),
    pytest.param(PREFETCH_EVERY_LAYER, None, id="prefetch-every-layer"),
    pytest.param(UVA, False, id="uva-copy"),
]


@pytest.mark.parametrize(("config", "zero_copy"), STRESSED)
@torch.no_grad()
def test_outputs_stay_bit_identical_when_every_stream_is_delayed(
    config, zero_copy, monkeypatch, cycles_per_ms
):
    reference, model = decoder().eval(), decoder().eval()
    spin_inside_layers(reference, 0)
    spin_inside_layers(model, int(COMPUTE_DELAY_MS * cycles_per_ms))
    batches = token_ids(3)
    expected = [reference(ids) for ids in batches]
    delay_copies(monkeypatch, int(COPY_DELAY_MS * cycles_per_ms))
    with apply_offload(model, config, zero_copy=zero_copy) as handle:
        for _ in range(2):
            for ids, out in zip(batches, expected, strict=True):
                assert torch.equal(model(ids), out)
        assert handle.stats.stalls == 0
        assert handle.stats.loads > 0


@pytest.mark.parametrize(("config", "zero_copy"), STRESSED)
@pytest.mark.usefixtures("exact_attention")
def test_training_stays_bit_identical_when_every_stream_is_delayed(
    config, zero_copy, monkeypatch, cycles_per_ms
):
    # Three steps of two micro-batches each: gradients go to host memory on the gradient
    # stream, the second adds to the first, the host step's weights are copied in again.
    steps = [token_ids(2, seed=step) for step in range(3)]
    reference, model = decoder(), decoder()
    spin_inside_layers(reference, 0)
    spin_inside_layers(model, int(COMPUTE_DELAY_MS * cycles_per_ms))
    expected = sgd_run(reference, steps)
    delay_copies(monkeypatch, int(COPY_DELAY_MS * cycles_per_ms))
    with apply_offload(model, config, zero_copy=zero_copy) as handle:
        got = sgd_run(model, steps)
        assert handle.stats.stalls == 0
    assert_runs_identical(got._replace(params=params_of(model)), expected)


def test_compute_waits_for_a_late_copy_and_the_wait_is_measured(monkeypatch, cycles_per_ms):
    # One slot set for every layer: the copy of layer 1 starts once layer 0 is done, and
    # layer 1 comes next, so the compute stream has nothing to do but wait while it runs.
    model = decoder().eval()
    (ids,) = token_ids()
    with torch.no_grad():
        expected = model(ids)
    copy = DeviceRuntime.copy
    late = {"cycles": int(20 * cycles_per_ms), "stream": None}
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def first_copy_late(self, stream, dst, src):
        if late["stream"] is not None and stream == late["stream"]:
            late["stream"] = None  # only the first copy of the next load
            with torch.cuda.stream(stream):
                begin.record()
                torch.cuda._sleep(late["cycles"])
                end.record()
        copy(self, stream, dst, src)

    monkeypatch.setattr(DeviceRuntime, "copy", first_copy_late)
    with apply_offload(model, PREFETCH_ONE_SLOT_SET) as handle, torch.no_grad():
        model(ids)  # the slots hold layer 0 for the next forward
        waited_before = handle.stats.wait_ms  # waits for the device: every pair is read
        late["stream"] = handle._installed.copy_stream
        assert torch.equal(model(ids), expected)
        waited = handle.stats.wait_ms - waited_before
        assert handle.stats.stalls == 0
    end.synchronize()
    injected = begin.elapsed_time(end)
    assert injected >= 5  # about 20 ms, as calibrated (the clock rate may have changed since)
    assert waited >= injected


# --------------------------------------------------------------------------------------------
# The CUDA sanitizer finds no race
# --------------------------------------------------------------------------------------------

_SANITIZED = """
import copy

import torch
from torch.cuda._sanitizer import cuda_sanitizer
from torch.nn.attention import SDPBackend, sdpa_kernel

from hydra_offload import apply_offload
from hydra_offload.models import DecoderLM

assert cuda_sanitizer.enabled, "TORCH_CUDA_SANITIZER did not turn the sanitizer on"
torch.manual_seed(0)
original = DecoderLM(vocab_size=256, hidden_size=256, num_layers=4, num_heads=4,
                     intermediate_size=704).cuda()
batches = [torch.randint(0, 256, (2, 32), device="cuda") for _ in range(3)]


def train(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0**-6)
    losses = []
    for ids in batches:
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(batches[0]).float().sum().item())
    return losses


configs = [
    ({"prefetch": {"offload_group_size": 2, "offload_num_in_group": 1}}, None),
    ({"uva": {"cpu_offload_gb": 0.005}}, False),
]
with sdpa_kernel(SDPBackend.MATH):
    reference = copy.deepcopy(original)
    expected = train(reference)
    for config, zero_copy in configs:
        model = copy.deepcopy(original)
        with apply_offload(model, config, zero_copy=zero_copy) as handle:
            got = train(model)
            assert handle.stats.stalls == 0
        torch.cuda.synchronize()
        assert got == expected, (config, got, expected)
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b), config
print("sanitized runs identical")
"""


def test_the_cuda_sanitizer_finds_no_race_in_training_and_inference():
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SANITIZED],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "CSAN" not in done.stderr, done.stderr[-6000:]
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.strip().splitlines()[-1] == "sanitized runs identical"


# --------------------------------------------------------------------------------------------
# Under Lightning on the device
# --------------------------------------------------------------------------------------------


class Recorder(LitDecoderLM):
    """The decoder at ``LIT_SIZES``, the same weights every time; keeps every training and
    validation loss, and the gradients the first ``grad_steps`` optimizer steps are given.
    ``sgd``: plain SGD at the power-of-two rate instead of AdamW."""

    def __init__(self, *, sgd: bool = False, grad_steps: int = 0) -> None:
        torch.manual_seed(0)
        super().__init__(DecoderLM(**LIT_SIZES), lr=1e-3)
        self.sgd = sgd
        self.grad_steps = grad_steps
        self.losses: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses["train"].append(loss.detach().to("cpu", copy=True))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss)
        self.losses["val"].append(loss.detach().to("cpu", copy=True))

    def on_before_optimizer_step(self, optimizer) -> None:
        if len(self.grads) < self.grad_steps:
            self.grads.append(grads_of(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=LR)
        return super().configure_optimizers()


def lit_tokens(samples: int, seed: int = 0):
    """Batches of two sequences of 65 tokens (64 predicted), in a fixed order."""
    return random_tokens(
        vocab_size=SIZES["vocab_size"], seq_len=65, samples=samples, batch_size=2, seed=seed
    )


def cuda_trainer(root: Path, *callbacks: Callback, **settings: Any) -> Trainer:
    options = {
        "accelerator": "cuda",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    return Trainer(callbacks=list(callbacks), **{**options, **settings})


def assert_close_by_name(got: dict, expected: dict, **tolerance: float) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=name, **tolerance)


def test_prefetch_training_resumed_from_a_checkpoint_continues_the_uninterrupted_run(tmp_path):
    # Every weight trains, offloaded ones included: AdamW steps layers 1 and 3 on the host,
    # with its state in host memory. Three steps an epoch; the checkpoint ends epoch 0.
    data = lit_tokens(samples=6)
    straight = Recorder()
    cuda_trainer(tmp_path, OffloadCallback(PREFETCH), max_epochs=2).fit(straight, data)

    first = Recorder()
    saving = ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="epoch0", save_on_train_epoch_end=True
    )
    cuda_trainer(
        tmp_path, OffloadCallback(PREFETCH), saving, max_epochs=1, enable_checkpointing=True
    ).fit(first, data)
    checkpoint = tmp_path / "checkpoints" / "epoch0.ckpt"
    assert checkpoint.exists()

    # Loading the optimizer state casts it to where each parameter is at that moment (the
    # device: a slot) and Lightning moves it to the device; the host step must still find
    # it in host memory, or it fails with "Expected all tensors to be on the same device".
    resumed = Recorder()
    trainer = cuda_trainer(tmp_path, OffloadCallback(PREFETCH), max_epochs=2)
    try:
        trainer.fit(resumed, data, ckpt_path=checkpoint)
    except RuntimeError as error:
        pytest.fail(f"resuming with the offload failed: {error}")
    assert trainer.global_step == 6
    # Both runs step the same host AdamW on the same data: only the last float32 bits of
    # attention's backward (its fused kernels add up in a varying order) can differ, and
    # stay far below the tolerance over six steps. A lost, reset or misplaced optimizer state
    # moves weights by about the rate, 1e-3: a hundred times the tolerance.
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    assert_close_by_name(params_of(resumed), params_of(straight), **tolerance)
    torch.testing.assert_close(resumed.losses["train"], straight.losses["train"][3:], **tolerance)


@pytest.mark.usefixtures("exact_attention")
def test_uva_copy_mode_accumulates_two_backward_passes_like_the_model_without_offload():
    steps = [token_ids(2, seed=step) for step in range(2)]
    expected = sgd_run(decoder(), steps)
    model = decoder()
    with apply_offload(model, UVA, zero_copy=False) as handle:
        assert handle._installed.mode == "copy"
        got = sgd_run(model, steps)
    assert_runs_identical(got._replace(params=params_of(model)), expected)


@pytest.mark.usefixtures("exact_attention")
def test_uva_copy_mode_under_lightning_accumulates_grad_batches_like_the_run_without_offload(
    monkeypatch, tmp_path
):
    # OffloadCallback has no zero_copy setting: the one it applies with is made a copy-mode one.
    monkeypatch.setattr(
        hydra_offload.integrations.lightning,
        "apply_offload",
        functools.partial(apply_offload, zero_copy=False),
    )
    data = lit_tokens(samples=8)  # two optimizer steps of two micro-batches

    def fit(*callbacks: Callback) -> Recorder:
        lit = Recorder(sgd=True, grad_steps=2)
        trainer = cuda_trainer(tmp_path, *callbacks, max_steps=2, accumulate_grad_batches=2)
        trainer.fit(lit, data)
        assert trainer.global_step == 2
        return lit

    expected = fit()
    callback = OffloadCallback(UVA)
    got = fit(callback)
    assert callback.last_stats.loads > 0  # per-forward copies: copy mode (zero-copy has none)
    assert len(got.grads) == len(expected.grads) == 2
    for step, (a, b) in enumerate(zip(got.grads, expected.grads, strict=True)):
        assert_identical(a, b, f"gradient before step {step}")
    assert len(got.losses["train"]) == 4
    for a, b in zip(got.losses["train"], expected.losses["train"], strict=True):
        assert torch.equal(a, b)
    assert_identical(params_of(got), params_of(expected), "parameter after training")


# --------------------------------------------------------------------------------------------
# Mixed precision and fused AdamW on host gradients
# --------------------------------------------------------------------------------------------

# The first step's gradients are the device ones bit for bit: the same weights, the same
# kernels, and unscaling multiplies by a power of two. After it, an fp16 forward sees weights
# that a host AdamW step rounded differently in the last fp32 bits, which an fp16 cast mostly
# rounds away: a thousandth covers the rest.
FP16_LOSS_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}


@pytest.mark.usefixtures("exact_attention")
def test_prefetch_trains_under_fp16_autocast_with_a_grad_scaler():
    batches = token_ids(6)

    def train(model: nn.Module) -> tuple[list[float], list[dict[str, torch.Tensor]], float]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda")
        losses, grads = [], []
        for ids in batches:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = lm_loss(model, ids)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # host gradients too: divided, checked for inf
            grads.append(grads_of(model))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, grads, scaler.get_scale()

    expected, expected_grads, expected_scale = train(decoder())
    model = decoder()
    initial = params_of(model)
    with apply_offload(model, PREFETCH) as handle:
        offloaded = [p.name for p in handle.plan.params]
        losses, grads, scale = train(model)
        assert handle.stats.stalls == 0
    params = params_of(model)
    assert_identical(grads[0], expected_grads[0], "unscaled gradient of step 0")
    assert torch.tensor(losses).isfinite().all()
    assert all(p.isfinite().all() for p in params.values())
    assert scale == expected_scale  # the same steps skipped (none, or the same ones)
    torch.testing.assert_close(losses, expected, **FP16_LOSS_TOLERANCE)
    assert all(not torch.equal(params[n], initial[n]) for n in offloaded), "not trained"


@pytest.mark.usefixtures("exact_attention")
def test_prefetch_trains_with_lightning_16_mixed_precision(tmp_path):
    data = lit_tokens(samples=12)

    def fit(*callbacks: Callback) -> tuple[Recorder, float]:
        lit = Recorder(grad_steps=1)
        trainer = cuda_trainer(tmp_path, *callbacks, precision="16-mixed", max_steps=6)
        trainer.fit(lit, data)
        assert trainer.global_step == 6
        return lit, trainer.precision_plugin.scaler.get_scale()

    expected, expected_scale = fit()
    got, scale = fit(OffloadCallback(PREFETCH))
    # Lightning unscales before on_before_optimizer_step, where the gradients are recorded.
    assert_identical(got.grads[0], expected.grads[0], "unscaled gradient of step 0")
    losses = torch.stack(got.losses["train"])
    assert losses.isfinite().all()
    assert all(p.isfinite().all() for p in params_of(got).values())
    assert scale == expected_scale
    torch.testing.assert_close(losses, torch.stack(expected.losses["train"]), **FP16_LOSS_TOLERANCE)
    offloaded = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(got.get_parameter(offloaded), Recorder().get_parameter(offloaded))


def test_fused_adamw_steps_prefetch_offloaded_parameters_on_the_host():
    batches = token_ids(3)
    reference = decoder()
    expected_losses, _ = adamw_run(reference, batches, fused=True)
    model = decoder()
    with apply_offload(model, PREFETCH) as handle:
        losses, optimizer = adamw_run(model, batches, fused=True)
        assert optimizer.param_groups[0]["fused"] is True
        offloaded = {p.name for p in handle.plan.params}
        for name, param in model.named_parameters():
            state = optimizer.state[param]
            on = "cpu" if name in offloaded else "cuda"
            assert state["exp_avg"].device.type == on, name
            assert state["step"].device.type == on, name  # fused: the count lives with it
        assert handle.stats.stalls == 0
    # The fused host kernel and the fused device kernel round in different orders.
    torch.testing.assert_close(losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert_close_by_name(params_of(model), params_of(reference), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Memory given back, and counted exactly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training-step"])
@pytest.mark.parametrize(("config", "zero_copy"), BACKENDS)
def test_device_memory_is_back_to_baseline_right_after_remove(config, zero_copy, train):
    model = decoder()
    (ids,) = token_ids()
    lm_loss(model, ids).backward()  # the BLAS workspaces exist before the baseline
    model.zero_grad()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    requested, allocated = device_memory()
    handle = apply_offload(model, config, zero_copy=zero_copy)
    if train:
        lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    else:
        with torch.no_grad():
            model(ids)
    handle.remove()
    # After a step, AdamW's two moments of every parameter are on the device (those of
    # offloaded parameters came back with them); its step counts stay on the CPU.
    state = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) if train else 0
    now_requested, now_allocated = device_memory()  # no gc.collect(): nothing waits for it
    assert now_requested == requested + state
    # Each tensor allocated since the baseline may sit in a block up to 1 MiB larger or
    # smaller than the one it replaced; the prefetch pool alone is 49 MiB.
    allocated_since = len(handle.plan.params) + (2 * len(list(model.parameters())) if train else 0)
    assert abs(now_allocated - (allocated + state)) <= allocated_since * MIB


@pytest.mark.parametrize(
    ("config", "zero_copy", "multiples"),
    [
        pytest.param(PREFETCH, None, (2, 3), id="prefetch"),
        pytest.param(UVA, None, (2, 2), id="uva"),
        pytest.param(UVA, False, (2, 3), id="uva-copy"),
    ],
)
def test_pinned_bytes_count_weights_gradients_and_staging(config, zero_copy, multiples):
    # After the first backward: weights and gradients. After the second, where gradients are
    # copied to host memory, a staging buffer each that they land in before being added;
    # zero-copy gradients add up in place.
    model = decoder().train()
    (ids,) = token_ids()
    with apply_offload(model, config, zero_copy=zero_copy) as handle:
        weights = handle.plan.offloaded_bytes
        for backward, multiple in enumerate(multiples, 1):
            lm_loss(model, ids).backward()
            stats = handle.stats
            assert stats.host_bytes_pinned == stats.host_bytes, backward
            expected = multiple * weights
            assert expected <= stats.host_bytes_pinned <= 1.02 * expected, backward


@pytest.mark.parametrize(("config", "zero_copy"), BACKENDS)
def test_the_offload_takes_nothing_from_pytorchs_pinned_memory_cache(config, zero_copy):
    host_memory_stats = getattr(torch.cuda, "host_memory_stats", None)
    if host_memory_stats is None:
        pytest.skip("this torch has no torch.cuda.host_memory_stats")
    model = decoder().train()
    (ids,) = token_ids()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.cuda.synchronize()
    keys = ("allocated_bytes.current", "active_requests.allocated")
    before = host_memory_stats()
    if not all(key in before for key in keys):
        pytest.skip(f"torch.cuda.host_memory_stats() has no {keys}")
    with apply_offload(model, config, zero_copy=zero_copy):
        for _ in range(2):
            lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            model(ids)
    torch.cuda.synchronize()
    after = host_memory_stats()
    # Nothing grew the cache, and nothing was handed out of it.
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}


def test_fit_validate_predict_in_one_process_keep_one_offload_at_a_time(tmp_path):
    train_data, val_data = lit_tokens(samples=6), lit_tokens(samples=4, seed=1)

    def stages(lit: Recorder, *callbacks: Callback) -> tuple[dict[str, int], list]:
        """Fit, validate and predict with one Trainer; the peak device memory of each."""
        trainer = cuda_trainer(tmp_path, *callbacks, max_steps=3)
        peaks = {}
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(lit, train_data, val_data)
        peaks["fit"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.validate(lit, val_data)
        peaks["validate"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        predictions = trainer.predict(lit, val_data)
        peaks["predict"] = torch.cuda.max_memory_allocated()
        return peaks, predictions

    expected = Recorder()
    expected_peaks, expected_predictions = stages(expected)
    callback = OffloadCallback(PREFETCH)
    got = Recorder()
    peaks, predictions = stages(got, callback)

    # The same results: training steps AdamW on the host for layers 1 and 3 (other rounding).
    assert len(got.losses["train"]) == 3
    assert len(got.losses["val"]) == len(expected.losses["val"]) == 2 + 2  # fit, validate
    for stage in ("train", "val"):
        torch.testing.assert_close(got.losses[stage], expected.losses[stage], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predictions, expected_predictions, rtol=1e-4, atol=1e-4)

    # Every stage saves what the plan says (offloaded weights less the pool): a pool left
    # over from the stage before, or a second one, would take a pool's worth of it back.
    plan = callback.last_plan
    margin = plan.pool_bytes // 2
    for stage, peak in peaks.items():
        assert expected_peaks[stage] - peak >= plan.device_bytes_saved - margin, stage
    assert peaks["validate"] <= peaks["fit"] + margin


# --------------------------------------------------------------------------------------------
# torch.compile, another device, a CUDA default device
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
@torch.no_grad()
def test_inductor_under_bf16_autocast_matches_eager_and_loads_every_call():
    model = decoder(num_layers=4).eval()
    (ids,) = token_ids()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(ids)
        with apply_offload(model, PREFETCH) as handle:
            assert torch.equal(model(ids), expected)  # eager: the same kernels
            loads = handle.stats.loads
            layers = len(handle.plan.stacks[0].offloaded_layers)
            compiled = torch.compile(model)
            for calls in range(1, 4):
                # bf16 keeps 8 bits of mantissa; Inductor fuses and reorders the arithmetic.
                torch.testing.assert_close(compiled(ids), expected, rtol=2e-2, atol=4e-2)
                assert handle.stats.loads == loads + calls * layers
            assert handle.stats.stalls == 0


@pytest.mark.parametrize("config", [PREFETCH, UVA], ids=["prefetch", "uva"])
@torch.no_grad()
def test_a_model_on_the_second_device_is_served_there_alone(config):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    assert torch.cuda.current_device() == 0
    torch.manual_seed(0)
    model = DecoderLM(**SIZES).to("cuda:1").eval()
    (ids,) = token_ids(device="cuda:1")
    expected = model(ids)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    baseline = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    handle = apply_offload(model, config, device="cuda:1")
    assert torch.cuda.current_device() == 0
    for _ in range(2):
        assert torch.equal(model(ids), expected)
    assert torch.cuda.current_device() == 0
    assert handle.stats.stalls == 0
    handle.remove()
    assert torch.cuda.current_device() == 0
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 1)}
    torch.cuda.synchronize(1)
    assert torch.cuda.max_memory_allocated(0) == baseline  # nothing was ever allocated there


@pytest.mark.parametrize(("config", "zero_copy"), BACKENDS)
@torch.no_grad()
def test_host_storage_is_page_locked_cpu_memory_under_a_cuda_default_device(config, zero_copy):
    torch.set_default_device("cuda")
    try:
        torch.manual_seed(0)
        model = DecoderLM(**SIZES).eval()
        assert next(model.parameters()).is_cuda
        ids = torch.randint(0, SIZES["vocab_size"], (2, 64))
        expected = model(ids)
        with apply_offload(model, config, zero_copy=zero_copy) as handle:
            staged = handle._installed.staged
            assert staged.storage.tensors[0].device.type == "cpu"
            assert staged.storage.tensors[0].is_pinned()
            for entry in staged.params:
                assert entry.hosts[0].device.type == "cpu", entry.name
                assert entry.hosts[0].is_pinned(), entry.name
            for _ in range(2):
                assert torch.equal(model(ids), expected)
            assert handle.stats.stalls == 0
        assert torch.equal(model(ids), expected)
    finally:
        torch.set_default_device(None)


class _BlockWithEmptyParam(nn.Module):
    """A block with a 0-element parameter of a dtype no other parameter has: its host buffer
    is empty (a null pointer, never page-locked)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.empty = nn.Parameter(torch.zeros(0, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


@pytest.mark.parametrize(("config", "zero_copy"), BACKENDS)
@torch.no_grad()
def test_empty_parameters_of_a_dtype_of_their_own_are_offloaded_too(config, zero_copy):
    torch.manual_seed(0)
    model = nn.Sequential(*[_BlockWithEmptyParam() for _ in range(4)]).cuda()
    x = torch.randn(8, 64, device="cuda")
    expected = model(x)
    with apply_offload(model, config, zero_copy=zero_copy) as handle:
        assert any(name.endswith("empty") for name in handle.plan.offloaded_params)
        for _ in range(2):
            assert torch.equal(model(x), expected)
    assert torch.equal(model(x), expected)


# --------------------------------------------------------------------------------------------
# Device moves while offloaded
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "zero_copy"), BACKENDS)
@torch.no_grad()
def test_moving_offloaded_weights_off_the_device_is_refused_and_onto_it_goes_through(
    config, zero_copy
):
    from hydra_offload import OffloadError

    model = decoder().eval()
    ids = token_ids()[0]
    expected = model(ids)
    with apply_offload(model, config, zero_copy=zero_copy) as handle:
        devices = {n: p.device for n, p in model.named_parameters()}
        # Copy mode: between forwards the offloaded weights are their host tensors, which
        # `.cpu()` leaves as they are; the move is refused all the same.
        on_host = {n for n, p in model.named_parameters() if p.device.type == "cpu"}
        assert on_host == (set(handle.plan.offloaded_params) if zero_copy is False else set())
        moves = (
            lambda m: m.cpu(),
            lambda m: m.to("cpu"),
            lambda m: m.layers[1].cpu(),
            lambda m: m.to("cpu", torch.float32),
        )
        for move in moves:
            with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
                move(model)
            assert {n: p.device for n, p in model.named_parameters()} == devices
        # Onto the compute device: offloaded weights stay where the offload serves them.
        model.to("cuda")
        model.cuda()
        model.float()
        assert {n: p.device for n, p in model.named_parameters()} == devices
        assert torch.equal(model(ids), expected)
