"""Quantized bases: torchao's tensor subclasses and bitsandbytes' 4-bit and 8-bit weights are
offloaded as exactly as plain weights, and LoRA adapters train on them as without offload.

For each scheme (torchao int8 weight-only, bitsandbytes nf4 with double quantization,
bitsandbytes int8 inference) and each backend, on the CPU runtime and on the simulated device:
outputs equal the model without offload while offloaded, after ``remove()`` and in a deep
copy, for a model that ran before the offload ("warm": bitsandbytes has moved its int8 scales
and, on a CPU with AVX512-BF16, repacked its 4-bit weights) and for one that did not
("cold"); the offloaded storages are freed; the plan counts the true bytes. LoRA adapters
(PEFT) on the offloaded base train three AdamW steps exactly as without offload. The
Lightning route (``BitsandbytesPrecision``) converts and quantizes the layers before they
are offloaded. The ``cuda`` tests run the same on a GPU with the libraries' CUDA kernels.
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hydra_offload import OffloadError, apply_offload, plan_offload
from hydra_offload.runtime.simulated import SimulatedDevice

torchao = pytest.importorskip("torchao", reason="the [quant] extra (torchao) is not installed")
bnb = pytest.importorskip("bitsandbytes", reason="the [quant] extra is not installed")
peft = pytest.importorskip("peft", reason="the [quant] extra (peft) is not installed")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

WIDTH, HIDDEN = 64, 128  # bitsandbytes' CPU repacking needs out_features % 32 == 0
SCHEMES = ["torchao-int8", "bnb-nf4", "bnb-int8"]
BACKENDS = {
    "prefetch": {"prefetch": {"offload_group_size": 2}},  # layers 1 and 3
    "uva": {"uva": {"cpu_offload_gb": 1, "cpu_offload_params": ["layers"]}},
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(WIDTH, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _bitsandbytes_layer(linear: nn.Linear, scheme: str, device: str) -> nn.Module:
    if scheme == "bnb-nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type="nf4"
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, has_fp16_weights=False, threshold=0.0
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)  # bitsandbytes quantizes as it moves the layer


def quantized(scheme: str, device: str = "cpu", seed: int = 0) -> Net:
    """The test network with its blocks' linear layers quantized by ``scheme``."""
    torch.manual_seed(seed)
    net = Net()
    if scheme == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        net.to(device)
        quantize_(net.layers, Int8WeightOnlyConfig())
        return net
    for block in net.layers:
        for name in ("up", "down"):
            setattr(block, name, _bitsandbytes_layer(getattr(block, name), scheme, device))
    return net.to(device)


