"""suggest.py: the prefetch timeline (``simulate_prefetch``) and the settings search
(``suggest_prefetch``).

Models are built on the ``meta`` device: both functions read the plan only. Most timeline
cases use a stack of ``Linear(4, 4)`` layers, 64 bytes each, so a copy takes
``64 / bandwidth`` seconds and the expected step times can be worked out by hand.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from rich.console import Console
from torch import nn

from hydra_offload import OffloadConfig, apply_offload, plan_offload, to_offload_config
from hydra_offload.models import DecoderLM
from hydra_offload.tuning import Suggestion, simulate_prefetch, suggest_prefetch

GIB = 1024**3
MIB = 1024**2
LAYER_BYTES = 64
"""Bytes of one ``Linear(4, 4, bias=False)`` layer in float32."""

HYDRA_APP = Path(__file__).parent / "hydra_app"

# Tiny models on purpose: settings whose plans save under 5% of the model's parameter bytes
# on the device (or nothing) warn.
SAVES_LITTLE = pytest.mark.filterwarnings(
    "ignore:the plan saves .* below the 5%:hydra_offload.plan.OffloadPlanWarning"
)


# --------------------------------------------------------------------------------------------
# Helpers and models
# --------------------------------------------------------------------------------------------


class Stack(nn.Module):
    """One stack of bias-free linear layers; ``widths`` are their output sizes."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, w, bias=False) for w in widths)


class TwoStacks(nn.Module):
    def __init__(self, encoder: int, decoder: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(encoder))
        self.decoder = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(decoder))


def stack(num_layers: int = 4, widths: list[int] | None = None, device: str = "meta") -> Stack:
    with torch.device(device):
        return Stack(widths or [4] * num_layers)


def tiny_lm(num_layers: int = 8) -> DecoderLM:
    """Default sizes: 3,213,312 bytes per layer, 27,804,672 bytes in all (8 layers)."""
    with torch.device("meta"):
        return DecoderLM(num_layers=num_layers)


def llama_7b() -> DecoderLM:
    with torch.device("meta"):
        return DecoderLM(
            vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
            intermediate_size=11008, dtype="bfloat16",
        )  # fmt: skip


def prefetch(group: int, k: int = 1, step: int = 1, layers: object = None) -> OffloadConfig:
    return OffloadConfig(
        offload_backend="prefetch",
        prefetch={
            "offload_group_size": group,
            "offload_num_in_group": k,
            "offload_prefetch_step": step,
        },
        layers=layers,
    )


def step(model: nn.Module, group: int, k: int, s: int, **kwargs: Any) -> float:
    """simulate_prefetch of ``model`` under G, K, S."""
    return simulate_prefetch(plan_offload(model, prefetch(group, k, s)), **kwargs)


def copy_takes(seconds: float, nbytes: int = LAYER_BYTES) -> float:
    """The bandwidth at which copying ``nbytes`` takes ``seconds``."""
    return nbytes / seconds


# --------------------------------------------------------------------------------------------
# simulate_prefetch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "k", "s"), [(1, 1, 1), (1, 1, 2), (2, 1, 1), (4, 2, 2), (8, 3, 3), (4, 4, 5)]
)
@SAVES_LITTLE
def test_compute_bound_step_is_the_compute_plus_the_rest(group, k, s):
    seconds = step(stack(8), group, k, s, layer_seconds=1.0, bandwidth=1e15, other_seconds=0.5)
    assert seconds == pytest.approx(8 * 1.0 + 0.5, rel=1e-9)


@pytest.mark.parametrize(
    ("group", "k", "s", "copies"),
    [
        (1, 1, 2, 8),
        (1, 1, 4, 8),
        (2, 1, 2, 4),
        (4, 2, 2, 4),
        (2, 2, 3, 8),
    ],
)
def test_copy_bound_step_is_every_offloaded_layers_copy_in_turn(group, k, s, copies):
    # A copy takes 100 s, a layer computes in 1 ms: the copy stream never rests.
    seconds = step(stack(8), group, k, s, layer_seconds=1e-3, bandwidth=copy_takes(100.0))
    assert seconds == pytest.approx(copies * 100.0, rel=1e-9)


