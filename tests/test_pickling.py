"""Pickling an offloaded model gives the plain model with its true weights.

``torch.save(model)``, ``pickle``, ``copy.deepcopy`` and a Lightning checkpoint whose
``hyper_parameters`` hold the network (``save_hyperparameters()`` with an ``nn.Module``
argument, as ashleve/lightning-hydra-template does) must give a module that has the true
weights (from host storage, never a pool slot's contents), ties, dtypes, strides and
``requires_grad`` as they are, no hook, patch or object of the offload, and that loads and
runs in a fresh process as a normal module. The live model stays offloaded and correct.

The prefetch layout offloads layers 1, 3 and 5, which share one set of slots: after a
forward the slots hold layer 1's weights, so layers 3 and 5 point at someone else's. The
network is made of ``torch.nn`` parts and the classes here, so a pickle that names anything of
``hydra_offload`` is caught. Tests run on the CPU runtime and on the simulated device.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import subprocess
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.hooks import RemovableHandle

from hydra_offload import OffloadCallback, apply_offload
from hydra_offload.runtime.simulated import SimulatedDevice

TESTS = Path(__file__).parent
WIDTH = 8
VOCAB = 16

PREFETCH = {"prefetch": {"offload_group_size": 2}}  # layers 1, 3, 5; one set of slots
UVA = {"uva": {"cpu_offload_gb": 1.0}}  # every parameter
LAYOUTS = {  # name: (config, zero_copy)
    "prefetch": (PREFETCH, None),
    "uva-host": (UVA, None),
    "uva-copy": (UVA, False),
}
RUNTIMES = ["cpu", "simulated"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:OffloadCallback. the compute device is the CPU"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*is an instance of .nn.Module. and is already saved"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
]


# --------------------------------------------------------------------------------------------
# The network: torch.nn parts only, with ties, a float64 and two strided parameters
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A residual block with a parameter tied inside it (``gate`` and ``up`` share their
    weight), a gain of its own dtype (float64), a transposed matrix and a matrix with gaps
    between its columns."""

    def __init__(self, gain_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.gate = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.gate.weight = self.up.weight
        self.down = nn.Linear(2 * WIDTH, WIDTH)
        self.gain = nn.Parameter(1 + torch.randn(WIDTH, dtype=gain_dtype) / 10)
        self.mix = nn.Parameter(torch.randn(WIDTH, WIDTH).t() / WIDTH)  # stride (1, WIDTH)
        self.spread = nn.Parameter(torch.randn(WIDTH, 2 * WIDTH)[:, ::2] / WIDTH)  # gaps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.down(torch.tanh(self.gate(h)) * self.up(h)) + h @ self.mix + h @ self.spread
        return x + (h * self.gain).to(x.dtype)


class Net(nn.Module):
    """Embedding, six blocks, a head tied to the embedding."""

    def __init__(self, num_layers: int = 6, gain_dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block(gain_dtype) for _ in range(num_layers))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def net(seed: int = 0, gain_dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(seed)
    return Net(gain_dtype=gain_dtype)


def lit_net() -> LitNet:
    # One dtype: torch.save refuses a state_dict whose offloaded tensors view one host
    # buffer as different dtypes (float32 and float64 here), and Lightning saves it.
    return LitNet(net(gain_dtype=torch.float32))


def token_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


# --------------------------------------------------------------------------------------------
# Entry points, and what a plain copy is
# --------------------------------------------------------------------------------------------


class Recording(pickle.Unpickler):
    """An unpickler that notes the module of every global the pickle names."""

    modules: ClassVar[list[str]] = []

    def find_class(self, module: str, name: str) -> Any:
        Recording.modules.append(module)
        return super().find_class(module, name)


def recording_pickle_module() -> types.ModuleType:
    """A pickle module for ``torch.load(pickle_module=...)`` that records globals."""
    module = types.ModuleType("recording_pickle")
    module.Unpickler = Recording  # type: ignore[attr-defined]
    module.load = pickle.load  # type: ignore[attr-defined]
    return module


def via_pickle(obj: Any) -> tuple[Any, list[str]]:
    Recording.modules = []
    loaded = Recording(io.BytesIO(pickle.dumps(obj))).load()
    return loaded, Recording.modules


def via_torch_save(obj: Any) -> tuple[Any, list[str]]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    Recording.modules = []
    loaded = torch.load(buffer, weights_only=False, pickle_module=recording_pickle_module())
    return loaded, Recording.modules


def via_deepcopy(obj: Any) -> tuple[Any, list[str]]:
    return copy.deepcopy(obj), []


ENTRY_POINTS: dict[str, Callable[[Any], tuple[Any, list[str]]]] = {
    "pickle": via_pickle,
    "torch.save": via_torch_save,
    "deepcopy": via_deepcopy,
}

HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def offload_objects(root: Any) -> list[str]:
    """Everything of the offload's reachable from ``root``: objects of ``hydra_offload``
    classes (modules apart), its functions, hook handles, streams, weak references."""
    found = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
            continue
        seen.add(id(obj))
        where = getattr(type(obj), "__module__", "") or ""
        if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
            if (getattr(obj, "__module__", "") or "").startswith("hydra_offload"):
                found.append(repr(obj))
            continue  # not into its globals
        if isinstance(obj, nn.Module):
            pass
        elif where.startswith("hydra_offload") or isinstance(
            obj, (RemovableHandle, torch.Stream, weakref.ReferenceType, partial)
        ):
            found.append(f"{type(obj).__module__}.{type(obj).__qualname__}")
            continue
        stack.extend(__import__("gc").get_referents(obj))
    return found


def assert_plain_copy_of(copy_: Any, reference: Net) -> None:
    """``copy_`` is a plain :class:`Net` equal to ``reference`` (which has no hooks): same
    parameters bit for bit with their dtypes, strides, ``requires_grad`` and ties, no
    gradient, no hook, nothing of the offload's."""
    assert type(copy_) is Net
    got = dict(copy_.named_parameters(remove_duplicate=False))
    want = dict(reference.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys()
    for name, param in got.items():
        expected = want[name]
        assert type(param) is nn.Parameter, name
        assert (param.dtype, param.shape, param.stride()) == (
            expected.dtype,
            expected.shape,
            expected.stride(),
        ), name
        assert param.requires_grad == expected.requires_grad, name
        assert torch.equal(param.detach(), expected.detach()), f"{name}: not the true weights"
        assert param.grad is None, name  # as PyTorch's pickling and copies of a Parameter
        assert vars(param) == vars(expected), name
    assert copy_.head.weight is copy_.embed.weight
    for layer in copy_.layers:
        assert layer.gate.weight is layer.up.weight
    for name, module in copy_.named_modules():
        assert [t for t in HOOK_TABLES if getattr(module, t)] == [], name
        assert vars(module).keys() == vars(reference.get_submodule(name)).keys(), name
    assert offload_objects(copy_) == []


@contextlib.contextmanager
def runtime(name: str) -> Iterator[SimulatedDevice | None]:
    if name == "cpu":
        yield None
        return
    with SimulatedDevice() as simulated:
        yield simulated


def settle(simulated: SimulatedDevice | None) -> None:
    """Let the simulated device's copies finish (so a test may look at the slots)."""
    if simulated is not None:
        simulated.synchronize()


def assert_stale_slots(model: Net, reference: Net, config: dict) -> None:
    """Prefetch: some offloaded parameter points at a slot holding another layer's weights,
    so a pickle of what ``.data`` holds would be wrong."""
    if "prefetch" not in config:
        return
    want = dict(reference.named_parameters())
    stale = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), want[n])]
    assert stale, "the layout should leave some layer pointing at another layer's weights"


