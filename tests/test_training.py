"""Training through offloaded weights is exact: 20 optimizer steps give bit-identical losses,
gradients and parameters to the same 20 steps without offload, for every backend.

Each test trains the same small decoder (4 layers, hidden 32, same seed, same token batches)
twice, once as is and once under the offload, and compares, by name, every gradient after
every step, every loss, and every final parameter with ``torch.equal``. Backends: prefetch in
three layouts (``g2k1s1``: layers 1 and 3 share one slot set; ``g1k1s2``: all four layers,
two slot sets; ``g4k3s1``: layers 1 2 3 share one slot set) and UVA in both CPU modes
(``host``: the parameter is the host tensor; ``copy``: a fresh copy per forward).

On the CPU the copies are synchronous, but what autograd saves, what backward reads, what an
optimizer step writes and the slot bookkeeping are the same code as on an accelerator.

Activation checkpointing is covered both ways (``checkpoint(layer, ...)`` at the call site and
``checkpoint()`` inside a layer's forward): the layers are really recomputed in backward, with
their own weights.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from hydra_offload import OffloadCallback, OffloadPlan, OffloadStats, apply_offload
from hydra_offload.models import DecoderBlock, DecoderLM, LitDecoderLM, random_tokens
from hydra_offload.runtime.simulated import SimulatedDevice

STEPS = 20
SIZES = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 64,
}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Backends, recipes, and the run-twice-and-compare harness
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    kind: str  # "prefetch" or "uva"
    layout: tuple[int, int, int] = (0, 1, 1)  # prefetch: group size, num in group, step
    zero_copy: bool | None = None  # uva: None gives "host" mode on CPU, False "copy" mode
    simulated: bool = False  # on the simulated device instead of the CPU runtime

    def device(self) -> contextlib.AbstractContextManager:
        """Where the offloaded run happens: the simulated device, or nothing special."""
        return SimulatedDevice() if self.simulated else contextlib.nullcontext()

    def config(self, params: tuple[str, ...] = ()) -> dict:
        if self.kind == "uva":
            return {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": list(params)}}
        group, k, step = self.layout
        return {
            "prefetch": {
                "offload_group_size": group,
                "offload_num_in_group": k,
                "offload_prefetch_step": step,
                "offload_params": list(params),
            }
        }


BACKENDS = {
    "prefetch-g2k1s1": Backend("prefetch", (2, 1, 1)),
    "prefetch-g1k1s2": Backend("prefetch", (1, 1, 2)),
    "prefetch-g4k3s1": Backend("prefetch", (4, 3, 1)),
    "uva-host": Backend("uva"),
    "uva-copy": Backend("uva", zero_copy=False),
    # On the simulated device: copies complete later, missing waits and host/device mix-ups
    # raise. (UVA there is copy mode: the device is an accelerator without zero-copy views.)
    "prefetch-g2k1s1-sim": Backend("prefetch", (2, 1, 1), simulated=True),
    "prefetch-g1k1s2-sim": Backend("prefetch", (1, 1, 2), simulated=True),
    "prefetch-g4k3s1-sim": Backend("prefetch", (4, 3, 1), simulated=True),
    "uva-copy-sim": Backend("uva", zero_copy=False, simulated=True),
}
ALL_BACKENDS = [pytest.param(b, id=name) for name, b in BACKENDS.items()]


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "adamw"  # "adamw" or "sgd_momentum"
    accumulate: int = 1  # micro-batches per optimizer step
    clip: float | None = None  # clip_grad_norm_ max norm, before the step
    closure: bool = False  # optimizer.step(closure) instead of backward, then step()
    lr: float = 1e-2

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd_momentum":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.lr)


RECIPES = {
    "sgd_momentum": Recipe("sgd_momentum"),
    "adamw": Recipe("adamw"),
    "sgd_momentum-closure": Recipe("sgd_momentum", closure=True),
    "adamw-closure": Recipe("adamw", closure=True),
    "adamw-accumulate4": Recipe("adamw", accumulate=4),
    "adamw-clip": Recipe("adamw", clip=1.0),
}


class Run(NamedTuple):
    losses: list[torch.Tensor]
    grads: list[dict[str, torch.Tensor]]  # after each optimizer step, by name
    params: dict[str, torch.Tensor]


class Offloaded(NamedTuple):
    plan: OffloadPlan
    stats: OffloadStats  # at the end of training, before remove()
    run: Run


def token_batches(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SIZES["vocab_size"], (count, 2, 9), generator=generator)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model: nn.Module, recipe: Recipe) -> Run:
    """``STEPS`` optimizer steps of ``recipe`` on the trainable parameters of ``model``."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe.make_optimizer(trainable)
    data = token_batches(STEPS * recipe.accumulate)
    losses: list[torch.Tensor] = []
    grads: list[dict[str, torch.Tensor]] = []
    for step in range(STEPS):
        micro = data[step * recipe.accumulate : (step + 1) * recipe.accumulate]

        def closure(micro: torch.Tensor = micro) -> torch.Tensor:
            optimizer.zero_grad()
            for ids in micro:
                loss = lm_loss(model, ids) / recipe.accumulate
                loss.backward()
                losses.append(loss.detach())
            if recipe.clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, recipe.clip)
            return loss

        if recipe.closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        grads.append(grads_of(model))
    return Run(losses, grads, params_of(model))


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@functools.cache
def reference_run(build: Callable[[], nn.Module], recipe: Recipe) -> Run:
    """The run without offload (the same for every backend: made once)."""
    return train(build(), recipe)