# Four 64-byte layers; G=2, K=1 offloads layers 1 and 3; with S=1 they share one slot, so
# each copy waits for the other layer to finish. Compute 1 s per layer, a copy 3 s.
#   forward 1: layer 0 0-1 | layer 1 (preloaded) 1-2, then copy of 3 2-5 | layer 2 2-3 |
#              layer 3 waits for its copy 5-6, then the copy of 1 for the next forward 6-9
#              -> 6 s
#   forward 2: layer 0 6-7 | layer 1 waits 9-10, copy of 3 10-13 | layer 2 10-11 |
#              layer 3 13-14, copy of 1 14-17                            -> 8 s, and so on
# With other_seconds=2 first, forward 1 is 0-2 other, layer 0 2-3, layer 1 3-4, copy of 3
# 4-7, layer 2 4-5, layer 3 7-8, copy of 1 8-11 -> 8 s; forward 2: other 8-10, layer 0
# 10-11, layer 1 11-12 (its copy landed at 11), copy of 3 12-15, layer 2 12-13, layer 3
# 15-16 -> 8 s: the 2 s outside the stack hide 2 s of the wait.
@pytest.mark.parametrize(
    ("other", "forwards", "expected"),
    [(0.0, 1, 6.0), (0.0, 2, 8.0), (0.0, 3, 8.0), (2.0, 1, 8.0), (2.0, 3, 8.0)],
)
def test_hand_computed_shared_slot_timeline(other, forwards, expected):
    seconds = step(
        stack(4), 2, 1, 1,
        layer_seconds=1.0, bandwidth=copy_takes(3.0), other_seconds=other, forwards=forwards,
    )  # fmt: skip
    assert seconds == pytest.approx(expected, rel=1e-12)


def test_hand_computed_timeline_with_per_layer_seconds():
    # As above (G=2, K=1, S=1, copy 3 s) with compute 1, 1, 4, 1 s:
    #   forward 1: layer 0 0-1 | layer 1 1-2, copy of 3 2-5 | layer 2 2-6 (hides the copy) |
    #              layer 3 6-7, copy of 1 7-10                                      -> 7 s
    #   forward 2: layer 0 7-8 | layer 1 waits 10-11, copy of 3 11-14 | layer 2 11-15 |
    #              layer 3 15-16                                                    -> 9 s
    seconds = step(stack(4), 2, 1, 1, layer_seconds=[1.0, 1.0, 4.0, 1.0], bandwidth=copy_takes(3.0))
    assert seconds == pytest.approx(9.0, rel=1e-12)


@SAVES_LITTLE
def test_a_prefetch_step_covering_every_offloaded_layer_never_copies():
    # G=2, K=1, S=2: layers 1 and 3 each have their own slot, loaded once at apply time.
    seconds = step(stack(4), 2, 1, 2, layer_seconds=1.0, bandwidth=1e-6, other_seconds=0.25)
    assert seconds == 4.25


def test_hand_computed_uneven_ring_waits_for_its_wrap_around_copy():
    # Eight layers, G=2, K=1: layers 1, 3, 5, 7 at slot positions 0, 1, 2, 0 (S=3). Layers
    # 3 and 5 keep their slots; 1 and 7 share one, so the copy of 1 for the next forward is
    # queued only when 7 ends. Compute 1 s, copy 1.5 s; a forward from time T:
    #   layer 0 T+0-1 | layer 1 waits for its copy (queued at T) 1.5-2.5, copy of 7 2.5-4 |
    #   layers 2-6 2.5-7.5 | layer 7 7.5-8.5, copy of 1 8.5-10                 -> 8.5 s
    # (S=2 hides every copy: 8 s.)
    model = stack(8)
    kwargs = {"layer_seconds": 1.0, "bandwidth": copy_takes(1.5)}
    assert step(model, 2, 1, 3, **kwargs) == pytest.approx(8.5, rel=1e-12)
    assert step(model, 2, 1, 2, **kwargs) == 8.0