# --------------------------------------------------------------------------------------------
# pickle, torch.save, deepcopy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", RUNTIMES)
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_copy_of_an_offloaded_model_is_the_plain_model_with_its_true_weights(
    layout, entry_point, device
):
    config, zero_copy = LAYOUTS[layout]
    reference, model, ids = net(), net(), token_ids()
    expected = reference(ids)
    with runtime(device) as simulated, apply_offload(model, config, zero_copy=zero_copy) as h:
        model(ids)
        settle(simulated)
        assert_stale_slots(model, reference, config)
        offloaded = {n: p.data.data_ptr() for n, p in model.named_parameters()}
        copied, named_globals = ENTRY_POINTS[entry_point](model)
        # The live model is untouched: still offloaded, same storage, same outputs.
        assert h.active
        assert {n: p.data.data_ptr() for n, p in model.named_parameters()} == offloaded
        assert torch.equal(model(ids), expected)
        state, want = model.state_dict(), reference.state_dict()  # every name of a tied one
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) for k in want)
        assert_plain_copy_of(copied, reference)
        assert not [m for m in named_globals if m.startswith("hydra_offload")]
    assert torch.equal(copied(ids), expected)  # (the simulated device would see CPU copies)
    assert torch.equal(model(ids), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pickled_offloaded_parameters_alone_are_their_true_weights(layout):
    config, zero_copy = LAYOUTS[layout]
    reference, model, ids = net(), net(), token_ids()
    with apply_offload(model, config, zero_copy=zero_copy):
        model(ids)
        assert_stale_slots(model, reference, config)
        params = list(model.parameters())
        for copied in (via_torch_save(params)[0], via_pickle(params)[0], copy.deepcopy(params)):
            assert len(copied) == len(params)
            for param, want in zip(copied, reference.parameters(), strict=True):
                assert type(param) is nn.Parameter
                assert torch.equal(param.detach(), want.detach())
                assert param.stride() == want.stride()


@pytest.mark.parametrize("device", RUNTIMES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_copies_made_while_training_have_the_trained_weights_and_training_goes_on(layout, device):
    """Between backward and step (gradients in host memory) and after steps: copies hold
    the weights trained so far, without gradients; the live model trains on unchanged."""
    config, zero_copy = LAYOUTS[layout]
    reference, model = net(), net()
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    copies = []
    with runtime(device), apply_offload(model, config, zero_copy=zero_copy):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            ids = token_ids(seed=step)
            for m, o in ((reference, reference_opt), (model, opt)):
                o.zero_grad()
                loss_of(m, ids).backward()
            assert all(p.grad is not None for p in model.parameters())
            for entry_point in ENTRY_POINTS.values():
                copied = entry_point(model)[0]
                assert_plain_copy_of(copied, reference)
                copies.append((copied, copy.deepcopy(reference)))
            for o in (reference_opt, opt):
                o.step()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.detach(), q.detach())
    ids = token_ids()
    for copied, snapshot in copies:
        assert torch.equal(copied(ids), snapshot(ids))
    assert torch.equal(model(ids), reference(ids))


def test_after_remove_the_model_pickles_as_any_model():
    model, ids = net(), token_ids()
    handle = apply_offload(model, PREFETCH)
    model(ids)
    via_pickle(model)
    handle.remove()
    modules = [vars(m) for m in model.modules()]
    assert not [d for d in modules if "__reduce_ex__" in d or "_apply" in d]
    assert not [p for p in model.parameters() if "__reduce_ex__" in vars(p)]
    for entry_point in ENTRY_POINTS.values():
        assert_plain_copy_of(entry_point(model)[0], net())


def test_a_model_with_nothing_offloaded_pickles_too():
    model = net()
    with (
        warnings.catch_warnings(),
        apply_offload(model, {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["head"]}}),
    ):
        warnings.simplefilter("ignore")
        model(token_ids())
        assert_plain_copy_of(via_pickle(model)[0], net())