def decoder() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(**SIZES)


def assert_runs_equal(got: Run, expected: Run, initial: dict[str, torch.Tensor]) -> None:
    assert len(got.grads) == len(expected.grads) == STEPS
    for step, (a, b) in enumerate(zip(got.grads, expected.grads, strict=True)):
        assert a.keys() == b.keys(), step
        for name in b:
            assert torch.equal(a[name], b[name]), f"step {step}: gradient of {name}"
    assert len(got.losses) == len(expected.losses) > 0
    for step, (a, b) in enumerate(zip(got.losses, expected.losses, strict=True)):
        assert torch.equal(a, b), f"loss {step}: {a.item()} != {b.item()}"
    assert got.params.keys() == expected.params.keys()
    for name in expected.params:
        assert torch.equal(got.params[name], expected.params[name]), name
    trained = [n for n, p in expected.params.items() if not torch.equal(p, initial[n].to(p))]
    assert trained, "nothing was trained"


def train_offloaded_and_compare(
    build: Callable[[], nn.Module],
    backend: Backend,
    recipe: Recipe,
    offload_params: tuple[str, ...] = (),
) -> Offloaded:
    """Trains ``build()`` without and with the offload, asserts the runs are bit-identical,
    that no layer stalled (forward or backward) and that ``remove()`` gives back the same
    parameter objects."""
    expected = reference_run(build, recipe)
    model = build()
    initial = params_of(model)
    before = dict(model.named_parameters())
    config = backend.config(offload_params)
    with backend.device(), apply_offload(model, config, zero_copy=backend.zero_copy) as handle:
        assert handle.plan.backend == backend.kind
        got = train(model, recipe)
        stats = handle.stats
    assert stats.stalls == 0
    assert_same_objects(model, before)
    # The run compared is what the parameters hold after remove(): their true values.
    assert_runs_equal(got._replace(params=params_of(model)), expected, initial)
    return Offloaded(handle.plan, stats, got)


def assert_same_objects(model: nn.Module, before: dict[str, nn.Parameter]) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


