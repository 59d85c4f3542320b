"""Offloading the models people actually run, without per-model code.

Each architecture is built from a tiny config with random weights (no download): Llama,
GPT-2 (tied input/output embeddings), Mixtral and Qwen2-MoE (fused expert tensors), T5 (an
encoder and a decoder stack), BERT and ViT from ``transformers``; a plain ``nn.Sequential``
stack; and a timm ViT where timm imports (timm needs torchvision, and PyPI's torchvision
does not load beside a CPU build of torch: skipped there). Each runs under each backend
(prefetch; prefetch with every layer offloaded and two slots; UVA with a budget of half the
model; UVA copy mode) and must give bit-identical outputs to the unoffloaded model on CPU,
the same ``generate()`` tokens for the generative models, checkpoints with the true weights,
and be restored exactly by ``remove()``. Auto-detection must pick the right layer stack and
list the module lists it rejected, with the reason, in the plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers  # a dev dependency: missing, this file must fail, not skip
from torch import nn

from hydra_offload import apply_offload, plan_offload
from hydra_offload.plan import GIB

transformers.logging.set_verbosity_error()

# A pattern that matches nothing would make a selector test pass vacuously.
pytestmark = pytest.mark.filterwarnings("error::hydra_offload.plan.OffloadPlanWarning")

VOCAB = 128
HIDDEN = 32
SEQ = 8
NEW_TOKENS = 5
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's tiny models on one intra-op thread (restored afterwards): they gain
    nothing from more, and OpenMP workers spinning on a busy 2-core machine make each small
    matmul up to a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The architectures
# --------------------------------------------------------------------------------------------


def _hf(factory: Any, config: Any) -> nn.Module:
    torch.manual_seed(0)
    return factory.from_config(config).eval()  # the default attention (sdpa on CPU)


def _decoder_config(cls: Any, **extra: Any) -> Any:
    return cls(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        **extra,
    )


def build_llama() -> nn.Module:
    return _hf(transformers.AutoModelForCausalLM, _decoder_config(transformers.LlamaConfig))


def build_mixtral() -> nn.Module:
    config = _decoder_config(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)
    return _hf(transformers.AutoModelForCausalLM, config)


def build_qwen2_moe() -> nn.Module:
    config = _decoder_config(
        transformers.Qwen2MoeConfig,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    )
    return _hf(transformers.AutoModelForCausalLM, config)


def build_gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=4,
        n_head=4,
        n_positions=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return _hf(transformers.AutoModelForCausalLM, config)


def build_t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return _hf(transformers.AutoModelForSeq2SeqLM, config)


def build_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return _hf(transformers.AutoModel, config)


def build_vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    return _hf(transformers.AutoModel, config)


def build_sequential() -> nn.Module:
    torch.manual_seed(0)
    blocks = (
        nn.Sequential(nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, 64), nn.GELU(), nn.Linear(64, HIDDEN))
        for _ in range(4)
    )
    return nn.Sequential(*blocks).eval()


def build_timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=HIDDEN,
        depth=4,
        num_heads=4,
        num_classes=10,
    )
    return model.eval()


def token_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = PAD, 0  # the first row is left-padded
    return {"input_ids": ids, "attention_mask": mask}


def t5_inputs() -> dict[str, torch.Tensor]:
    decoder = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    return {**token_inputs(), "decoder_input_ids": decoder}


def float_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))}


def image_inputs() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def pixel_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": image_inputs()["x"]}


def run_lm(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    return (model(**inputs).logits,)


def run_t5(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    out = model(**inputs)
    return out.logits, out.encoder_last_hidden_state


def run_encoder(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    out = model(**inputs)
    return out.last_hidden_state, out.pooler_output


def run_plain(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    return (model(inputs["x"]),)


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    run: Callable[[nn.Module, dict], tuple[torch.Tensor, ...]]
    stack: str
    """The stack auto-detection must choose."""
    rejected: tuple[str, ...] = ()
    """The module lists auto-detection must reject (``{i}``: each of the four layers)."""
    layers: tuple[str, ...] | None = None
    """``offload.layers`` for the prefetch runs of the matrix (``None``: auto-detect)."""
    generates: bool = False

    def __str__(self) -> str:
        return self.name


LLAMA = Arch("llama", build_llama, token_inputs, run_lm, "model.layers", generates=True)
MIXTRAL = Arch("mixtral", build_mixtral, token_inputs, run_lm, "model.layers", generates=True)
QWEN2_MOE = Arch("qwen2_moe", build_qwen2_moe, token_inputs, run_lm, "model.layers", generates=True)
GPT2 = Arch("gpt2", build_gpt2, token_inputs, run_lm, "transformer.h", generates=True)
T5 = Arch(
    "t5",
    build_t5,
    t5_inputs,
    run_t5,
    "decoder.block",
    rejected=("encoder.block", "encoder.block.{i}.layer", "decoder.block.{i}.layer"),
    layers=("encoder.block", "decoder.block"),
    generates=True,
)
BERT = Arch("bert", build_bert, token_inputs, run_encoder, "encoder.layer")
VIT = Arch("vit", build_vit, pixel_inputs, run_encoder, "layers")
SEQUENTIAL = Arch("sequential", build_sequential, float_inputs, run_plain, "", rejected=("{i}",))
TIMM_VIT = Arch("timm_vit", build_timm_vit, image_inputs, run_plain, "blocks")

ARCHS = [LLAMA, GPT2, MIXTRAL, QWEN2_MOE, T5, BERT, VIT, SEQUENTIAL, TIMM_VIT]
BACKENDS = ["prefetch", "prefetch_2x2", "uva", "uva_copy"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def backend_config(arch: Arch, backend: str, model: nn.Module) -> tuple[dict, dict]:
    """The offload config and ``apply_offload`` keyword arguments of one matrix cell."""
    if backend.startswith("uva"):
        # Half the model's bytes: some parameters offloaded, not all.
        config: dict[str, Any] = {"uva": {"cpu_offload_gb": param_bytes(model) / 2 / GIB}}
        return config, ({"zero_copy": False} if backend == "uva_copy" else {})
    if backend == "prefetch":
        config = {"prefetch": {"offload_group_size": 2}}
    else:  # every layer offloaded, two slots per parameter
        settings = {"offload_group_size": 2, "offload_num_in_group": 2, "offload_prefetch_step": 2}
        config = {"prefetch": settings}
    if arch.layers is not None:
        config["layers"] = list(arch.layers)
    return config, {}


def assert_same(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


def generate(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model.generate(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )


@functools.cache
def reference(arch: Arch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The unoffloaded model's outputs (and greedy tokens) on ``arch.inputs()``, computed once
    per architecture on a model built like every other (same seed, so the same weights)."""
    model = arch.build()
    inputs = arch.inputs()
    with torch.no_grad():
        outputs = arch.run(model, inputs)
        tokens = generate(model, inputs) if arch.generates else None
    return outputs, tokens