def inner(param: torch.Tensor, owner: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized parameter's values live in, found without the project's
    adapters: a wrapper's inner tensors, a 4-bit weight and its quantization state, an 8-bit
    weight and its scales."""
    if is_traceable_wrapper_subclass(param):
        names, _ = param.__tensor_flatten__()
        return [getattr(param, name) for name in names]
    if isinstance(param, bnb.nn.Params4bit):
        state = param.quant_state
        if state is None:  # not quantized yet
            return [param.data]
        nested = getattr(state, "state2", None)
        values = [*vars(state).values(), *(vars(nested).values() if nested is not None else [])]
        return [param.data, *(v for v in values if isinstance(v, torch.Tensor))]
    if isinstance(param, bnb.nn.Int8Params):
        scales = param.SCB if param.SCB is not None else owner.state.SCB
        return [param.data] if scales is None else [param.data, scales]
    return [param.data]


def weight_tensors(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    found = []
    for name in names:
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        found += inner(getattr(owner, attr), owner)
    return found


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def on(runtime: str) -> Callable:
    return SimulatedDevice if runtime == "simulated" else _nothing


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- offloaded exactly --------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["cpu", "simulated"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_outputs_equal_while_offloaded_after_remove_and_in_a_deep_copy(
    scheme: str, backend: str, warm: bool, runtime: str
) -> None:
    model = quantized(scheme).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(5, WIDTH)
    if warm:  # bitsandbytes moves its int8 scales and may repack 4-bit weights here
        forward(model, x)
        forward(reference, x)
    expected = forward(reference, x)
    with on(runtime)():
        handle = apply_offload(model, BACKENDS[backend])
        assert handle.plan.params, "nothing was offloaded"
        assert torch.equal(forward(model, x), expected)
        assert torch.equal(forward(model, x), expected)
        copied = copy.deepcopy(model)
        handle.remove()
    assert torch.equal(forward(copied, x), expected)
    assert torch.equal(forward(model, x), expected)
    assert torch.equal(forward(model, x), forward(reference, x))


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_offloaded_storages_are_freed(scheme: str, backend: str, warm: bool) -> None:
    model = quantized(scheme).eval()
    x = torch.randn(5, WIDTH)
    if warm:
        forward(model, x)
    plan = plan_offload(model, BACKENDS[backend])
    big = [
        StorageWeakRef(t.untyped_storage())
        for t in weight_tensors(model, list(plan.offloaded_params))
        if t.untyped_storage().nbytes() >= 4096
    ]
    assert big, "the test network has no offloaded storage of 4 KiB or more"
    with apply_offload(model, BACKENDS[backend]):
        forward(model, x)
        forward(model, x)
        gc.collect()
        alive = [ref for ref in big if not ref.expired()]
        assert not alive, f"{len(alive)} of {len(big)} offloaded storages are still alive"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_plan_counts_the_true_bytes(scheme: str, backend: str, warm: bool) -> None:
    model = quantized(scheme).eval()
    if warm:
        forward(model, torch.randn(2, WIDTH))
    plan = plan_offload(model, BACKENDS[backend])
    true = sum(t.numel() * t.element_size() for t in weight_tensors(model, [
        p.name for p in plan.params
    ]))  # fmt: skip
    assert abs(plan.offloaded_bytes - true) <= 0.05 * true, (plan.offloaded_bytes, true)
    quantized_params = [p for p in plan.params if p.name.endswith("weight")]
    assert all(p.kind != "tensor" for p in quantized_params)
    with apply_offload(model, BACKENDS[backend]) as handle:
        assert handle.stats.offloaded_bytes == handle.plan.offloaded_bytes
        assert handle.stats.host_bytes >= handle.plan.offloaded_bytes


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_state_dict_while_offloaded_equals_the_state_dict_before_and_saves(
    scheme: str, backend: str
) -> None:
    model = quantized(scheme).eval()
    reference = copy.deepcopy(model)
    x = torch.randn(3, WIDTH)
    # The same forward without offload: on a CPU with AVX512-BF16, bitsandbytes repacks a
    # 4-bit layer at its first inference forward, and saves it unpacked again.
    forward(reference, x)
    before = reference.state_dict()
    with apply_offload(model, BACKENDS[backend]):
        forward(model, x)  # prefetch: the shared slots now hold another layer's weights
        state = model.state_dict()
        assert state.keys() == before.keys()
        for key, value in before.items():
            assert type(state[key]) is type(value), key
            if is_traceable_wrapper_subclass(value):
                for a, b in zip(inner(state[key], model), inner(value, model), strict=True):
                    assert torch.equal(a, b), key
            else:
                assert torch.equal(state[key], value), key
        buffer = io.BytesIO()
        torch.save(state, buffer)
    buffer.seek(0)
    fresh = quantized(scheme, seed=1).eval()
    loaded = torch.load(buffer, weights_only=False)
    if scheme == "torchao-int8":
        fresh.load_state_dict(loaded, assign=True)
        assert torch.equal(forward(fresh, x), forward(model, x))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", ["bnb-nf4", "bnb-int8"])
def test_a_whole_bitsandbytes_model_pickles_with_its_true_weights(
    scheme: str, backend: str
) -> None:
    model = quantized(scheme).eval()
    x = torch.randn(3, WIDTH)
    expected = forward(model, x)
    with apply_offload(model, BACKENDS[backend]):
        forward(model, x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(forward(loaded, x), expected)


# -- LoRA on a quantized base -------------------------------------------------------------------


def lora(scheme: str) -> nn.Module:
    base = quantized(scheme)
    # What transformers sets on a model loaded in 4 or 8 bits: PEFT then wraps the layers
    # with its bitsandbytes LoRA layers (which can merge).
    base.is_loaded_in_4bit = scheme == "bnb-nf4"
    base.is_loaded_in_8bit = scheme == "bnb-int8"
    config = peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
    return peft.get_peft_model(base, config)


def adamw_steps(model: nn.Module, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    x, target = torch.randn(6, WIDTH), torch.randn(6, 32)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("runtime", ["cpu", "simulated"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_lora_adapters_train_on_an_offloaded_base_as_without_offload(
    scheme: str, backend: str, runtime: str
) -> None:
    expected = adamw_steps(lora(scheme))
    model = lora(scheme)
    with on(runtime)(), apply_offload(model, BACKENDS[backend]) as handle:
        offloaded = set(handle.plan.offloaded_params)
        assert offloaded
        assert not {n for n in offloaded if ".lora_" in n}, "an adapter was offloaded"
        assert any("PEFT adapters" in note for note in handle.plan.notes)
        trained = adamw_steps(model)
    assert trained.keys() == expected.keys()
    worst = max((trained[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", ["bnb-nf4", "bnb-int8"])
def test_adapters_merge_after_remove_as_without_offload(scheme: str, backend: str) -> None:
    x = torch.randn(4, WIDTH)
    plain = lora(scheme)
    adamw_steps(plain, 1)
    expected = forward(plain.merge_and_unload(), x)
    model = lora(scheme)
    with apply_offload(model, BACKENDS[backend]):
        adamw_steps(model, 1)
    assert torch.equal(forward(model.merge_and_unload(), x), expected)


# -- what cannot be offloaded -------------------------------------------------------------------


def test_a_traceable_wrapper_subclass_is_offloaded_through_its_inner_tensors() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    model = Net().eval()
    weight = model.layers[1].up.weight.detach()
    model.layers[1].up.weight = nn.Parameter(TwoTensor(weight, weight.clone()), False)
    x = torch.randn(2, WIDTH)
    expected = forward(model, x)
    with apply_offload(model, BACKENDS["prefetch"]) as handle:
        planned = {p.name: p for p in handle.plan.params}["layers.1.up.weight"]
        assert planned.kind == "TwoTensor"
        assert len(planned.parts) == 2
        assert planned.nbytes == 2 * weight.numel() * weight.element_size()
        assert torch.equal(forward(model, x), expected)
        assert model.layers[1].up.weight.a.data_ptr() != weight.data_ptr()
    assert torch.equal(forward(model, x), expected)


def snapshot(model: nn.Module) -> dict[str, list[int]]:
    return {
        name: [t.data_ptr() for t in weight_tensors(model, [name])]
        for name, _ in model.named_parameters()
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: _trainable_wrapper(),
            r"layers\.1\.up\.weight is a tensor subclass \(TwoTensor\) that requires grad",
        ),
        (
            lambda: _unquantized_4bit(),
            r"layers\.1\.up\.weight is a bitsandbytes 4-bit weight \(Params4bit\) that is not "
            r"quantized yet",
        ),
        (
            lambda: _int8_training(),
            r"layers\.1\.up\.weight is a bitsandbytes 8-bit weight \(Int8Params\) with "
            r"has_fp16_weights=True",
        ),
    ],
    ids=["trainable-subclass", "unquantized-4bit", "int8-training"],
)
def test_weights_that_cannot_be_kept_true_are_refused_with_nothing_changed(
    make: Callable[[], nn.Module], message: str
) -> None:
    model = make()
    before = snapshot(model)
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(OffloadError, match=message):
        apply_offload(model, BACKENDS["prefetch"])
    assert snapshot(model) == before
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks


def _trainable_wrapper() -> nn.Module:
    from torch.testing._internal.two_tensor import TwoTensor

    model = Net()
    weight = model.layers[1].up.weight.detach()
    model.layers[1].up.weight = nn.Parameter(TwoTensor(weight, weight.clone()))
    return model


def _unquantized_4bit() -> nn.Module:
    model = Net()
    model.layers[1].up = bnb.nn.Linear4bit(WIDTH, HIDDEN, quant_type="nf4")  # not moved yet
    return model


def _int8_training() -> nn.Module:
    model = Net()
    model.layers[1].up = bnb.nn.Linear8bitLt(WIDTH, HIDDEN, has_fp16_weights=True).to("cpu")
    return model


# -- the Lightning route ------------------------------------------------------------------------


@pytest.fixture
def bitsandbytes_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning accepts ``BitsandbytesPrecision`` only with a CUDA accelerator; bitsandbytes
    itself runs on the CPU, so the route (conversion, quantization, offload, fit, predict,
    checkpoint) is exercised here with that one check lifted. ``test_cuda_*`` runs it as it
    is, on a GPU."""
    from lightning.pytorch.trainer.connectors import accelerator_connector

    monkeypatch.setattr(
        accelerator_connector._AcceleratorConnector,
        "_validate_precision_choice",
        lambda self: None,
    )


def _lightning_run(mode: str, offload: dict | None, tmp_path, accelerator: str = "cpu"):
    import lightning as L
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from hydra_offload import OffloadCallback

    class LoRANet(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()
            config = peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
            self.net = peft.get_peft_model(self.net, config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, index):
            return ((self(batch[0]).float() - batch[1]) ** 2).mean()

        def predict_step(self, batch, index):
            return self(batch[0]).float()

        def configure_optimizers(self):
            # The adapters only: the plugin's conversion makes new, trainable biases.
            adapters = [p for n, p in self.named_parameters() if ".lora_" in n]
            return torch.optim.AdamW(adapters, lr=1e-2)

    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, WIDTH), torch.randn(16, 32))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = LoRANet()
    dtype = torch.float16 if mode.startswith("int8") else torch.bfloat16
    # Without it, the plugin would quantize LoRA's own linear layers too (OffloadCallback
    # leaves them as they are in any case).
    adapters = {n for n, _ in module.named_modules() if n.endswith((".lora_A", ".lora_B"))}
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=3, logger=False,
        plugins=BitsandbytesPrecision(mode, dtype=dtype, ignore_modules=adapters),
        callbacks=[OffloadCallback(offload)] if offload else [],
        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
        predictions = torch.cat(trainer.predict(module, loader))
    return module, trainer, predictions


