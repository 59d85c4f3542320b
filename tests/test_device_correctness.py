"""Device correctness, checked on a CPU: where host buffers live, where the optimizer steps
after a checkpoint is restored, gradient accumulation in host memory, memory released by
``remove()``, the measured wait for copies, and the host memory an offload needs.

Many tests run on the simulated device (:mod:`hydra_offload.runtime.simulated`): copies on
side streams complete later, on other threads, and an operator that mixes host and device
memory raises, as it would on a GPU. Host memory there is what the runtime allocated as host
storage (or what is computed from it only); anything else is device memory. Every comparison
with the run without offload is bit for bit (``torch.equal``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hydra_offload import OffloadCallback, OffloadError, apply_offload, plan_offload
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens
from hydra_offload.runtime.device import runtime_for
from hydra_offload.runtime.host import ALIGNMENT
from hydra_offload.runtime.simulated import SimulatedDevice
from hydra_offload.runtime.timing import WaitTimer

SIZES = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 64,
}
PARAMS_PER_LAYER = 9  # two norms, four attention projections, three MLP projections
PREFETCH = {"prefetch": {"offload_group_size": 2}}  # layers 1 and 3 offloaded, one slot set
EVERY_LAYER = {  # all four layers offloaded, taking turns in one slot set
    "prefetch": {"offload_group_size": 1, "offload_num_in_group": 1, "offload_prefetch_step": 1}
}
UVA = {"uva": {"cpu_offload_gb": 1.0}}  # every parameter in host memory
LR = 1e-2
CPU = torch.device("cpu")

# (config, zero_copy). UVA with zero_copy=False is copy mode (a device copy per forward, host
# gradients); on the simulated device UVA is always copy mode.
TRAINING_BACKENDS = [
    pytest.param(PREFETCH, None, id="prefetch"),
    pytest.param(UVA, False, id="uva-copy"),
]

pytestmark = [
    pytest.mark.filterwarnings("ignore:OffloadCallback. the compute device is the CPU"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks"),
]


@pytest.fixture(autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """The models are tiny: one thread is as fast, and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting releases memory: an object in a reference cycle stays."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def decoder() -> DecoderLM:
    """The tiny decoder, the same weights every time."""
    torch.manual_seed(0)
    return DecoderLM(**SIZES)


def token_batches(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SIZES["vocab_size"], (count, 2, 9), generator=generator)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_all_equal(got: Any, expected: Any, what: str = "") -> None:
    """Bit-identical tensors in the same structure (dicts by key, lists by position)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), what
        for key in expected:
            assert_all_equal(got[key], expected[key], f"{what} {key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), what
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_all_equal(a, b, f"{what} [{index}]")
    else:
        assert torch.equal(got, expected), what


def offloaded_params(model: nn.Module, handle: Any) -> list[nn.Parameter]:
    return [model.get_parameter(name) for name in handle.plan.offloaded_params]


def host_storage_bytes(params: list[nn.Parameter]) -> int:
    """Bytes of one host storage holding these parameters' layouts: every tensor starts on a
    multiple of ``ALIGNMENT`` bytes and the range ends on one."""
    return sum(-(-p.numel() * p.element_size() // ALIGNMENT) * ALIGNMENT for p in params)


def on_the_device(optimizer: torch.optim.Optimizer, device: SimulatedDevice) -> None:
    """Put a restored optimizer state in device memory, where Lightning's
    ``_optimizer_to_device(optimizer, root_device)`` puts it on a GPU. On the CPU that move
    is a no-op, and the simulation keys memory kinds by storage address, so a tensor
    ``torch.load`` made may otherwise inherit the kind of freed host memory (see
    ``test_a_storage_made_outside_the_dispatcher_is_device_memory``)."""
    device.mark_device(
        [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]
    )


def state_kinds(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], device: SimulatedDevice
) -> set[str]:
    """Where the simulated device holds the (non-scalar) optimizer state of ``params``."""
    return {
        device.kind(value)
        for param in params
        for value in optimizer.state[param].values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    }


class RecordingLit(LitDecoderLM):
    """The tiny decoder as a LightningModule; keeps every training loss and the gradients
    each optimizer step is given."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(DecoderLM(**SIZES), lr=LR)
        self.losses: list[torch.Tensor] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().clone())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads.append(grads_of(self))