def snapshot(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """Every parameter (tied ones under each name), the object, and a copy of its values."""
    return [
        (name, param, param.detach().clone())
        for name, param in model.named_parameters(remove_duplicate=False)
    ]


def assert_restored(model: nn.Module, before: list[tuple[str, nn.Parameter, torch.Tensor]]) -> None:
    after = list(model.named_parameters(remove_duplicate=False))
    assert [name for name, _ in after] == [name for name, _, _ in before]
    for (name, param), (_, original, values) in zip(after, before, strict=True):
        assert param is original, name
        assert param.device == values.device, name
        assert param.dtype == values.dtype, name
        assert param.stride() == values.stride(), name
        assert torch.equal(param.detach(), values), name


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def hooks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """How many hooks of each kind every module carries, and whether ``_apply`` is patched."""
    return {
        name: (*(len(getattr(m, d)) for d in _HOOK_DICTS), "_apply" in m.__dict__)
        for name, m in model.named_modules()
    }


class LayerCalls:
    """Records how a layer is called: positional and keyword arguments, KV cache or not."""

    def __init__(self, layer: nn.Module) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.handle = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((args, dict(kwargs)))

    @property
    def with_cache(self) -> int:
        cache = transformers.Cache
        return sum(
            any(isinstance(v, cache) for v in (*args, *kwargs.values()))
            for args, kwargs in self.calls
        )

    @property
    def with_kwargs(self) -> int:
        return sum(bool(kwargs) for _, kwargs in self.calls)


def layer_of(model: nn.Module, stack: str, index: int) -> nn.Module:
    return (model.get_submodule(stack) if stack else model)[index]


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_offloaded_model_matches_the_unoffloaded_one(arch: Arch, backend: str) -> None:
    model = arch.build()
    inputs = arch.inputs()
    expected, expected_tokens = reference(arch)
    before, hooks_before = snapshot(model), hooks(model)
    distinct = len(list(model.parameters()))
    config, kwargs = backend_config(arch, backend, model)

    handle = apply_offload(model, config, **kwargs)
    try:
        plan = handle.plan
        assert plan.backend == backend.split("_")[0]
        assert plan.params
        if plan.backend == "uva":
            assert len(plan.params) < distinct  # the budget takes part of the model
        if plan.backend == "prefetch":
            want = arch.layers or (arch.stack,)
            assert plan.layers == want
            all_layers = backend == "prefetch_2x2"
            for stack in plan.stacks:
                assert stack.offloaded_layers == ((0, 1, 2, 3) if all_layers else (1, 3))
        with torch.no_grad():
            for _ in range(2):
                assert_same(arch.run(model, inputs), expected)
            if arch.generates:
                calls = LayerCalls(layer_of(model, arch.stack, 1))
                try:
                    tokens = generate(model, inputs)
                finally:
                    calls.handle.remove()
                assert torch.equal(tokens, expected_tokens)
                # What makes generate() a test: layers get the KV cache and keyword arguments.
                assert calls.with_cache >= 2
                assert calls.with_kwargs == len(calls.calls)
        stats = handle.stats
        assert stats.forwards >= (3 if arch.generates else 2)
        if plan.backend == "prefetch":
            assert stats.stalls == 0
            assert stats.loads > 0
        if backend in ("prefetch_2x2", "uva_copy"):
            assert stats.h2d_bytes > 0  # weights really travel from host storage each time
        # Checkpoints taken while offloaded hold the true weights, not a slot's contents.
        state = model.state_dict()
        true = {name: values for name, _, values in before}
        assert set(plan.offloaded_params) <= set(state)
        for name in set(state) & set(true):
            assert torch.equal(state[name], true[name]), name
    finally:
        handle.remove()

    assert not handle.active
    assert_restored(model, before)
    assert hooks(model) == hooks_before
    with torch.no_grad():
        assert_same(arch.run(model, inputs), expected)


# --------------------------------------------------------------------------------------------
# Layer-stack auto-detection on real architectures
# --------------------------------------------------------------------------------------------


def module_lists(model: nn.Module) -> set[str]:
    return {
        path
        for path, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential))
    }


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_auto_detection_picks_the_layer_stack_and_explains_why(arch: Arch) -> None:
    with torch.device("meta"):
        model = arch.build()
    plan = plan_offload(model, {"prefetch": {"offload_group_size": 2}})

    assert plan.layers == (arch.stack,)
    assert plan.stacks[0].path == arch.stack
    assert plan.stacks[0].offloaded_layers == (1, 3)
    prefix = f"{arch.stack}." if arch.stack else ""
    layers = {name[len(prefix) :].split(".")[0] for name in plan.offloaded_params}
    assert all(name.startswith(prefix) for name in plan.offloaded_params)
    assert layers == {"1", "3"}

    # Every module list of the model is a candidate; exactly one is chosen, with its reason.
    decided = {c.path: c for c in plan.candidates}
    assert set(decided) == module_lists(model)
    chosen = decided[arch.stack]
    assert chosen.chosen
    # "most parameter bytes" when other lists could have been chosen, else "the only candidate".
    others = [c for c in decided.values() if not c.chosen and c.eligible]
    assert chosen.reason == ("most parameter bytes" if others else "the only candidate")
    assert chosen.num_children == chosen.same_class == 4
    assert chosen.param_bytes == sum(
        p.numel() * p.element_size() for p in model.get_submodule(arch.stack).parameters()
    )
    rejected = {path: c for path, c in decided.items() if not c.chosen}
    want = {pattern.format(i=i) for pattern in arch.rejected for i in range(4)}
    assert set(rejected) == want
    for c in rejected.values():
        if c.same_class < 2:
            assert c.reason == "fewer than two children of one class"
        else:
            assert c.param_bytes < chosen.param_bytes
            assert c.reason.startswith("fewer parameter bytes")

    # The summary users see names the choice and every rejected list with its reason.
    summary = plan.summary(width=250)
    assert "Layer stack auto-detection" in summary
    assert f"{chosen.display_path} " in summary
    assert f"chosen: {chosen.reason}" in summary
    for c in rejected.values():
        assert f"{c.display_path} " in summary
    assert summary.count("rejected: ") == len(rejected)