@pytest.mark.parametrize(("group", "k"), [(1, 1), (2, 1), (3, 2)])
def test_a_longer_prefetch_step_hides_more_when_a_copy_outlasts_a_layer(group, k):
    kwargs = {"layer_seconds": 1.0, "bandwidth": copy_takes(1.5)}
    model = stack(8)
    shortest = step(model, group, k, k, **kwargs)
    longer = step(model, group, k, k + 1, **kwargs)
    assert longer < shortest


def test_per_layer_seconds_all_equal_match_one_number():
    model = stack(6)
    plan = plan_offload(model, prefetch(3, 1, 1))
    kwargs = {"bandwidth": copy_takes(0.7), "other_seconds": 0.1}
    assert simulate_prefetch(plan, layer_seconds=[0.5] * 6, **kwargs) == simulate_prefetch(
        plan, layer_seconds=0.5, **kwargs
    )


def test_per_layer_seconds_may_be_any_iterable_of_numbers():
    plan = plan_offload(stack(4), prefetch(2, 1, 1))
    kwargs = {"bandwidth": copy_takes(3.0)}
    as_list = simulate_prefetch(plan, layer_seconds=[1.0, 1.0, 4.0, 1.0], **kwargs)
    as_tuple_of_ints = simulate_prefetch(plan, layer_seconds=(1, 1, 4, 1), **kwargs)
    as_array = simulate_prefetch(plan, layer_seconds=np.array([1.0, 1.0, 4.0, 1.0]), **kwargs)
    as_generator = simulate_prefetch(plan, layer_seconds=(float(x) for x in "1141"), **kwargs)
    assert as_list == as_tuple_of_ints == as_array == as_generator


def test_several_stacks_run_in_turn_and_share_the_copy_stream():
    model = TwoStacks(encoder=4, decoder=6).to("meta")
    plan = plan_offload(model, prefetch(1, 1, 2, layers=["encoder", "decoder"]))
    compute_bound = simulate_prefetch(plan, layer_seconds=1.0, bandwidth=1e15, other_seconds=1.0)
    copy_bound = simulate_prefetch(plan, layer_seconds=1e-3, bandwidth=copy_takes(100.0))
    assert compute_bound == pytest.approx(4 + 6 + 1.0, rel=1e-9)
    assert copy_bound == pytest.approx((4 + 6) * 100.0, rel=1e-6)


def test_per_layer_seconds_of_several_stacks_follow_the_plans_stack_order():
    model = TwoStacks(encoder=2, decoder=2).to("meta")
    plan = plan_offload(model, prefetch(4, 1, 1, layers=["encoder", "decoder"]))  # nothing off
    seconds = simulate_prefetch(plan, layer_seconds=[1.0, 2.0, 3.0, 4.0], bandwidth=1.0)
    assert seconds == 10.0
    with pytest.raises(ValueError, match=r"layer_seconds has 3 entries .* 4 layers \(2 \+ 2\)"):
        simulate_prefetch(plan, layer_seconds=[1.0, 2.0, 3.0], bandwidth=1.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bandwidth": 0}, "bandwidth"),
        ({"bandwidth": -1e9}, "bandwidth"),
        ({"bandwidth": float("nan")}, "bandwidth"),
        ({"bandwidth": "25e9"}, "bandwidth"),
        ({"layer_seconds": -1.0}, "layer_seconds"),
        ({"layer_seconds": float("nan")}, "layer_seconds"),
        ({"layer_seconds": float("inf")}, "layer_seconds"),
        ({"layer_seconds": True}, "layer_seconds"),
        ({"layer_seconds": "1.0"}, "layer_seconds"),
        ({"layer_seconds": [1.0, 1.0]}, "layer_seconds"),
        ({"layer_seconds": [1.0, -1.0, 1.0, 1.0]}, r"layer_seconds\[1\]"),
        ({"other_seconds": -0.5}, "other_seconds"),
        ({"forwards": 0}, "forwards"),
        ({"forwards": 2.0}, "forwards"),
    ],
)
def test_invalid_simulation_inputs_raise_naming_the_argument(kwargs, name):
    plan = plan_offload(stack(4), prefetch(2, 1, 1))
    arguments = {"layer_seconds": 1.0, "bandwidth": 1e9, **kwargs}
    with pytest.raises(ValueError, match=name):
        simulate_prefetch(plan, **arguments)