# --------------------------------------------------------------------------------------------
# Lightning: save_hyperparameters() with the network as an argument; checkpoints
# --------------------------------------------------------------------------------------------


class LitNet(LightningModule):
    """As in ashleve/lightning-hydra-template: the network is an argument of ``__init__``,
    and ``save_hyperparameters(logger=False)`` keeps it in ``hparams``, so every checkpoint
    pickles it under ``hyper_parameters``."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return loss_of(self.net, batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def batches() -> DataLoader:
    ids = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(ids), batch_size=2)


class PickleMidFit(Callback):
    """Placed after the OffloadCallback: pickles the whole LightningModule mid-fit."""

    def __init__(self) -> None:
        self.copies: list[LightningModule] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if trainer.global_step == 2:
            self.copies.append(via_torch_save(pl_module)[0])


def fit(lit: LitNet, config: dict | None, *callbacks: Callback) -> None:
    offload = [OffloadCallback(config)] if config is not None else []
    Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        max_steps=4,
        callbacks=[*offload, *callbacks],
    ).fit(lit, batches())


def checkpoints(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=directory, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )


LOAD_IN_A_FRESH_PROCESS = """
import importlib, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch
here = importlib.import_module(sys.argv[3])

ids = here.token_ids()
pairs = list(zip(sys.argv[4::2], sys.argv[5::2]))
for plain, offloaded in pairs:
    here.Recording.modules = []
    checkpoint = torch.load(
        offloaded, weights_only=False, pickle_module=here.recording_pickle_module()
    )
    assert not [m for m in here.Recording.modules if m.startswith("hydra_offload")]
    expected = torch.load(plain, weights_only=False)
    # The pickled network: the true weights, as the run without offload pickled them, and
    # as the checkpoint's state_dict has them.
    network = checkpoint["hyper_parameters"]["net"]
    here.assert_plain_copy_of(network, expected["hyper_parameters"]["net"])
    state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    got = network.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in got)
    loaded = here.LitNet.load_from_checkpoint(offloaded, weights_only=False)
    reference = here.LitNet.load_from_checkpoint(plain, weights_only=False)
    here.assert_plain_copy_of(loaded.net, reference.net)
    assert torch.equal(loaded(ids), reference(ids))