def test_t5_auto_detection_takes_the_decoder_the_stack_with_more_bytes() -> None:
    with torch.device("meta"):
        model = build_t5()
    plan = plan_offload(model, {"prefetch": {"offload_group_size": 2}})
    decided = {c.path: c for c in plan.candidates}
    encoder, decoder = decided["encoder.block"], decided["decoder.block"]
    # Both are stacks of four T5Blocks; the decoder's also hold cross-attention.
    assert encoder.layer_class == decoder.layer_class == "T5Block"
    assert encoder.param_bytes < decoder.param_bytes
    assert decoder.chosen
    assert not encoder.chosen
    assert encoder.reason == (
        f"fewer parameter bytes ({encoder.param_bytes:,} < {decoder.param_bytes:,})"
    )
    # A block's inner list mixes self-attention, (cross-attention) and feed-forward.
    inner = decided["decoder.block.0.layer"]
    assert (inner.num_children, inner.same_class) == (3, 1)


def test_t5_two_stacks_get_their_own_plans_and_pool_entries() -> None:
    model = build_t5()
    inputs = t5_inputs()
    expected, expected_tokens = reference(T5)
    config = {"prefetch": {"offload_group_size": 2}, "layers": ["encoder.block", "decoder.block"]}
    plan = plan_offload(model, config)

    assert plan.layers == ("encoder.block", "decoder.block")
    assert plan.candidates == ()  # named, not detected
    assert [(s.path, s.num_layers, s.offloaded_layers) for s in plan.stacks] == [
        ("encoder.block", 4, (1, 3)),
        ("decoder.block", 4, (1, 3)),
    ]
    by_stack = {
        path: {n for n in plan.offloaded_params if n.startswith(path + ".")} for path in plan.layers
    }
    assert by_stack["encoder.block"]
    assert by_stack["decoder.block"]
    assert by_stack["encoder.block"] | by_stack["decoder.block"] == set(plan.offloaded_params)
    for stack in plan.stacks:
        assert stack.offloaded_bytes == sum(p.nbytes for p in plan.params if p.stack == stack.path)
        assert stack.pool_bytes == sum(s.total_bytes for s in plan.pool if s.stack == stack.path)
    # Same name inside the layer, same shape: still one pool entry per stack.
    q = [s for s in plan.pool if s.local_name == "layer.0.SelfAttention.q.weight"]
    assert sorted(s.stack for s in q) == ["decoder.block", "encoder.block"]
    assert {s.local_name for s in plan.pool if s.stack == "encoder.block"} == {
        n.removeprefix("encoder.block.1.")
        for n in by_stack["encoder.block"]
        if n.startswith("encoder.block.1.")
    }
    cross = [s for s in plan.pool if "EncDecAttention" in s.local_name]
    assert cross
    assert {s.stack for s in cross} == {"decoder.block"}

    with apply_offload(model, config) as handle:
        assert handle.plan == plan
        enc_q = model.encoder.block[1].layer[0].SelfAttention.q.weight
        dec_q = model.decoder.block[1].layer[0].SelfAttention.q.weight
        assert enc_q.data_ptr() != dec_q.data_ptr()  # separate slots
        with torch.no_grad():
            for _ in range(2):
                assert_same(run_t5(model, inputs), expected)
            assert torch.equal(generate(model, inputs), expected_tokens)
        assert handle.stats.stalls == 0
    with torch.no_grad():
        assert_same(run_t5(model, inputs), expected)


