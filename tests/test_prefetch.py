"""The prefetch backend: offloaded layers stream through a static slot pool, in any order.

Slot ownership, the prefetch ring, on-demand loads (stalls), state_dict redirection and the
counters are the same code as on CUDA, and are what these tests pin down. The tests that take
the ``run_on`` fixture run twice: on the CPU runtime (copies synchronous) and on the simulated
device (copies complete later on other threads, and any missing wait or host/device mix-up
raises: see ``hydra_offload.runtime.simulated``). References are computed by the very same
layers before offloading (a deep copy), run in the same order.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hydra_offload import OffloadPlanWarning, apply_offload
from hydra_offload.models import DecoderBlock, DecoderLM
from hydra_offload.runtime.host import ALIGNMENT

HIDDEN = 16


def prefetch(group: int, k: int = 1, step: int = 1, params=(), layers=None) -> dict:
    config: dict = {
        "prefetch": {
            "offload_group_size": group,
            "offload_num_in_group": k,
            "offload_prefetch_step": step,
            "offload_params": list(params),
        }
    }
    if layers is not None:
        config["layers"] = layers
    return config


def small_decoder(num_layers: int = 6, **kwargs) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(
        vocab_size=64,
        hidden_size=32,
        num_layers=num_layers,
        num_heads=4,
        intermediate_size=64,
        **kwargs,
    )
    return model.eval()


def token_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2, 7), generator=generator)


class Ordered(nn.Module):
    """Runs its layers in the order given to forward, so tests choose it."""

    def __init__(self, num_layers: int = 6, block=None) -> None:
        super().__init__()
        block = block or (lambda: DecoderBlock(HIDDEN, num_heads=2, intermediate_size=32))
        self.layers = nn.ModuleList(block() for _ in range(num_layers))

    def forward(self, x: torch.Tensor, order: list[int]) -> torch.Tensor:
        for index in order:
            x = self.layers[index](x)
        return x


class Exploding(nn.Module):
    """Wraps a block; raises after computing when ``explode`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.block = DecoderBlock(HIDDEN, num_heads=2, intermediate_size=32)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.explode:
            raise RuntimeError("layer exploded")
        return out


def ordered_model(num_layers: int = 6, block=None) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The model to offload, an unoffloaded deep copy, and an input."""
    torch.manual_seed(0)
    model = Ordered(num_layers, block).eval()
    reference = copy.deepcopy(model)
    inputs = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    return model, reference, inputs


def slot_pointers(handle) -> set[int]:
    slots = [slot for entry in handle._installed.pool.slots for slot in entry]
    return {tensor.data_ptr() for slot in slots for tensor in slot.tensors}


# --------------------------------------------------------------------------------------------
# Outputs: the embedded decoder under many layouts
# --------------------------------------------------------------------------------------------

# (group, num_in_group, step) on 6 layers, with the offloaded layers they give.
LAYOUTS = {
    "every_other_layer": (2, 1, 1),  # 1 3 5
    "every_other_step_2": (2, 1, 2),  # 1 3 5: step does not divide 3 offloaded layers
    "num_in_group_equals_group": (3, 3, 2),  # all six
    "all_layers_step_4": (1, 1, 4),  # all six: step does not divide 6
    "last_two_of_three_step_3": (3, 2, 3),  # 1 2 4 5: step does not divide 4
    "one_offloaded_layer_step_4": (4, 1, 4),  # 3 only: step > offloaded layers
    "three_offloaded_step_5": (2, 1, 5),  # step > offloaded layers
    "pool_fits_all_step_6": (1, 1, 6),
}


@pytest.mark.parametrize(("group", "k", "step"), list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_decoder_outputs_are_bit_identical_over_repeated_forwards(
    group, k, step, grad_enabled, run_on
):
    model = small_decoder()
    ids = token_ids()
    with torch.set_grad_enabled(grad_enabled):
        expected = model(ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OffloadPlanWarning)  # e.g. "pool holds all"
            handle = apply_offload(model, prefetch(group, k, step))
        for _ in range(4):
            assert torch.equal(model(ids), expected)
    stats = handle.stats
    assert stats.forwards == 4
    assert stats.stalls == 0
    handle.remove()


def test_offload_params_filter_keeps_outputs_identical(run_on):
    model = small_decoder()
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, prefetch(2, 1, 2, params=["mlp", "self_attn.q_proj"])) as handle:
        names = {p.name.split(".", 2)[2] for p in handle.plan.params}
        assert names == {
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "self_attn.q_proj.weight",
        }
        for _ in range(3):
            assert torch.equal(model(ids), expected)
        assert handle.stats.stalls == 0


def test_two_layer_stacks_keep_outputs_identical(run_on):
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"encoder": Ordered(4).layers, "decoder": Ordered(4).layers, "head": nn.Linear(HIDDEN, 3)}
    ).eval()

    def run(x):
        for layer in [*model["encoder"], *model["decoder"]]:
            x = layer(x)
        return model["head"](x)

    x = torch.randn(2, 5, HIDDEN)
    expected = run(x)
    config = prefetch(2, 1, 1, layers=["encoder", "decoder"])
    with apply_offload(model, config) as handle:
        assert [s.offloaded_layers for s in handle.plan.stacks] == [(1, 3), (1, 3)]
        with torch.no_grad():  # the layers are called directly: see the recorded-forward test
            for _ in range(3):
                assert torch.equal(run(x), expected)
        assert handle.stats.stalls == 0


def test_bfloat16_decoder_outputs_are_bit_identical(run_on):
    model = small_decoder(dtype=torch.bfloat16)
    ids = token_ids()
    expected = model(ids)
    with apply_offload(model, prefetch(2, 1, 1)):
        for _ in range(3):
            assert torch.equal(model(ids), expected)


# --------------------------------------------------------------------------------------------
# Out-of-order execution: never another layer's weights
# --------------------------------------------------------------------------------------------

ORDERS = {
    "in_order": ([0, 1, 2, 3, 4, 5], False),
    "layers_skipped": ([0, 2, 4], True),
    "layer_called_twice_in_a_row": ([0, 1, 1, 2, 3, 4, 5], True),
    "reverse_order": ([5, 4, 3, 2, 1, 0], True),
    "random_permutation": (torch.randperm(6, generator=torch.Generator().manual_seed(3)), True),
    "repeats_and_gaps": ([3, 3, 0, 5, 0, 2, 2, 2], True),
}


@pytest.mark.parametrize(("order", "must_stall"), list(ORDERS.values()), ids=list(ORDERS))
def test_out_of_order_layers_compute_with_their_own_weights(order, must_stall, run_on):
    order = [int(i) for i in order]
    model, reference, x = ordered_model()
    with apply_offload(model, prefetch(1, 1, 1)) as handle:  # all 6 layers share one slot set
        for _ in range(3):
            assert torch.equal(model(x, order), reference(x, order))
        stalls = handle.stats.stalls
    assert (stalls > 0) == must_stall


@pytest.mark.parametrize(("order", "must_stall"), list(ORDERS.values()), ids=list(ORDERS))
def test_out_of_order_with_step_2_computes_with_own_weights(order, must_stall, run_on):
    order = [int(i) for i in order]
    model, reference, x = ordered_model()
    with apply_offload(model, prefetch(1, 1, 2)) as handle:
        for _ in range(3):
            assert torch.equal(model(x, order), reference(x, order))
        if not must_stall:
            assert handle.stats.stalls == 0


@pytest.mark.parametrize("order", [o for o, _ in ORDERS.values()], ids=list(ORDERS))
def test_a_pool_holding_every_offloaded_layer_never_stalls(order, run_on):
    order = [int(i) for i in order]
    model, reference, x = ordered_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OffloadPlanWarning)
        handle = apply_offload(model, prefetch(2, 1, 3))  # layers 1 3 5, three slots each
    for _ in range(3):
        assert torch.equal(model(x, order), reference(x, order))
    assert handle.stats.stalls == 0
    assert handle.stats.h2d_bytes == 0
    handle.remove()


def test_alternating_orders_between_forwards_stay_correct(run_on):
    model, reference, x = ordered_model()
    orders = [[0, 1, 2, 3, 4, 5], [5, 3, 1], [2, 2, 4, 0], [0, 1, 2, 3, 4, 5], [1, 0]]
    with apply_offload(model, prefetch(2, 1, 1)):
        for order in orders * 2:
            assert torch.equal(model(x, order), reference(x, order))


def test_forward_that_raises_halfway_leaves_the_next_forward_correct(run_on):
    model, reference, x = ordered_model(block=Exploding)
    order = list(range(6))
    expected = reference(x, order)
    with apply_offload(model, prefetch(1, 1, 1)) as handle:
        assert torch.equal(model(x, order), expected)
        model.layers[3].explode = True
        with pytest.raises(RuntimeError, match="layer exploded"):
            model(x, order)
        model.layers[3].explode = False
        assert torch.equal(model(x, order), expected)
        stalls = handle.stats.stalls
        # One full in-order forward restores the wrap-around prefetch: no stall after it.
        for _ in range(2):
            assert torch.equal(model(x, order), expected)
        assert handle.stats.stalls == stalls


def test_state_dict_after_a_raising_forward_holds_the_true_weights(run_on):
    model, reference, x = ordered_model(block=Exploding)
    with apply_offload(model, prefetch(1, 1, 2)):
        model.layers[2].explode = True
        with pytest.raises(RuntimeError):
            model(x, [0, 1, 2, 3])
        model.layers[2].explode = False
        state = model.state_dict()
    expected = reference.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_shared_layer_instance_called_twice_keeps_its_weights(run_on):
    torch.manual_seed(0)
    blocks = [DecoderBlock(HIDDEN, num_heads=2, intermediate_size=32) for _ in range(4)]
    model = Ordered(0)
    model.layers = nn.ModuleList([blocks[0], blocks[1], blocks[0], blocks[2], blocks[3]])
    reference = copy.deepcopy(model)
    x = torch.randn(2, 5, HIDDEN)
    order = [0, 1, 2, 3, 4]
    handle = apply_offload(model, prefetch(1, 1, 1))
    # The shared block is registered twice in the stack, so it is not one layer's: it stays.
    offloaded = {p.name.split(".")[1] for p in handle.plan.params}
    assert offloaded == {"1", "3", "4"}
    assert any("not inside one layer" in note for note in handle.plan.notes)
    for _ in range(3):
        assert torch.equal(model(x, order), reference(x, order))
    handle.remove()


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict redirection
# --------------------------------------------------------------------------------------------


def test_loading_one_layer_does_not_corrupt_the_layer_holding_its_slot(run_on):
    model, reference, x = ordered_model()
    order = list(range(6))
    torch.manual_seed(5)
    new_layer = DecoderBlock(HIDDEN, num_heads=2, intermediate_size=32)
    partial = {f"layers.3.{k}": v for k, v in new_layer.state_dict().items()}
    reference.load_state_dict(partial, strict=False)
    with apply_offload(model, prefetch(1, 1, 1)) as handle:
        # Not recorded: a recorded forward holds the wrap-around back for backward.
        with torch.no_grad():
            model(x, order)
        ring = handle._installed.rings[0]
        assert ring.holds(ring.layers[0])  # the slots layer 3 also uses hold layer 0
        model.load_state_dict(partial, strict=False)
        for _ in range(2):
            assert torch.equal(model(x, order), reference(x, order))
        assert torch.equal(
            model.state_dict()["layers.3.mlp.up_proj.weight"],
            partial["layers.3.mlp.up_proj.weight"],
        )


def test_state_dict_with_keep_vars_holds_the_true_weights(run_on):
    model, reference, x = ordered_model()
    with apply_offload(model, prefetch(1, 1, 1)):
        model(x, list(range(6)))
        state = model.state_dict(keep_vars=True)
        expected = reference.state_dict()
        assert all(torch.equal(state[k].detach(), expected[k]) for k in expected)


def test_backward_gradients_equal_the_unoffloaded_models(run_on):
    model, reference, x = ordered_model()
    order = list(range(6))
    model.train()
    reference.train()
    reference(x, order).square().sum().backward()
    with apply_offload(model, prefetch(1, 1, 1)):
        model(x, order).square().sum().backward()
        for (name, p), (_, q) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert torch.equal(p.grad, q.grad), name


def test_optimizer_steps_update_what_the_next_forward_uses(run_on):
    model, reference, x = ordered_model()
    order = list(range(6))
    with apply_offload(model, prefetch(2, 1, 1)):
        for m in (model, reference):
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.5)  # the same step for both, whatever backward does
            torch.optim.SGD(m.parameters(), lr=0.1).step()
        for _ in range(2):
            assert torch.equal(model(x, order), reference(x, order))


# --------------------------------------------------------------------------------------------
# Mechanics observable on CPU: slots, counters, sizes
# --------------------------------------------------------------------------------------------


def test_offloaded_parameters_point_into_pool_slots_for_the_whole_offload():
    model = small_decoder()
    ids = token_ids()
    with apply_offload(model, prefetch(1, 1, 2)) as handle:
        params = dict(model.named_parameters())
        slots = slot_pointers(handle)
        assert len(slots) == len(handle._installed.pool.slots) * 2
        before = {p.name: params[p.name].data_ptr() for p in handle.plan.params}
        assert set(before.values()) == slots
        model(ids)
        model(ids)
        assert {p.name: params[p.name].data_ptr() for p in handle.plan.params} == before


@pytest.mark.parametrize("name", ["mlp.down_proj.weight", "self_attn.q_proj.weight"])
def test_layers_step_apart_share_a_slot_and_neighbours_do_not(name):
    model = small_decoder()
    with apply_offload(model, prefetch(1, 1, 2)):
        ptr = [model.get_parameter(f"layers.{i}.{name}").data_ptr() for i in range(6)]
    assert ptr[0] == ptr[2] == ptr[4]
    assert ptr[1] == ptr[3] == ptr[5]
    assert ptr[0] != ptr[1]


def test_parameters_excluded_by_offload_params_keep_their_own_storage():
    model = small_decoder()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    with apply_offload(model, prefetch(2, 1, 1, params=["mlp"])) as handle:
        offloaded = set(handle.plan.offloaded_params)
        assert offloaded
        assert all(".mlp." in n for n in offloaded)
        slots = slot_pointers(handle)
        for name, param in model.named_parameters():
            if name in offloaded:
                assert param.data_ptr() in slots, name
            else:
                assert param.data_ptr() == before[name], name
                assert param.data_ptr() not in slots, name


def test_buffers_are_untouched():
    model = small_decoder()
    model.layers[3].register_buffer("scale", torch.rand(32))
    buffers = {n: (b, b.data_ptr(), b.clone()) for n, b in model.named_buffers()}
    assert buffers
    ids = token_ids()
    with apply_offload(model, prefetch(2, 1, 1)) as handle:
        assert not any(".scale" in n for n in handle.plan.offloaded_params)
        model(ids)
        for name, b in model.named_buffers():
            buf, ptr, value = buffers[name]
            assert b is buf
            assert b.data_ptr() == ptr
            assert torch.equal(b, value)


# Layouts where every slot is shared by two or more offloaded layers (n >= 2 * step).
@pytest.mark.parametrize(
    ("group", "k", "step"), [(1, 1, 1), (1, 1, 3), (2, 1, 1), (3, 2, 1), (3, 2, 2)], ids=str
)
def test_in_order_forwards_load_each_offloaded_layer_once(group, k, step):
    model = small_decoder()
    ids = token_ids()
    with apply_offload(model, prefetch(group, k, step)) as handle:
        n_offloaded = len(handle.plan.stacks[0].offloaded_layers)
        assert n_offloaded >= 2 * step
        stats = handle.stats
        assert (stats.forwards, stats.h2d_bytes, stats.loads) == (0, 0, 0)
        assert stats.h2d_bytes_per_forward is None
        for forwards in range(1, 4):
            with torch.no_grad():
                model(ids)
            stats = handle.stats
            assert stats.forwards == forwards
            assert stats.h2d_bytes_per_forward == handle.plan.offloaded_bytes
            assert stats.loads == forwards * n_offloaded
            assert stats.stalls == 0


def test_a_layer_alone_in_its_slots_is_loaded_once_and_never_again():
    model = small_decoder()
    ids = token_ids()
    # Layers 1 3 5 offloaded, step 2: layers 1 and 5 take turns in slot 0, layer 3 owns slot 1.
    with apply_offload(model, prefetch(2, 1, 2)) as handle:
        alone = sum(p.nbytes for p in handle.plan.params if p.layer == 3)
        assert {p.slot for p in handle.plan.params if p.layer == 3} == {1}
        for forwards in range(1, 4):
            with torch.no_grad():
                model(ids)
            stats = handle.stats
            assert stats.h2d_bytes == forwards * (handle.plan.offloaded_bytes - alone)
            assert stats.loads == 2 * forwards
            assert stats.stalls == 0


@pytest.mark.parametrize("step", [1, 2])
def test_a_recorded_forward_keeps_the_last_layers_for_backward(step):
    model = small_decoder()
    ids = token_ids()
    with apply_offload(model, prefetch(1, 1, step)) as handle:
        ring = handle._installed.rings[0]
        n = len(ring.layers)
        loss = model(ids).logsumexp(-1).mean()
        # The wrap-around copies of the first layers are held back: backward starts at the end.
        assert [ring.holds(layer) for layer in ring.layers[-step:]] == [True] * step
        assert handle.stats.loads == n - step
        loss.backward()
        # Backward walked back and loaded the others: the next forward starts without a stall.
        assert handle.stats.loads == 2 * (n - step)
        assert [ring.holds(layer) for layer in ring.layers[:step]] == [True] * step
        model(ids)
        # A recorded forward with no backward: the next forward of the model loads the held
        # back layers as it starts, before any layer runs.
        model(ids)
        assert handle.stats.stalls == 0


def test_stalls_count_the_on_demand_loads():
    model, _, x = ordered_model()
    with apply_offload(model, prefetch(1, 1, 1)) as handle:
        model(x, [5])  # layer 0 was preloaded: layer 5 loads on demand
        assert handle.stats.stalls == 1
        model(x, [0, 1, 2])  # after layer 5 the ring prefetched layer 0, then 1, then 2
        assert handle.stats.stalls == 1
        model(x, [4])  # the slots hold layer 3: layer 4 loads on demand
        assert handle.stats.stalls == 2
        model(x, [4])  # after layer 4 the ring prefetched layer 5 into the same slots
        assert handle.stats.stalls == 3


@pytest.mark.parametrize(("group", "k", "step"), [(1, 1, 1), (2, 1, 2), (3, 2, 2)], ids=str)
def test_sizes_in_stats_match_the_plan(group, k, step):
    model = small_decoder()
    with apply_offload(model, prefetch(group, k, step)) as handle:
        plan, stats = handle.plan, handle.stats
        n_params = len(plan.params)
        assert stats.backend == "prefetch"
        assert stats.offloaded_bytes == plan.offloaded_bytes
        assert stats.pool_bytes == plan.pool_bytes > 0
        assert stats.device_bytes_saved == plan.device_bytes_saved
        assert stats.measured is False
        assert plan.offloaded_bytes <= stats.host_bytes
        assert stats.host_bytes <= plan.offloaded_bytes + ALIGNMENT * n_params
        assert stats.host_bytes_pinned == 0
    assert handle.stats.pool_bytes == 0


@pytest.mark.filterwarnings(  # one layer, offloaded into one slot: nothing is saved
    "ignore:the plan saves 0 B:hydra_offload.plan.OffloadPlanWarning"
)
def test_applying_to_a_model_with_a_single_layer_stack_by_path():
    model, reference, x = ordered_model(num_layers=1)
    with apply_offload(model, prefetch(1, 1, 1, layers="layers")) as handle:
        assert handle.plan.stacks[0].offloaded_layers == (0,)
        for order in ([0], [0, 0], []):
            assert torch.equal(model(x, order), reference(x, order))
        assert handle.stats.stalls == 0


# --------------------------------------------------------------------------------------------
# Training through offloaded layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "step", "accumulate"), [(1, 1, 1), (2, 2, 1), (2, 1, 3)])
def test_training_steps_give_the_parameters_of_the_unoffloaded_run(group, step, accumulate, run_on):
    model = small_decoder()
    reference = copy.deepcopy(model)
    ids = token_ids()
    for m in (model, reference):
        m.train()
    handle = apply_offload(model, prefetch(group, 1, step))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    for _ in range(4):
        for m, optimizer in zip((model, reference), optimizers, strict=True):
            for _ in range(accumulate):
                m(ids).logsumexp(-1).mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        assert torch.equal(model(ids), reference(ids))
    assert handle.stats.stalls == 0
    handle.remove()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_compiled_training_through_offloaded_layers_gives_the_same_gradients():
    model = small_decoder().train()
    reference = copy.deepcopy(model)
    ids = token_ids()
    reference(ids).logsumexp(-1).mean().backward()
    torch._dynamo.reset()
    with apply_offload(model, prefetch(1)):
        torch.compile(model, backend="aot_eager")(ids).logsumexp(-1).mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
    torch._dynamo.reset()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_steps_with_a_closure_update_the_offloaded_weights(optimizer_class, run_on):
    model = small_decoder().train()
    reference = copy.deepcopy(model)
    ids = token_ids()
    with apply_offload(model, prefetch(2)):
        for m in (model, reference):
            optimizer = optimizer_class(m.parameters(), lr=1e-2)

            def closure(m=m, optimizer=optimizer):
                optimizer.zero_grad()
                loss = m(ids).logsumexp(-1).mean()
                loss.backward()
                return loss

            for _ in range(3):
                optimizer.step(closure)
        assert torch.equal(model(ids), reference(ids))


def test_training_with_activation_checkpointed_layers_matches_the_unoffloaded_run(run_on):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = small_decoder()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            hidden = self.lm.embed_tokens(ids)
            for layer in self.lm.layers:
                hidden = checkpoint(layer, hidden, use_reentrant=False)
            return self.lm.lm_head(self.lm.norm(hidden))

    model = Checkpointed().train()
    reference = copy.deepcopy(model)
    ids = token_ids()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    with apply_offload(model, prefetch(2)):
        for _ in range(3):
            for m, optimizer in zip((model, reference), optimizers, strict=True):
                m(ids).logsumexp(-1).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        with torch.no_grad():
            assert torch.equal(model(ids), reference(ids))