print("checked", len(pairs))
"""


@pytest.mark.parametrize("config", [PREFETCH, UVA], ids=["prefetch", "uva"])
def test_checkpoints_hold_the_network_with_its_true_weights_and_load_in_a_fresh_process(
    tmp_path, config
):
    """Checkpoints at steps 2 and 4 of the same fit without and with the offload: the
    network in ``hyper_parameters`` has the true weights, and ``load_from_checkpoint`` in a
    fresh process gives the model the run without offload gives."""
    fit(lit_net(), None, checkpoints(tmp_path / "plain"))
    fit(lit_net(), config, checkpoints(tmp_path / "offload"))
    pairs = []
    for step in (2, 4):
        pairs += [str(tmp_path / "plain" / f"step={step}.ckpt")]
        pairs += [str(tmp_path / "offload" / f"step={step}.ckpt")]
    paths = [str(TESTS.parent), str(TESTS)]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, *paths, Net.__module__, *pairs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checked 2" in result.stdout


@pytest.mark.parametrize("config", [PREFETCH, UVA], ids=["prefetch", "uva"])
def test_the_lightning_module_pickled_mid_fit_is_plain(config):
    """The whole LightningModule, pickled while the callback's offload is active: its
    network is plain with the true weights; the offloaded names the callback lists in
    ``_ddp_params_and_buffers_to_ignore`` (for DDP) stay out, names the user listed stay."""
    fit(lit_net(), None, probe := PickleMidFit())
    (expected,) = probe.copies
    user_listed = ["net.layers.1.up.weight", "net.embed.weight"]
    for listed in (None, user_listed):
        lit = lit_net()
        if listed is not None:
            lit._ddp_params_and_buffers_to_ignore = list(listed)
        fit(lit, config, probe := PickleMidFit())
        (copied,) = probe.copies
        assert type(copied) is LitNet
        assert_plain_copy_of(copied.net, expected.net)
        assert copied.hparams["net"] is copied.net
        assert getattr(copied, "_ddp_params_and_buffers_to_ignore", None) == listed
        assert offload_objects(copied) == []