# --------------------------------------------------------------------------------------------
# Mixture of experts: expert weights only
# --------------------------------------------------------------------------------------------


def moe_config(backend: str, patterns: list[str]) -> dict:
    if backend == "uva":
        return {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": patterns}}
    return {"prefetch": {"offload_group_size": 2, "offload_params": patterns}}


@pytest.mark.parametrize(
    ("backend", "patterns"),
    [("uva", ["@experts"]), ("prefetch", ["@experts"]), ("prefetch", ["experts"])],
    ids=["uva-@experts", "prefetch-@experts", "prefetch-experts"],
)
@pytest.mark.parametrize("arch", [MIXTRAL, QWEN2_MOE], ids=str)
def test_moe_offloads_expert_weights_only(arch: Arch, backend: str, patterns: list[str]) -> None:
    model = arch.build()
    inputs = arch.inputs()
    expected, _ = reference(arch)
    names = [name for name, _ in model.named_parameters()]
    experts = [n for n in names if ".experts." in n]
    # In this transformers version the experts of a layer are fused tensors.
    assert {n.split(".experts.")[1] for n in experts} == {"gate_up_proj", "down_proj"}
    if backend == "prefetch":
        experts = [n for n in experts if n.split(".")[2] in ("1", "3")]

    with apply_offload(model, moe_config(backend, patterns)) as handle:
        offloaded = handle.plan.offloaded_params
        assert offloaded
        assert all(".experts." in n for n in offloaded), offloaded
        assert list(offloaded) == experts  # all of them, in named_parameters() order
        assert not any("shared_expert" in n or ".gate." in n for n in offloaded)
        with torch.no_grad():
            for _ in range(2):
                assert_same(arch.run(model, inputs), expected)
        if backend == "prefetch":
            assert handle.stats.stalls == 0
            assert handle.plan.pool
            assert all(".experts." in f".{s.local_name}" for s in handle.plan.pool)
    with torch.no_grad():
        assert_same(arch.run(model, inputs), expected)


# --------------------------------------------------------------------------------------------
# GPT-2: tied input/output embeddings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [None, False], ids=["host", "copy"])
def test_gpt2_tied_embeddings_stay_tied_under_uva(zero_copy: bool | None) -> None:
    model = build_gpt2()
    inputs = token_inputs()
    expected, expected_tokens = reference(GPT2)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    before = snapshot(model)
    budget = wte.numel() * wte.element_size() / GIB  # exactly the shared embedding

    handle = apply_offload(model, {"uva": {"cpu_offload_gb": budget}}, zero_copy=zero_copy)
    try:
        # Offloaded once, under its first name; both modules keep the one Parameter.
        assert handle.plan.offloaded_params == ("transformer.wte.weight",)
        assert model.transformer.wte.weight is wte
        assert model.lm_head.weight is wte
        with torch.no_grad():
            for _ in range(2):
                assert_same(run_lm(model, inputs), expected)
            assert torch.equal(generate(model, inputs), expected_tokens)
        assert model.lm_head.weight is model.transformer.wte.weight
    finally:
        handle.remove()
    assert model.transformer.wte.weight is wte
    assert model.lm_head.weight is wte
    assert_restored(model, before)
    with torch.no_grad():
        assert_same(run_lm(model, inputs), expected)


# --------------------------------------------------------------------------------------------
# Selectors on real parameter names
# --------------------------------------------------------------------------------------------


def test_llama_mlp_selector_takes_the_mlp_of_the_offloaded_layers() -> None:
    model = build_llama()
    inputs = token_inputs()
    expected, _ = reference(LLAMA)
    config = {"prefetch": {"offload_group_size": 2, "offload_params": ["@mlp"]}}
    want = [
        n
        for n, _ in model.named_parameters()
        if n.startswith(("model.layers.1.mlp.", "model.layers.3.mlp."))
    ]
    assert len(want) == 6  # gate, up, down of two layers
    with apply_offload(model, config) as handle:
        assert list(handle.plan.offloaded_params) == want
        with torch.no_grad():
            for _ in range(2):
                assert_same(run_lm(model, inputs), expected)
        assert handle.stats.stalls == 0


def test_t5_attention_selector_takes_self_and_cross_attention_only() -> None:
    model = build_t5()
    inputs = t5_inputs()
    expected, _ = reference(T5)
    config = {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["@attention"]}}
    want = [
        n for n, _ in model.named_parameters() if ".SelfAttention." in n or ".EncDecAttention." in n
    ]
    assert any(".EncDecAttention." in n for n in want)
    with apply_offload(model, config) as handle:
        assert list(handle.plan.offloaded_params) == want
        with torch.no_grad():
            for _ in range(2):
                assert_same(run_t5(model, inputs), expected)


