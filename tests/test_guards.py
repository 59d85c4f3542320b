"""Moving or converting a model while offloaded is refused before anything changes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from hydra_offload import OffloadError, apply_offload, plan_offload
from hydra_offload.models import DecoderLM
from hydra_offload.runtime.device import _FACTORY, DeviceRuntime

CONFIGS = {
    "prefetch": {"prefetch": {"offload_group_size": 2}},
    "uva_host": {"uva": {"cpu_offload_gb": 1e-4}},
}


def model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64,
                     vocab_size=64).eval()  # fmt: skip


MOVES = {
    "half": lambda m: m.half(),
    "to_float64": lambda m: m.to(torch.float64),
    "submodule_double": lambda m: m.layers[1].double(),
    "leaf_bfloat16": lambda m: m.layers[1].mlp.up_proj.to(torch.bfloat16),
    "embedding_half": lambda m: m.embed_tokens.half(),
}


# (move, config) pairs whose move converts no offloaded parameter: they must go through.
UNTOUCHED = {("embedding_half", "prefetch")}  # the embedding is outside the layer stack
REFUSED = [
    pytest.param(MOVES[move], CONFIGS[config], id=f"{move}-{config}")
    for move in MOVES
    for config in CONFIGS
    if (move, config) not in UNTOUCHED
]


@pytest.mark.parametrize(("move", "config"), REFUSED)
def test_a_move_that_would_detach_offloaded_weights_is_refused_unchanged(config, move):
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config) as handle:
        dtypes = {n: p.dtype for n, p in m.named_parameters()}
        assert set(_touched(m, move)) & set(handle.plan.offloaded_params)
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
            move(m)
        assert {n: p.dtype for n, p in m.named_parameters()} == dtypes
        assert torch.equal(m(ids), expected)


@pytest.mark.parametrize(("move", "config"), sorted(UNTOUCHED))
def test_a_move_that_converts_no_offloaded_parameter_goes_through(move, config):
    m = model()
    with apply_offload(m, CONFIGS[config]) as handle:
        touched = _touched(m, MOVES[move])
        assert touched
        assert not touched & set(handle.plan.offloaded_params)
        before = {n: p.dtype for n, p in m.named_parameters()}
        MOVES[move](m)
        after = {n: p.dtype for n, p in m.named_parameters()}
    assert {n for n in before if after[n] != before[n]} == touched


def _touched(m: DecoderLM, move) -> set[str]:
    """Names of the parameters a move would convert (found on a fresh copy)."""
    fresh = model()
    before = {n: p.dtype for n, p in fresh.named_parameters()}
    move(fresh)
    return {n for n, p in fresh.named_parameters() if p.dtype != before[n]}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_moves_that_leave_offloaded_weights_in_place_work(config):
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config):
        m.to("cpu")
        m.float()
        m.to(torch.float32)
        assert torch.equal(m(ids), expected)


def test_after_remove_the_model_moves_freely():
    m = model()
    apply_offload(m, CONFIGS["prefetch"]).remove()
    m.half()
    assert all(p.dtype == torch.float16 for p in m.parameters())
    assert all("_apply" not in module.__dict__ for module in m.modules())


DEVICE_MOVES = {
    "to_meta": lambda m: m.to("meta"),
    "to_empty_meta": lambda m: m.to_empty(device="meta"),
    "submodule_to_meta": lambda m: m.layers[1].to(torch.device("meta")),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("move", DEVICE_MOVES.values(), ids=DEVICE_MOVES.keys())
def test_a_device_move_of_offloaded_weights_is_refused_unchanged(config, move):
    # A move to another device (here `meta`, the one a CPU-only machine has; on a GPU
    # `.cpu()` or `.to("cuda:1")`: tests/test_cuda_streams.py) would leave the layers computing
    # with whatever the moved tensors hold.
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config):
        devices = {n: p.device for n, p in m.named_parameters()}
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it"):
            move(m)
        assert {n: p.device for n, p in m.named_parameters()} == devices
        assert torch.equal(m(ids), expected)


# A device other than the CPU, on a machine without an accelerator: the meta device as the
# compute device. UVA serves it in copy mode, where between forwards an offloaded parameter's
# `.data` is its host tensor, on the CPU: `.cpu()` leaves that tensor as it is, so a guard that
# looked only at `.data` would let the move through and move everything else off the device.


class MetaRuntime(DeviceRuntime):
    """The meta device as compute device, with the CPU runtime's synchronous stand-ins for
    streams and events (the accelerator runtime would ask for an allocator meta has not)."""

    def __init__(self) -> None:
        super().__init__(torch.device("meta"))
        self.is_accelerator = False


@pytest.fixture
def meta_compute() -> Iterator[None]:
    token = _FACTORY.set(lambda device: MetaRuntime() if device.type == "meta" else None)
    try:
        yield
    finally:
        _FACTORY.reset(token)


UVA_COPY = CONFIGS["uva_host"]  # with device="meta" and zero_copy=False: copy mode


def rest_on_meta(m: nn.Module, offloaded: set[str]) -> None:
    """Put every parameter but the ``offloaded`` ones on the meta device, where a model
    applied to its compute device has them (without going through ``Module._apply``)."""
    for module_name, module in m.named_modules():
        for key, param in list(module._parameters.items()):
            name = f"{module_name}.{key}" if module_name else key
            if param is not None and name not in offloaded:
                meta = torch.empty_like(param, device="meta")
                module._parameters[key] = nn.Parameter(meta, param.requires_grad)


def snapshot(m: nn.Module) -> dict[str, tuple[int, torch.device, torch.dtype, torch.Tensor]]:
    """Each parameter's object, device, dtype, and values (a copy; meta has none)."""
    return {n: (id(p), p.device, p.dtype, p.detach().clone()) for n, p in m.named_parameters()}