@pytest.mark.usefixtures("bitsandbytes_on_the_cpu")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8"])
def test_the_bitsandbytes_precision_route_fits_lora_predicts_and_saves_true_weights(
    mode: str, backend: str, tmp_path
) -> None:
    _, plain, expected = _lightning_run(mode, None, tmp_path / "plain")
    module, trainer, predictions = _lightning_run(mode, BACKENDS[backend], tmp_path / "offload")
    assert predictions.isfinite().all()
    assert torch.equal(predictions, expected)
    layer = module.net.base_model.model.layers[1].up.base_layer
    assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)), type(layer)
    assert not isinstance(module.net.base_model.model.layers[1].up.lora_A.default, type(layer))
    # The checkpoint of the fit holds what the fit without offload saved: the quantized
    # base's true weights and the trained adapters.
    saved, reference = (
        torch.load(t.checkpoint_callback.best_model_path, weights_only=False)["state_dict"]
        for t in (trainer, plain)
    )
    assert saved.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(saved[key], value), key


# -- on a GPU, with the libraries' CUDA kernels -------------------------------------------------


CUDA_SCHEMES = [*SCHEMES, "torchao-int4"]


def quantized_on_cuda(scheme: str) -> Net:
    if scheme != "torchao-int4":
        return quantized(scheme, device="cuda")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    net = Net().to("cuda", torch.bfloat16)
    # tinygemm's layout (a kernel of torch itself; torchao's default "plain" one needs the
    # mslk package), which takes in_features in multiples of 128: the `down` layers.
    config = Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")
    quantize_(net.layers, config, filter_fn=lambda module, name: name.endswith("down"))
    return net


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", CUDA_SCHEMES)
def test_cuda_quantized_outputs_equal_and_offloaded_storages_leave_the_device(
    scheme: str, backend: str
) -> None:
    model = quantized_on_cuda(scheme).eval()
    dtype = next(model.head.parameters()).dtype
    x = torch.randn(5, WIDTH, device="cuda", dtype=dtype)
    expected = forward(model, x)
    names = list(plan_offload(model, BACKENDS[backend]).offloaded_params)
    big = [
        StorageWeakRef(t.untyped_storage())
        for t in weight_tensors(model, names)
        if t.untyped_storage().nbytes() >= 4096
    ]
    before = torch.cuda.memory_allocated()
    with apply_offload(model, BACKENDS[backend]) as handle:
        assert torch.equal(forward(model, x), expected)
        assert torch.equal(forward(model, x), expected)
        gc.collect()
        assert all(ref.expired() for ref in big)
        assert torch.cuda.memory_allocated() < before
        assert handle.stats.host_bytes_pinned == handle.stats.host_bytes
        copied = copy.deepcopy(model).to("cuda")
    assert torch.equal(forward(copied, x), expected)
    assert torch.equal(forward(model, x), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_lora_adapters_train_on_an_offloaded_base_as_without_offload(
    scheme: str, backend: str
) -> None:
    def trained(offload: dict | None) -> dict[str, torch.Tensor]:
        base = quantized(scheme, device="cuda")
        config = peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
        model = peft.get_peft_model(base, config)
        torch.manual_seed(1)
        x, target = torch.randn(6, WIDTH, device="cuda"), torch.randn(6, 32, device="cuda")
        handle = apply_offload(model, offload) if offload else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            ((model(x) - target) ** 2).mean().backward()
            optimizer.step()
        if handle is not None:
            handle.remove()
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    expected, got = trained(None), trained(BACKENDS[backend])
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cuda_the_bitsandbytes_precision_route_fits_lora_and_predicts(
    mode: str, backend: str, tmp_path
) -> None:
    _, _, expected = _lightning_run(mode, None, tmp_path / "plain", accelerator="cuda")
    _, _, predictions = _lightning_run(
        mode, BACKENDS[backend], tmp_path / "offload", accelerator="cuda"
    )
    assert torch.equal(predictions, expected)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_moves_onto_the_compute_device_leave_quantized_weights_offloaded(
    scheme: str, backend: str
) -> None:
    # Lightning's strategy moves the whole module to its device after the offload: torch
    # swaps a tensor subclass's parameter with a new wrapper of itself even when nothing
    # changes, which would take the offload's pickling overrides away.
    model = quantized(scheme).eval()
    x = torch.randn(3, WIDTH)
    expected = forward(model, x)
    with apply_offload(model, BACKENDS[backend]) as handle:
        params = dict(model.named_parameters())
        model.to("cpu")
        model.cpu()
        assert dict(model.named_parameters()) == params
        assert torch.equal(forward(model, x), expected)
        assert torch.equal(forward(copy.deepcopy(model), x), expected)
        with pytest.raises(OffloadError, match="offloaded: moving or converting"):
            model.to(torch.float64)
        assert handle.active
    assert torch.equal(forward(model, x), expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_simulated_device_sees_a_missing_wait_on_quantized_weights(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The simulated device follows the copies of every part (inner tensors, quantization
    # state, scales) through the libraries' own operators: a layer that computes without
    # waiting for its copy fails there, as it would compute with half-copied weights on a GPU.
    from hydra_offload.backends import prefetch
    from hydra_offload.runtime.simulated import SimulatedDeviceError

    def acquire_without_waiting(ring, layer) -> None:
        if not ring.holds(layer):
            ring.load(layer, now=True)

    monkeypatch.setattr(prefetch._Ring, "_acquire", acquire_without_waiting)
    model = quantized(scheme).eval()
    x = torch.randn(5, WIDTH)

    def two_forwards() -> None:
        with SimulatedDevice(), apply_offload(model, BACKENDS["prefetch"]):
            forward(model, x)
            forward(model, x)

    with pytest.raises(SimulatedDeviceError, match="unordered access"):
        two_forwards()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_adapters_injected_without_a_peft_model_stay_on_the_device_and_train_as_without_offload(
    backend: str,
) -> None:
    def injected() -> nn.Module:
        model = quantized("bnb-nf4")
        config = peft.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
        model = peft.inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name)
        return model

    expected = adamw_steps(injected())
    model = injected()
    with apply_offload(model, BACKENDS[backend]) as handle:
        assert not [n for n in handle.plan.offloaded_params if ".lora_" in n]
        trained = adamw_steps(model)
    assert max((trained[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