def assert_counters(offloaded: Offloaded, backend: Backend, recipe: Recipe) -> None:
    """What the counters say after training a model whose layers run in order."""
    stats, plan = offloaded.stats, offloaded.plan
    forwards = STEPS * recipe.accumulate  # each followed by one backward
    assert stats.forwards == forwards
    trained = [n for n in plan.offloaded_params if n in offloaded.run.grads[-1]]
    if backend.kind == "prefetch":
        (stack,) = plan.stacks
        layers = len(stack.offloaded_layers)
        # The slots hold the first `step` layers when a forward starts. A forward loads the
        # others; it keeps the last `step` for backward, which walks back and loads the first
        # ones again: 2 (layers - step) loads per forward and backward. An optimizer step
        # that updated offloaded parameters (in host storage) reloads the first `step`.
        held = min(backend.layout[2], layers)
        reloads = STEPS * held if trained else 0
        assert stats.loads == forwards * 2 * (layers - held) + reloads
        # Nothing else crosses: every byte is a layer load. Every layer offloads the same bytes.
        layer_bytes = plan.offloaded_bytes // layers
        assert stats.h2d_bytes == stats.loads * layer_bytes
    elif backend.zero_copy is False:
        # One fetch per forward of each module that owns offloaded weights; backward computes
        # with what autograd saved, without fetching again.
        owners = {name.rpartition(".")[0] for name in plan.offloaded_params}
        assert stats.loads == forwards * len(owners)
        assert stats.h2d_bytes == forwards * plan.offloaded_bytes
    else:
        assert (stats.h2d_bytes, stats.loads) == (0, 0)


# --------------------------------------------------------------------------------------------
# Fully trainable: every optimizer recipe, every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [pytest.param(r, id=n) for n, r in RECIPES.items()])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fully_trainable_model_trains_bit_identically(backend, recipe):
    offloaded = train_offloaded_and_compare(decoder, backend, recipe)
    assert offloaded.plan.offloaded_params
    assert_counters(offloaded, backend, recipe)


# --------------------------------------------------------------------------------------------
# Frozen offloaded layers, trainable LoRA adapters inside them and a trainable embedding
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base_layer(x) + lora_b(lora_a(x))``: the base frozen, the low-rank pair trained."""

    def __init__(self, base_layer: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.lora_a = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)  # gradients reach lora_a from step 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


# The frozen base weights of each layer (every parameter of a layer but the adapters').
BASE_WEIGHTS = (
    "input_layernorm",
    "post_attention_layernorm",
    "base_layer",
    "k_proj",
    "o_proj",
    "mlp",
)


def decoder_with_adapters() -> DecoderLM:
    """Every weight frozen but the token embedding (upstream of every layer) and LoRA
    adapters on ``q_proj`` and ``v_proj`` of every layer."""
    model = decoder().requires_grad_(False)
    model.embed_tokens.requires_grad_(True)
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj = LoRALinear(attn.q_proj)
        attn.v_proj = LoRALinear(attn.v_proj)
    return model


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_frozen_offloaded_layers_train_adapters_and_embedding_bit_identically(backend):
    offloaded = train_offloaded_and_compare(
        decoder_with_adapters, backend, RECIPES["adamw"], offload_params=BASE_WEIGHTS
    )
    names = offloaded.plan.offloaded_params
    assert names
    assert not [n for n in names if "lora_" in n or n.startswith("embed_tokens.")]
    assert all(any(f".{s}." in n for s in BASE_WEIGHTS) for n in names)
    if backend.kind == "uva":
        assert len(names) == 9 * SIZES["num_layers"]  # every layer's base weights
    # Gradients flowed through the frozen offloaded layers, upstream to the embedding
    # (compared above at every step, bit for bit); nothing frozen got one.
    last = offloaded.run.grads[-1]
    assert last.keys() == {
        "embed_tokens.weight",
        *(
            f"layers.{i}.self_attn.{proj}.lora_{ab}.weight"
            for i in range(SIZES["num_layers"])
            for proj in ("q_proj", "v_proj")
            for ab in "ab"
        ),
    }
    assert all(g.abs().sum() > 0 for g in last.values())
    assert_counters(offloaded, backend, RECIPES["adamw"])


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


class CheckpointedBlock(DecoderBlock):
    """A block whose own forward checkpoints its body: recompute does not call the module."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return checkpoint(super().forward, hidden_states, use_reentrant=False)


def checkpointed_at_call_site() -> DecoderLM:
    """Each layer called through ``checkpoint(layer, h)``: its hooks run again on recompute."""
    torch.manual_seed(0)
    return DecoderLM(**SIZES, gradient_checkpointing=True)