@pytest.mark.parametrize(
    "config", [OffloadConfig(), OffloadConfig(uva={"cpu_offload_gb": 1.0})], ids=["none", "uva"]
)
def test_a_plan_of_another_backend_is_refused_naming_the_plan(config):
    plan = plan_offload(stack(4), config)
    with pytest.raises(
        ValueError, match=rf"plan must be a prefetch plan, got backend '{plan.backend}'"
    ):
        simulate_prefetch(plan, layer_seconds=1.0, bandwidth=1e9)


@pytest.mark.parametrize(
    ("widths", "group", "k", "s"),
    [
        ([4] * 8, 2, 1, 2),
        ([4] * 7, 1, 1, 3),  # 7 offloaded layers, 3 slot positions: the ring wraps unevenly
        ([4, 8] * 4, 1, 1, 2),  # two kinds of layers: each kind has its own slots
        ([4, 8, 8, 4, 4, 8], 1, 1, 2),
    ],
)
def test_the_timeline_prefetches_what_the_runtime_prefetches(widths, group, k, s):
    """Who is copied into a layer's slots once it is done: the runtime's rings (installed on
    the CPU) against the timeline's."""
    from hydra_offload.tuning.simulate import _rings_of_plan

    model = stack(widths=widths, device="cpu")
    config = prefetch(group, k, s)
    predicted = _rings_of_plan(plan_offload(model, config))[0].next_users
    with apply_offload(model, config) as handle:
        ring = handle._installed.rings[0]
        installed = tuple(
            tuple(ring.layers.index(user) for user in layer.next_users) for layer in ring.layers
        )
    assert predicted == installed


# --------------------------------------------------------------------------------------------
# suggest_prefetch
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm() -> DecoderLM:
    return tiny_lm()


@pytest.fixture(scope="module")
def llama() -> DecoderLM:
    return llama_7b()


def suggest(model: nn.Module, **kwargs: Any) -> Suggestion:
    """suggest_prefetch with 1 ms per layer and 10 GB/s unless told otherwise."""
    arguments: dict[str, Any] = {"layer_seconds": 1e-3, "bandwidth": 10e9, **kwargs}
    return suggest_prefetch(model, **arguments)


@pytest.mark.parametrize("budget_mib", [6, 8, 12, 16, 20, 24])
@pytest.mark.parametrize("bandwidth", [1e9, 10e9])
def test_the_suggestion_fits_the_budget(lm, budget_mib, bandwidth):
    s = suggest(lm, bandwidth=bandwidth, device_budget_bytes=budget_mib * MIB)
    assert s.offload_needed
    assert s.device_bytes <= budget_mib * MIB


@pytest.mark.parametrize("budget_mib", [6, 12, 18, 24])
@pytest.mark.parametrize("bandwidth", [0.5e9, 3e9, 100e9])
def test_the_prefetch_step_is_never_below_the_offloaded_layers_per_group(lm, budget_mib, bandwidth):
    p = suggest(lm, bandwidth=bandwidth, device_budget_bytes=budget_mib * MIB).config.prefetch
    assert p.offload_prefetch_step >= p.offload_num_in_group


@pytest.mark.parametrize(
    ("model", "budget", "activations"),
    [
        (tiny_lm(), 12 * MIB, 0),
        (tiny_lm(), 20 * MIB, 3 * MIB),
        (stack(widths=[4, 8] * 4), 300, 0),  # two kinds of layers, each with its own slots
        (stack(widths=[4, 8, 8, 4, 4, 8, 4, 4]), 260, 16),
    ],
    ids=["lm", "lm-activations", "mixed-layers", "mixed-layers-activations"],
)
def test_the_config_validates_and_plans_to_the_predicted_device_bytes(model, budget, activations):
    s = suggest(model, device_budget_bytes=budget, activation_bytes=activations, bandwidth=1e3)
    assert OffloadConfig.model_validate(s.config.model_dump()) == s.config
    plan = plan_offload(model, s.config)
    assert (plan.offloaded_bytes, plan.pool_bytes) == (s.offloaded_bytes, s.pool_bytes)
    assert s.device_bytes == plan.total_param_bytes - plan.device_bytes_saved + activations