@pytest.mark.parametrize(
    ("arch", "table"),
    [(BERT, "embeddings.word_embeddings.weight"), (VIT, "embeddings.cls_token")],
    ids=str,
)
def test_embeddings_selector_with_uva(arch: Arch, table: str) -> None:
    model = arch.build()
    inputs = arch.inputs()
    expected, _ = reference(arch)
    config = {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["@embeddings"]}}
    want = [n for n, _ in model.named_parameters() if n.startswith("embeddings.")]
    assert table in want
    with apply_offload(model, config) as handle:
        assert list(handle.plan.offloaded_params) == want
        with torch.no_grad():
            for _ in range(2):
                assert_same(arch.run(model, inputs), expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"offload_group_size": 2, "offload_num_in_group": 2, "offload_prefetch_step": 2},
        {"offload_group_size": 1, "offload_params": ["@experts"]},
    ],
    ids=["all-params", "@experts"],
)
def test_moe_stack_with_dense_layers_between_sparse_ones(settings: dict) -> None:
    # Qwen2-MoE's mlp_only_layers (like DeepSeek's first dense layers): the layers of one
    # stack hold different parameters, so pool entries serve only some of the layers.
    config = _decoder_config(
        transformers.Qwen2MoeConfig,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[1, 2],
    )
    model = _hf(transformers.AutoModelForCausalLM, config)
    inputs = token_inputs()
    with torch.no_grad():
        expected = run_lm(model, inputs)
        expected_tokens = generate(model, inputs)
    with apply_offload(model, {"prefetch": settings}) as handle:
        plan = handle.plan
        sparse = {0, 3} if "offload_params" in settings else {0, 1, 2, 3}
        assert set(plan.stacks[0].offloaded_layers) == sparse
        experts = {s.local_name for s in plan.pool if ".experts." in f".{s.local_name}"}
        assert experts == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
        with torch.no_grad():
            for _ in range(2):
                assert_same(run_lm(model, inputs), expected)
            assert torch.equal(generate(model, inputs), expected_tokens)
        assert handle.stats.stalls == 0