def lightning_trainer(max_steps: int, *callbacks: Callback, **kwargs: Any) -> Trainer:
    settings = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return Trainer(callbacks=list(callbacks), max_steps=max_steps, **{**settings, **kwargs})


def lightning_tokens(batches: int) -> Any:
    return random_tokens(
        vocab_size=SIZES["vocab_size"], seq_len=9, samples=2 * batches, batch_size=2
    )


# --------------------------------------------------------------------------------------------
# 1. Host buffers never follow the ambient device
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_device_meta() -> Iterator[None]:
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:  # the CPU is the default without any default set: set none again
        torch.set_default_device(None if before == CPU else before)


AMBIENT_DEVICES = [
    pytest.param(lambda: torch.device("meta"), id="device-context"),
    pytest.param(default_device_meta, id="default-device"),
]


@pytest.mark.parametrize(
    ("config", "zero_copy", "trainable"),
    [
        pytest.param(PREFETCH, None, True, id="prefetch-trainable"),
        pytest.param(PREFETCH, None, False, id="prefetch-frozen"),
        pytest.param(UVA, None, True, id="uva-default-mode"),
        pytest.param(UVA, False, True, id="uva-copy"),
    ],
)
@pytest.mark.parametrize("ambient", AMBIENT_DEVICES)
def test_an_offload_applied_under_a_meta_ambient_device_computes_from_cpu_buffers(
    ambient, config, zero_copy, trainable, run_on
):
    ids = token_batches(1)[0, :, :-1]
    expected = decoder().requires_grad_(trainable)(ids)
    model = decoder().requires_grad_(trainable)
    with ambient():
        handle = apply_offload(model, config, zero_copy=zero_copy)
    installed = handle._installed
    storage = installed.staged.storage
    assert storage.tensors
    assert {t.device for t in storage.tensors} == {CPU}
    assert {h.device for e in installed.staged.params for h in e.hosts} == {CPU}
    pool = getattr(installed, "pool", None)  # device memory, of the compute device: the CPU
    if pool is not None:
        assert {t.device for entry in pool.slots for s in entry for t in s.tensors} == {CPU}
    assert torch.equal(model(ids), expected)
    handle.remove()
    assert_all_equal(params_of(model), params_of(decoder()), "parameter after remove()")


@pytest.mark.parametrize(
    ("config", "zero_copy"),
    [*TRAINING_BACKENDS, pytest.param(UVA, None, id="uva-default-mode")],
)
@pytest.mark.parametrize("ambient", AMBIENT_DEVICES)
def test_host_gradients_made_in_a_backward_under_a_meta_ambient_device_are_on_the_cpu(
    ambient, config, zero_copy, run_on
):
    batches = token_batches(2)
    reference = decoder()
    for ids in batches:  # two backward passes: the second adds to the first
        lm_loss(reference, ids).backward()
    model = decoder()
    with ambient():
        handle = apply_offload(model, config, zero_copy=zero_copy)
    for ids in batches:
        loss = lm_loss(model, ids)
        with ambient():  # host gradients, then staging buffers, are made during backward
            loss.backward()
    assert_all_equal(grads_of(model), grads_of(reference), "gradient")
    grads = handle._installed.grads
    if grads is not None:  # host gradients: prefetch, and UVA in copy mode
        storages = [s for s in (grads._storage, grads._staging) if s is not None]
        assert len(storages) == 2
        assert {t.device for s in storages for t in s.tensors} == {CPU}
    handle.remove()