def checkpointed_inside_layers() -> DecoderLM:
    model = decoder()
    for layer in model.layers:
        layer.__class__ = CheckpointedBlock  # same weights, checkpointed forward
    return model


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layers_checkpointed_at_the_call_site_train_bit_identically(backend):
    # Backward recomputes each layer where its weights already are: in its slots.
    train_offloaded_and_compare(checkpointed_at_call_site, backend, RECIPES["adamw-clip"])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_layers_checkpointed_inside_their_forward_train_bit_identically(backend):
    train_offloaded_and_compare(checkpointed_inside_layers, backend, RECIPES["adamw-clip"])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_checkpointed_offloaded_layers_are_recomputed_in_backward(backend):
    model = checkpointed_at_call_site().train()
    calls = Counter()
    for index, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: calls.update([index]))
    with apply_offload(model, backend.config(), zero_copy=backend.zero_copy):
        lm_loss(model, token_batches(1)[0]).backward()
    assert calls == {index: 2 for index in range(SIZES["num_layers"])}  # forward, recompute


def test_uva_copy_mode_backward_reads_no_weight_from_host_storage():
    model = decoder().train()
    handle = apply_offload(model, BACKENDS["uva-copy"].config(), zero_copy=False)
    host = {
        h.untyped_storage().data_ptr() for e in handle._installed.staged.params for h in e.hosts
    }
    read_from_host = []

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() in host:
            read_from_host.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, unpack):
        loss = lm_loss(model, token_batches(1)[0])
    loss.backward()
    handle.remove()
    assert read_from_host == []


# --------------------------------------------------------------------------------------------
# Under a Lightning Trainer: OffloadCallback, clipping, accumulation, precisions
# --------------------------------------------------------------------------------------------

LIGHTNING_BACKENDS = [
    "prefetch-g2k1s1",
    "prefetch-g1k1s2",
    "uva-host",
    "prefetch-g2k1s1-sim",
    "uva-copy-sim",
]
PRECISIONS = ["32-true", "bf16-true", "bf16-mixed"]
ACCUMULATE = 4


class RecordingLit(LitDecoderLM):
    """The tiny decoder, the same weights every time; keeps every training batch's loss and
    the gradients each optimizer step is given (after accumulation, before clipping)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(DecoderLM(**SIZES), lr=1e-2)
        self.run = Run([], [], {})

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.run.losses.append(loss.detach().clone())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.run.grads.append(grads_of(self))


def fit(lit: RecordingLit, precision: str, *callbacks) -> Run:
    trainer = Trainer(
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = random_tokens(
        vocab_size=SIZES["vocab_size"], seq_len=9, samples=2 * STEPS * ACCUMULATE, batch_size=2
    )
    trainer.fit(lit, data)
    assert trainer.global_step == STEPS
    assert len(lit.run.losses) == STEPS * ACCUMULATE
    return lit.run._replace(params=params_of(lit))


@functools.cache
def reference_fit(precision: str) -> Run:
    return fit(RecordingLit(), precision)


@pytest.mark.filterwarnings("ignore:OffloadCallback. the compute device is the CPU")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", LIGHTNING_BACKENDS)
def test_lightning_fit_with_clipping_and_accumulation_is_bit_identical(backend, precision):
    expected = reference_fit(precision)
    lit = RecordingLit()
    initial = params_of(lit)
    before = dict(lit.named_parameters())
    callback = OffloadCallback(BACKENDS[backend].config())
    with BACKENDS[backend].device():
        got = fit(lit, precision, callback)
    assert_runs_equal(got, expected, initial)
    if precision != "32-true":  # the precision did change the arithmetic
        full = reference_fit("32-true").params
        assert any(not torch.equal(p.float(), full[n]) for n, p in expected.params.items())
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in got.params.values()} == {dtype}
    # The callback removed the offload at the end of fit: the same parameter objects.
    assert callback.handle is None
    assert_same_objects(lit, before)
    stats = callback.last_stats
    assert stats.forwards == STEPS * ACCUMULATE
    assert stats.stalls == 0