@pytest.mark.parametrize(
    ("model", "budget", "bandwidth"),
    [
        (tiny_lm(), 10 * MIB, 2e9),
        (tiny_lm(), 20 * MIB, 1e9),
        (stack(widths=[4, 8] * 4), 300, 64.0),
        (stack(widths=[4, 8, 8, 4, 4, 8, 4, 4]), 260, 100.0),
    ],
    ids=["lm-tight", "lm-loose", "mixed-layers", "mixed-layers-uneven"],
)
def test_the_predicted_step_is_what_simulate_prefetch_says_of_the_plan(model, budget, bandwidth):
    s = suggest(model, device_budget_bytes=budget, bandwidth=bandwidth, other_seconds=2e-3)
    plan = plan_offload(model, s.config)
    expected = simulate_prefetch(plan, layer_seconds=1e-3, bandwidth=bandwidth, other_seconds=2e-3)
    assert s.predicted_step_seconds == expected


SLOW_THIRD = [1e-3, 1e-3, 4e-3] * 4
"""Compute seconds of a 12-layer stack where every third layer is slow."""


@pytest.mark.parametrize(
    ("model", "budget", "bandwidth", "layer_seconds"),
    [
        (tiny_lm(), 10 * MIB, 2e9, 1e-3),
        (tiny_lm(), 16 * MIB, 0.3e9, 1e-3),
        (tiny_lm(), 24 * MIB, 0.3e9, 1e-3),
        (tiny_lm(), 14 * MIB, 100e9, 1e-3),
        (tiny_lm(), 8 * MIB, 1e9, 1e-3),
        (tiny_lm(12), 22 * MIB, 1e9, SLOW_THIRD),
        (tiny_lm(12), 32 * MIB, 3e9, SLOW_THIRD),
        (stack(widths=[4, 8] * 4), 300, 64.0, 1e-3),
        (stack(widths=[4, 8, 8, 4, 4, 8, 4, 4]), 260, 100.0, 1e-3),
    ],
    ids=[
        "copies-partly-hidden",
        "copy-bound",
        "little-to-offload-slowly",
        "compute-bound",
        "tight-budget",
        "uneven-compute",
        "uneven-compute-loose",
        "mixed-layers",
        "mixed-layers-uneven",
    ],
)
@SAVES_LITTLE
def test_the_suggestion_is_the_best_of_the_whole_grid(model, budget, bandwidth, layer_seconds):
    """Against every setting of the grid, planned and simulated one by one: the fastest that
    fits, or within 1% of it the one with the fewest device bytes."""
    kwargs = {"layer_seconds": layer_seconds, "bandwidth": bandwidth, "other_seconds": 1e-3}
    s = suggest(model, device_budget_bytes=budget, **kwargs)
    tried = {}
    num_layers = len(model.layers)
    for group in range(1, num_layers + 1):
        for k in range(1, group + 1):
            offloaded = tuple(i for i in range(num_layers) if i % group >= group - k)
            # S from K; S >= the offloaded layers would keep them all on the device.
            for s_ in range(k, min(2 * k + 4, len(offloaded) - 1) + 1):
                if (offloaded, s_) in tried:
                    continue  # the same plan as a smaller G
                plan = plan_offload(model, prefetch(group, k, s_))
                device = plan.total_param_bytes - plan.device_bytes_saved
                if device <= budget:
                    tried[offloaded, s_] = (simulate_prefetch(plan, **kwargs), device)
    fastest = min(seconds for seconds, _ in tried.values())
    fewest = min(device for seconds, device in tried.values() if seconds <= fastest * 1.01)
    assert s.predicted_step_seconds <= fastest * 1.01
    assert s.device_bytes == fewest