class SpreadLayer(nn.Module):
    """A layer whose weight has gaps between its elements (stride (16, 2)): a copy of it
    (``clone()``, ``.to("cpu", copy=True)``) does not keep its strides by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.spread = nn.Parameter(torch.randn(4, 16)[:, ::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.spread


class SpreadStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SpreadLayer(), SpreadLayer()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)[:, :4]
        return x


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"prefetch": {"offload_group_size": 1}}, id="prefetch"),
        pytest.param(UVA, id="uva"),
    ],
)
@pytest.mark.parametrize("ambient", AMBIENT_DEVICES)
def test_pickling_weights_with_gaps_under_a_meta_ambient_device_gives_their_cpu_values(
    ambient, config, run_on
):
    torch.manual_seed(0)
    model = SpreadStack()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with apply_offload(model, config) as handle:
        assert set(handle.plan.offloaded_params) == set(expected)
        with ambient():
            copied = copy.deepcopy(model)
            saved = io.BytesIO()
            torch.save(model, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
        for result in (copied, loaded):
            for name, param in result.named_parameters():
                assert param.device == CPU, name
                assert param.stride() == (16, 2), name
                assert torch.equal(param, expected[name]), name


# --------------------------------------------------------------------------------------------
# 2. Resuming from a checkpoint: the optimizer steps offloaded parameters in host memory
# --------------------------------------------------------------------------------------------

RESUME_STEPS = (3, 3)  # optimizer steps before the checkpoint, and after it


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: torch.Tensor, *, closure: bool
) -> list[torch.Tensor]:
    losses = []
    for ids in batches:

        def step(ids: torch.Tensor = ids) -> torch.Tensor:
            optimizer.zero_grad()
            loss = lm_loss(model, ids)
            loss.backward()
            losses.append(loss.detach())
            return loss

        if closure:
            optimizer.step(step)  # as Lightning steps: forward and backward inside step()
        else:
            step()
            optimizer.step()
    return losses


@functools.cache
def uninterrupted_run(closure: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """AdamW without offload and without a checkpoint: losses, final parameters."""
    model = decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = train_steps(model, optimizer, token_batches(sum(RESUME_STEPS)), closure=closure)
    return losses, params_of(model)


def resume_and_compare(config: dict, zero_copy: bool | None, *, closure: bool) -> None:
    """Train under the offload, checkpoint (``torch.save``), restore into a fresh model,
    offload and optimizer, train on: the state of offloaded parameters is in host memory
    after each step, and losses and parameters equal the uninterrupted run without offload."""
    expected_losses, expected_params = uninterrupted_run(closure)
    before, after = token_batches(sum(RESUME_STEPS)).split(RESUME_STEPS)
    checkpoint = io.BytesIO()
    with SimulatedDevice() as simulated:
        model = decoder()
        with apply_offload(model, config, zero_copy=zero_copy):
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            losses = train_steps(model, optimizer, before, closure=closure)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, checkpoint)

        model = decoder()
        with apply_offload(model, config, zero_copy=zero_copy) as handle:
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            checkpoint.seek(0)
            state = torch.load(checkpoint)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            _optimizer_to_device(optimizer, CPU)  # what Lightning does after loading
            on_the_device(optimizer, simulated)  # where that puts it on a GPU
            trained = offloaded_params(model, handle)
            assert trained
            assert all(p.requires_grad for p in trained)
            assert state_kinds(optimizer, trained, simulated) == {"device"}
            for ids in after:
                losses += train_steps(model, optimizer, ids[None], closure=closure)
                assert state_kinds(optimizer, trained, simulated) == {"host"}
    assert_all_equal(losses, expected_losses, "loss")
    assert_all_equal(params_of(model), expected_params, "parameter")


@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_a_restored_optimizer_state_is_moved_to_host_memory_where_the_step_runs(config, zero_copy):
    resume_and_compare(config, zero_copy, closure=False)


@pytest.mark.parametrize(
    ("config", "zero_copy"),
    [
        pytest.param(PREFETCH, None, id="prefetch"),
        pytest.param(UVA, False, id="uva-copy"),
    ],
)
def test_a_restored_optimizer_state_is_moved_to_host_memory_for_a_step_with_a_closure(
    config, zero_copy
):
    resume_and_compare(config, zero_copy, closure=True)


class WhereTheStateIs(Callback):
    """Puts the restored optimizer state on the device when training starts (the checkpoint
    is restored by then; on a GPU root device Lightning has put it there), and records where
    the state of the offloaded parameters is after each training step."""

    def __init__(self, offload: OffloadCallback, device: SimulatedDevice) -> None:
        self.offload = offload
        self.device = device
        self.restored = 0
        self.at_start: set[str] = set()
        self.after_steps: list[set[str]] = []

    def _kinds(self, trainer: Trainer, pl_module: nn.Module) -> set[str]:
        assert self.offload.handle is not None
        params = offloaded_params(pl_module, self.offload.handle)
        return state_kinds(trainer.optimizers[0], params, self.device)

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.restored = len(optimizer.state)
        on_the_device(optimizer, self.device)
        self.at_start = self._kinds(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after_steps.append(self._kinds(trainer, pl_module))


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(PREFETCH, id="prefetch"),
        pytest.param(UVA, id="uva-copy"),
    ],
)
def test_lightning_fit_resumed_from_an_offloaded_checkpoint_matches_the_uninterrupted_fit(
    config, tmp_path
):
    # Two batches an epoch: the checkpoint at step 2 ends the first epoch.
    expected = RecordingLit()
    lightning_trainer(4).fit(expected, lightning_tokens(2))
    with SimulatedDevice() as simulated:
        first = RecordingLit()
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1
        )
        lightning_trainer(2, OffloadCallback(config), checkpoints, enable_checkpointing=True).fit(
            first, lightning_tokens(2)
        )

        resumed = RecordingLit()
        offload = OffloadCallback(config)
        where = WhereTheStateIs(offload, simulated)
        trainer = lightning_trainer(4, offload, where)
        trainer.fit(resumed, lightning_tokens(2), ckpt_path=tmp_path / "step=2.ckpt")
    assert trainer.global_step == 4
    assert where.restored == len(list(resumed.parameters()))
    assert where.at_start == {"device"}
    assert where.after_steps == [{"host"}, {"host"}]
    assert_all_equal(first.losses + resumed.losses, expected.losses, "loss")
    assert_all_equal(params_of(resumed), params_of(expected), "parameter")


# --------------------------------------------------------------------------------------------
# 3. Gradient accumulation in host memory (UVA copy mode, and prefetch)
# --------------------------------------------------------------------------------------------

WINDOWS = 3  # optimizer steps


class Run(NamedTuple):
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]  # given to each optimizer step
    params: dict[str, torch.Tensor]


def hand_set_gradient(model: nn.Module, window: int) -> None:
    """A gradient set by hand on the MLP weights (a regularizer's, say): new device memory."""
    for name, param in model.named_parameters():
        if ".mlp." in name:
            param.grad = torch.full(param.shape, 1e-3 * (window + 1))


def train_accumulating(
    model: nn.Module,
    accumulate: int,
    *,
    set_to_none: bool = True,
    before_backward: Callable[[nn.Module, int], None] | None = None,
) -> Run:
    """``WINDOWS`` AdamW steps of ``accumulate`` micro-batches each. As Lightning does,
    ``zero_grad`` comes after the forward of each window's first micro-batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    batches = token_batches(WINDOWS * accumulate).view(WINDOWS, accumulate, 2, 9)
    losses, grads = [], []
    for window, micro_batches in enumerate(batches):
        for index, ids in enumerate(micro_batches):
            loss = lm_loss(model, ids) / accumulate
            if index == 0:
                optimizer.zero_grad(set_to_none=set_to_none)
                if before_backward is not None:
                    before_backward(model, window)
            loss.backward()
            losses.append(loss.detach())
        grads.append(grads_of(model))
        optimizer.step()
    return Run(losses, grads, params_of(model))


@functools.cache
def accumulated_without_offload(
    accumulate: int, set_to_none: bool, before_backward: Callable | None
) -> Run:
    return train_accumulating(
        decoder(), accumulate, set_to_none=set_to_none, before_backward=before_backward
    )


def accumulate_and_compare(
    config: dict,
    zero_copy: bool | None,
    accumulate: int,
    *,
    set_to_none: bool = True,
    before_backward: Callable | None = None,
) -> None:
    expected = accumulated_without_offload(accumulate, set_to_none, before_backward)
    model = decoder()
    with SimulatedDevice(), apply_offload(model, config, zero_copy=zero_copy) as handle:
        got = train_accumulating(
            model, accumulate, set_to_none=set_to_none, before_backward=before_backward
        )
        assert handle.stats.forwards == WINDOWS * accumulate
    assert_all_equal(got.losses, expected.losses, "loss")
    assert_all_equal(got.grads, expected.grads, "gradient")
    assert_all_equal(params_of(model), expected.params, "parameter")
    assert any(".mlp." in n for n in handle.plan.offloaded_params)


@pytest.mark.parametrize("accumulate", [2, 4])
@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_gradients_accumulated_in_host_memory_are_bit_identical(config, zero_copy, accumulate):
    accumulate_and_compare(config, zero_copy, accumulate)


@pytest.mark.parametrize("accumulate", [2, 4])
@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_gradients_zeroed_in_place_between_windows_accumulate_from_zero(
    config, zero_copy, accumulate
):
    accumulate_and_compare(config, zero_copy, accumulate, set_to_none=False)


@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_a_gradient_set_by_hand_before_backward_is_accumulated_into(config, zero_copy):
    accumulate_and_compare(config, zero_copy, 2, before_backward=hand_set_gradient)


def test_lightning_accumulate_grad_batches_2_in_uva_copy_mode_is_bit_identical():
    steps, accumulate = 3, 2
    expected = RecordingLit()
    lightning_trainer(steps, accumulate_grad_batches=accumulate).fit(
        expected, lightning_tokens(steps * accumulate)
    )
    got = RecordingLit()
    callback = OffloadCallback(UVA)
    with SimulatedDevice():
        lightning_trainer(steps, callback, accumulate_grad_batches=accumulate).fit(
            got, lightning_tokens(steps * accumulate)
        )
    assert callback.last_plan is not None
    assert callback.last_plan.backend == "uva"
    assert len(got.losses) == steps * accumulate
    assert len(got.grads) == steps
    assert_all_equal(got.losses, expected.losses, "loss")
    assert_all_equal(got.grads, expected.grads, "gradient")
    assert_all_equal(params_of(got), params_of(expected), "parameter")


# --------------------------------------------------------------------------------------------
# 4. remove() releases everything at once, without the garbage collector
# --------------------------------------------------------------------------------------------


def offload_objects(installed: Any) -> dict[str, weakref.ref]:
    """Weak references to what an installed offload holds: pool slots, host storage and its
    buffer, host gradients and staging buffers, rings, and the backend itself."""
    objects: dict[str, Any] = {"backend": installed}
    pool = getattr(installed, "pool", None)
    if pool is not None:
        objects["pool"] = pool
        for i, entry in enumerate(pool.slots):
            for j, slot in enumerate(entry):
                objects[f"pool slot {i}.{j}"] = slot.tensors[0]
    storages = {"host storage": installed.staged.storage}
    grads = installed.grads
    if grads is not None:
        objects["host gradients"] = grads
        storages["gradient storage"] = grads._storage
        storages["staging storage"] = grads._staging
    for label, storage in storages.items():
        if storage is None:
            continue
        objects[label] = storage
        for i, part in enumerate(storage._blocks):
            objects[f"{label} buffer {i}"] = part.block.buffer
        for i, tensor in enumerate(storage.tensors):
            objects[f"{label} tensor {i}"] = tensor
    for entry in installed.staged.params:
        objects[f"host tensor of {entry.name}"] = entry.hosts[0]
    for i, ring in enumerate(getattr(installed, "rings", [])):
        objects[f"ring {i}"] = ring
        if ring.timer is not None:
            objects[f"ring {i} timer"] = ring.timer
    for label in ("copy_stream",):
        if getattr(installed, label, None) is not None:
            objects[label] = getattr(installed, label)
    if grads is not None and grads.stream is not None:
        objects["gradient stream"] = grads.stream
    return {label: weakref.ref(obj) for label, obj in objects.items()}


def stream_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sim-stream-")}


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "after-a-step"])
@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_remove_releases_pool_host_storage_gradients_and_backend_at_once(
    config, zero_copy, trained, run_on, no_gc
):
    threads_before = stream_threads()
    model = decoder()
    handle = apply_offload(model, config, zero_copy=zero_copy)
    if trained:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        for ids in token_batches(2):  # two micro-batches: staging buffers are used too
            lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
        lm_loss(model, token_batches(1)[0]).detach()  # a forward after the step
    refs = offload_objects(handle._installed)
    if trained and handle._installed.grads is not None:
        assert "staging storage buffer 0" in refs
    handle.remove()
    if run_on is not None:
        # The simulated device's stream threads keep the operands of their last copy until
        # they stop, which they do once their stream is gone (see
        # test_a_side_stream_of_the_simulated_device_releases_what_it_copied): the streams
        # must go with the backend, and the threads with them.
        for thread in stream_threads() - threads_before:
            thread.join(timeout=5)
            assert not thread.is_alive(), f"{thread.name} still runs: its stream is alive"
    alive = [label for label, ref in refs.items() if ref() is not None]
    assert alive == []
    assert handle.stats.host_bytes == 0
    assert handle.stats.pool_bytes == 0


@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_optimizer_state_in_host_memory_goes_back_with_the_parameters_on_remove(
    config, zero_copy, simulated
):
    batches = token_batches(5)
    reference = decoder()
    expected_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR)
    for ids in batches:
        expected_optimizer.zero_grad()
        lm_loss(reference, ids).backward()
        expected_optimizer.step()

    model = decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    handle = apply_offload(model, config, zero_copy=zero_copy)
    for ids in batches[:3]:
        optimizer.zero_grad()
        lm_loss(model, ids).backward()
        optimizer.step()
    offloaded = offloaded_params(model, handle)
    assert state_kinds(optimizer, offloaded, simulated) == {"host"}  # the step ran there
    handle.remove()
    for name, param in model.named_parameters():
        state = [v for v in optimizer.state[param].values() if v.dim() > 0]
        assert len(state) == 2, name  # AdamW's two moments
        for value in state:
            assert simulated.kind(value) == simulated.kind(param) == "device", name
            assert value.device == param.device, name
    # Plain steps: the simulated device raises on an operator mixing host and device memory.
    for ids in batches[3:]:
        optimizer.zero_grad()
        lm_loss(model, ids).backward()
        optimizer.step()
    assert_all_equal(params_of(model), params_of(reference), "parameter")
    assert_all_equal(optimizer.state_dict()["state"], expected_optimizer.state_dict()["state"])


# --------------------------------------------------------------------------------------------
# 5. The measured wait for copies counts every wait
# --------------------------------------------------------------------------------------------

DELAY_MS = 3.0


class ReversedDecoder(DecoderLM):
    """Calls its layers last to first: against the ring's order, every offloaded layer finds
    its slots holding another layer's weights and loads on demand (a stall)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in reversed(self.layers):
            hidden = layer(hidden)
        return self.lm_head(self.norm(hidden))


def test_wait_ms_counts_every_stalled_layer_in_forward_and_in_backward():
    # A stall queues the layer's PARAMS_PER_LAYER copies, each DELAY_MS long, after whatever
    # the copy stream still has to do, then the compute stream waits for the last one: at
    # least (PARAMS_PER_LAYER - 1) * DELAY_MS each (the first copy may start before the wait
    # does). The bound checked is one DELAY_MS per stall.
    torch.manual_seed(0)
    model = ReversedDecoder(**SIZES)
    with SimulatedDevice(min_delay_ms=DELAY_MS, max_delay_ms=DELAY_MS):
        handle = apply_offload(model, EVERY_LAYER)
        assert len(handle.plan.stacks[0].offloaded_layers) == SIZES["num_layers"]
        first_layer = [n for n in handle.plan.offloaded_params if n.startswith("layers.0.")]
        assert len(first_layer) == PARAMS_PER_LAYER
        before = handle.stats
        assert before.wait_ms is not None
        loss = lm_loss(model, token_batches(1)[0])
        forward = handle.stats
        loss.backward()
        backward = handle.stats
        handle.remove()
    forward_stalls = forward.stalls - before.stalls
    backward_stalls = backward.stalls - forward.stalls
    assert forward_stalls >= SIZES["num_layers"]
    assert backward_stalls >= SIZES["num_layers"] - 1  # the last layer called is still there
    assert forward.wait_ms - before.wait_ms >= forward_stalls * DELAY_MS
    assert backward.wait_ms - forward.wait_ms >= backward_stalls * DELAY_MS


class CountingRuntime:
    """The runtime, keeping every timing event it makes (in order)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.events: list[Any] = []

    def timing_event(self) -> Any:
        event = self.runtime.timing_event()
        self.events.append(event)
        return event


def test_waits_recorded_on_a_lagging_stream_are_all_counted():
    waits, delay_ms = 3, 10.0
    with SimulatedDevice(min_delay_ms=delay_ms, max_delay_ms=delay_ms):
        runtime = runtime_for(CPU)
        counting = CountingRuntime(runtime)
        timer = WaitTimer(counting)
        host = runtime.host_storage([((4,), (1,), torch.float32)] * waits).tensors
        device = [torch.empty(4) for _ in range(waits)]
        lagging, copies = runtime.new_stream(), runtime.new_stream()
        gate = runtime.timing_event()
        copies.wait_event(gate)  # nothing on the copy stream runs before the gate opens
        try:
            copies.wait_stream(runtime.current_stream())
            done = []
            for src, dst in zip(host, device, strict=True):
                runtime.copy(copies, dst, src)
                done.append(copies.record_event())
            made_before = len(counting.events)
            for event in done:
                timer.wait(lagging, event)  # called again while the earlier waits are pending
            assert not done[0].query()
            brackets = counting.events[made_before:]  # start and end of each wait
            assert len(brackets) == 2 * waits
            brackets[0].synchronize()  # the lagging stream has started the first wait
        finally:
            gate.record()  # open the gate: the copies run, delay_ms each, one after the other
        total = timer.read()
    recorded = sum(s.elapsed_time(e) for s, e in zip(brackets[::2], brackets[1::2], strict=True))
    assert total == pytest.approx(recorded)  # every wait, none left out
    assert total >= delay_ms  # the first wait started before the gate opened: a whole copy


# --------------------------------------------------------------------------------------------
# 6. Host memory: what stats.host_bytes reports, and what apply_offload checks up front
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_host_bytes_count_host_gradients_and_then_staging_buffers(config, zero_copy, run_on):
    model = decoder()
    handle = apply_offload(model, config, zero_copy=zero_copy)
    params = offloaded_params(model, handle)
    weights = host_storage_bytes(params)
    assert handle.stats.host_bytes == weights
    batches = token_batches(2)
    lm_loss(model, batches[0]).backward()  # the host gradients
    assert handle.stats.host_bytes == 2 * weights
    lm_loss(model, batches[1]).backward()  # accumulated: through the staging buffers
    assert handle.stats.host_bytes == 3 * weights
    handle.remove()


@pytest.mark.parametrize(("config", "zero_copy"), TRAINING_BACKENDS)
def test_host_bytes_count_gradients_of_trainable_offloaded_weights_only(config, zero_copy, run_on):
    model = decoder()
    model.layers.requires_grad_(False)  # frozen: gradients pass through, none is kept
    handle = apply_offload(model, config, zero_copy=zero_copy)
    params = offloaded_params(model, handle)
    weights = host_storage_bytes(params)
    grads = host_storage_bytes([p for p in params if p.requires_grad])
    assert any(not p.requires_grad for p in params)
    batches = token_batches(2)
    for ids in batches:
        lm_loss(model, ids).backward()
    assert handle.stats.host_bytes == weights + 2 * grads
    handle.remove()


def weights_and_grads(model: nn.Module, config: dict) -> tuple[int, int]:
    """Bytes of the parameters ``config`` offloads, and of those that require grad."""
    params = [model.get_parameter(n) for n in plan_offload(model, config).offloaded_params]
    nbytes = [p.numel() * p.element_size() for p in params]
    return sum(nbytes), sum(n for n, p in zip(nbytes, params, strict=True) if p.requires_grad)


def assert_untouched(
    model: nn.Module, before: dict[str, torch.Tensor], host_memory: Callable[[int | None], None]
) -> None:
    """The model is as it was: the same tensors (not only values), no hook, no offload
    registered on it (one can be applied once memory is no longer short)."""
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == {
        n: t.data_ptr() for n, t in before.items()
    }
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    host_memory(None)
    apply_offload(model, UVA).remove()


@pytest.fixture
def host_memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    """Sets what ``apply_offload`` sees as available host memory (``None``: unknown)."""

    def set_available(nbytes: int | None) -> None:
        monkeypatch.setattr("hydra_offload.offload.available_host_bytes", lambda: nbytes)

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return set_available


@pytest.mark.parametrize(
    "config", [pytest.param(PREFETCH, id="prefetch"), pytest.param(UVA, id="uva")]
)
def test_the_host_memory_check_counts_gradients_of_trainable_offloaded_weights(config, host_memory):
    model = decoder()
    weights, grads = weights_and_grads(model, config)
    assert grads == weights > 0
    available = weights + grads - 1  # the weights fit, the weights and gradients do not
    host_memory(available)
    before = {n: p.data for n, p in model.named_parameters()}
    with pytest.raises(OffloadError) as refused:
        apply_offload(model, config)
    message = str(refused.value)
    for number in (weights + grads, weights, grads, available):
        assert f"{number:,}" in message
    assert_untouched(model, before, host_memory)

    frozen = decoder().requires_grad_(False)
    assert weights_and_grads(frozen, config) == (weights, 0)
    apply_offload(frozen, config).remove()


def test_the_host_memory_check_counts_every_process_on_the_node(host_memory):
    model = decoder()
    weights, grads = weights_and_grads(model, PREFETCH)
    host_memory(2 * (weights + grads) - 1)  # one replica fits, two do not
    apply_offload(model, PREFETCH, processes_per_node=1).remove()
    before = {n: p.data for n, p in model.named_parameters()}
    with pytest.raises(OffloadError) as refused:
        apply_offload(model, PREFETCH, processes_per_node=2)
    assert f"{2 * (weights + grads):,}" in str(refused.value)
    assert "2 processes" in str(refused.value)
    assert_untouched(model, before, host_memory)


def test_the_host_memory_check_reads_local_world_size_when_not_told(host_memory, monkeypatch):
    model = decoder()
    weights, grads = weights_and_grads(model, PREFETCH)
    host_memory(2 * (weights + grads) - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(OffloadError, match=f"{2 * (weights + grads):,}"):
        apply_offload(model, PREFETCH)
    apply_offload(model, PREFETCH, processes_per_node=1).remove()  # told: the count given


# --------------------------------------------------------------------------------------------
# 7. The simulated device itself
# --------------------------------------------------------------------------------------------


def test_a_side_stream_of_the_simulated_device_releases_what_it_copied(no_gc):
    with SimulatedDevice() as simulated:
        runtime = runtime_for(CPU)
        stream = runtime.new_stream()
        storage = runtime.host_storage([((4,), (1,), torch.float32)])
        device = torch.empty(4)
        stream.wait_stream(runtime.current_stream())
        runtime.copy(stream, device, storage.tensors[0])
        stream.synchronize()
        refs = [weakref.ref(device), weakref.ref(storage.tensors[0])]
        del device
        storage.free()
        del storage
        assert [ref() is None for ref in refs] == [True, True]
        assert simulated.checked_ops > 0


def test_a_storage_made_outside_the_dispatcher_is_device_memory():
    with SimulatedDevice() as simulated:
        host = runtime_for(CPU).host_storage([((8,), (1,), torch.float32)]).tensors[0]
        for _ in range(100):
            computed = host * 2  # host memory: computed from host memory only
            assert simulated.kind(computed) == "host"
            freed = computed.untyped_storage()._cdata
            del computed
            fresh = torch.frombuffer(bytearray(32), dtype=torch.float32)
            if fresh.untyped_storage()._cdata == freed:
                break
        else:
            pytest.skip("no storage was allocated at a freed one's address")
        assert simulated.kind(fresh) == "device"