def assert_same(before: dict, after: dict) -> None:
    assert after.keys() == before.keys()
    for name, (obj, device, dtype, values) in before.items():
        assert after[name][:3] == (obj, device, dtype), name
        assert values.is_meta or torch.equal(after[name][3], values), name


OFF_DEVICE_MOVES = {
    "cpu": lambda m: m.cpu(),
    "to_cpu": lambda m: m.to("cpu"),
    "to_cpu_float32": lambda m: m.to("cpu", torch.float32),
    "submodule_cpu": lambda m: m.layers[1].cpu(),
}


@pytest.mark.usefixtures("meta_compute")
@pytest.mark.parametrize("rest", ["on_compute_device", "on_cpu"])
@pytest.mark.parametrize("move", OFF_DEVICE_MOVES.values(), ids=OFF_DEVICE_MOVES.keys())
def test_a_move_off_the_compute_device_is_refused_in_uva_copy_mode_unchanged(move, rest):
    m = model()
    offloaded = set(plan_offload(m, UVA_COPY).offloaded_params)
    assert "layers.1.mlp.up_proj.weight" in offloaded
    if rest == "on_compute_device":
        rest_on_meta(m, offloaded)
    with apply_offload(m, UVA_COPY, device="meta", zero_copy=False) as handle:
        assert handle.device == torch.device("meta")
        # Between forwards the offloaded weights are their host tensors, on the CPU already.
        assert all(p.device.type == "cpu" for n, p in m.named_parameters() if n in offloaded)
        before = snapshot(m)
        with pytest.raises(OffloadError, match="is offloaded: moving or converting it") as err:
            move(m)
        assert "compute device meta" in str(err.value)
        assert_same(before, snapshot(m))


@pytest.mark.usefixtures("meta_compute")
def test_a_move_that_reaches_another_device_is_refused_by_the_device_check():
    # A move function that can leave the meta compute device (the moves above cannot copy out
    # of meta and are refused for that): the device it would reach is what refuses it.
    m = model()
    offloaded = set(plan_offload(m, UVA_COPY).offloaded_params)
    rest_on_meta(m, offloaded)
    with apply_offload(m, UVA_COPY, device="meta", zero_copy=False):
        before = snapshot(m)
        with pytest.raises(OffloadError, match="it would go to cpu, off its compute device meta"):
            m._apply(lambda t: torch.empty_like(t, device="cpu"))
        assert_same(before, snapshot(m))


@pytest.mark.usefixtures("meta_compute")
def test_a_move_onto_the_compute_device_leaves_uva_copy_weights_in_host_memory():
    m = model()
    expected = {n: p.detach().clone() for n, p in m.named_parameters()}
    with apply_offload(m, UVA_COPY, device="meta", zero_copy=False) as handle:
        offloaded = set(handle.plan.offloaded_params)
        params = dict(m.named_parameters())
        m.to("meta")
        m.float()
        m.layers[1].to(torch.device("meta"), torch.float32)
        for name, param in m.named_parameters():
            if name in offloaded:  # the same object, still the host tensor the offload serves
                assert param is params[name], name
                assert param.device.type == "cpu", name
                assert torch.equal(param, expected[name]), name
            else:
                assert param.is_meta, name
    for name, param in m.named_parameters():
        assert param.device.type == ("cpu" if name in offloaded else "meta"), name


FUTURE_FLAGS = ["overwrite_module_params_on_conversion", "swap_module_params_on_conversion"]


@pytest.mark.parametrize("flag", FUTURE_FLAGS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_move_that_would_replace_parameter_objects_is_refused_unchanged(config, flag):
    # Under these torch.__future__ flags `Module._apply` gives every parameter a new object
    # (or swaps its contents), even one the move leaves where it is: the offload would keep
    # serving the old objects.
    m = model()
    ids = torch.randint(0, 64, (2, 8))
    expected = m(ids)
    with apply_offload(m, config):
        before = snapshot(m)
        getattr(torch.__future__, f"set_{flag}")(True)
        try:
            with pytest.raises(OffloadError, match=f"set_{flag}"):
                m.float()
        finally:
            getattr(torch.__future__, f"set_{flag}")(False)
        assert_same(before, snapshot(m))
        assert torch.equal(m(ids), expected)