def test_no_offload_is_suggested_when_everything_fits(lm):
    total = plan_offload(lm, OffloadConfig()).total_param_bytes
    s = suggest(lm, device_budget_bytes=total + MIB, activation_bytes=MIB, other_seconds=0.5)
    assert not s.offload_needed
    assert s.config.resolved_backend == "none"
    assert s.overrides == ["offload=none"]
    assert s.predicted_step_seconds == s.baseline_step_seconds == pytest.approx(8e-3 + 0.5)
    assert (s.device_bytes, s.offloaded_bytes, s.pool_bytes) == (total + MIB, 0, 0)


def test_nothing_fits_raises_with_the_budget_and_the_smallest_footprint(llama):
    with pytest.raises(ValueError, match="no prefetch setting fits") as caught:
        suggest(llama, device_budget_bytes=GIB // 2)
    message = str(caught.value)
    assert "device budget of 0.50 GiB (536,870,912 B)" in message
    # Embeddings and head (0.49 GiB) stay; the pool holds at least one layer (0.38 GiB).
    assert "smallest device footprint reachable is 0.87 GiB (929,062,912 B" in message
    assert "raise device_budget_bytes" in message


def test_high_bandwidth_gives_a_suggestion_without_waits(lm):
    # A 3.2 MB layer copies in 32 us, well within a layer's 1 ms.
    s = suggest(lm, device_budget_bytes=10 * MIB, bandwidth=100e9, other_seconds=1e-3)
    assert s.offload_needed
    assert s.predicted_step_seconds == s.baseline_step_seconds
    assert s.slowdown == 1.0


def test_a_llama_7b_sized_model_is_suggested_for_within_a_second(llama):
    start = time.perf_counter()
    s = suggest(llama, layer_seconds=0.01, bandwidth=25e9, device_budget_bytes=8 * GIB,
                activation_bytes=GIB, other_seconds=5e-3)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert s.device_bytes <= 8 * GIB


def test_the_group_size_stays_within_max_group_size(lm):
    s = suggest(lm, device_budget_bytes=24 * MIB, bandwidth=1e9, max_group_size=3)
    assert s.config.prefetch.offload_group_size <= 3


def test_the_overrides_compose_into_the_suggested_config(lm):
    s = suggest(lm, device_budget_bytes=12 * MIB, bandwidth=3e9)
    with initialize_config_dir(config_dir=str(HYDRA_APP / "conf"), version_base="1.3"):
        composed = compose(config_name="config", overrides=s.overrides)
    assert s.overrides[0] == "offload=prefetch"
    assert to_offload_config(composed.offload) == s.config


def test_a_named_layer_stack_is_kept_in_the_config_and_the_overrides(lm):
    s = suggest(lm, device_budget_bytes=12 * MIB, layers="layers")
    assert s.config.layers == "layers"
    assert s.overrides[-1] == "offload.layers=layers"


def test_the_table_shows_the_overrides_and_the_figures(lm):
    s = suggest(lm, device_budget_bytes=12 * MIB, bandwidth=3e9)
    console = Console(width=200, no_color=True, highlight=False, record=True)
    console.print(s)
    text = console.export_text()
    p = s.config.prefetch
    assert f"G={p.offload_group_size}, K={p.offload_num_in_group}" in text
    assert " ".join(s.overrides) in text
    assert "device budget" in text
    assert "12.00 MiB (12,582,912 B)" in text
    assert f"{s.baseline_step_seconds * 1000:,.3f} ms" in text


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"device_budget_bytes": -1}, "device_budget_bytes"),
        ({"device_budget_bytes": float("inf")}, "device_budget_bytes"),
        ({"activation_bytes": -1}, "activation_bytes"),
        ({"other_seconds": float("nan")}, "other_seconds"),
        ({"layer_seconds": [1e-3] * 7}, "layer_seconds"),
        ({"max_group_size": 0}, "max_group_size"),
    ],
)
def test_invalid_suggest_inputs_raise_naming_the_argument(lm, kwargs, name):
    with pytest.raises(ValueError, match=name):
        suggest(lm, **{"device_budget_bytes": 12 * MIB, **kwargs})
