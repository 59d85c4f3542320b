"""schedule.py: the prefetch ring schedule, computed once from the plan.

Its rules on small stacks (which offloaded layer loads into which slots after which, forward
and backward, wrap-around, preload), the plan's schedule against the one the simulator builds
for a hypothetical setting, and the runtime ring and the simulator reading the very same
object.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from hydra_offload import OffloadConfig, apply_offload, plan_offload
from hydra_offload import schedule as schedule_module
from hydra_offload.schedule import RingSchedule, ring_schedule, schedules_of, slots_by_step

# Tiny models on purpose: their plans save under 5% of the parameter bytes and warn.
pytestmark = pytest.mark.filterwarnings(
    "ignore::hydra_offload.plan.OffloadPlanWarning",
)


class Stack(nn.Module):
    """One stack of linear layers; ``widths`` are their output sizes, ``bias`` whether each
    has a bias (a second pool entry)."""

    def __init__(self, widths: list[int], bias: list[bool] | None = None) -> None:
        super().__init__()
        bias = bias or [False] * len(widths)
        self.layers = nn.ModuleList(
            nn.Linear(4, w, bias=b) for w, b in zip(widths, bias, strict=True)
        )


def stack(widths: list[int], bias: list[bool] | None = None, device: str = "meta") -> Stack:
    with torch.device(device):
        return Stack(widths, bias)


def prefetch(group: int, k: int = 1, step: int = 1) -> OffloadConfig:
    names = ("offload_group_size", "offload_num_in_group", "offload_prefetch_step")
    return OffloadConfig(prefetch=dict(zip(names, (group, k, step), strict=True)))


def uniform(num_layers: int, offloaded: list[int], step: int) -> RingSchedule:
    """Layers with one pool entry each, as a plan of identical layers gives."""
    keys = [["w"]] * len(offloaded)
    return ring_schedule(num_layers, offloaded, slots_by_step(keys, step), [64] * len(offloaded))


def schedule_of(widths: list[int], config: OffloadConfig, bias=None) -> RingSchedule:
    (result,) = schedules_of(plan_offload(stack(widths, bias), config))
    return result


def without_slot_names(s: RingSchedule) -> tuple:
    """Everything but the slots' identities (the plan numbers an entry's slots compactly,
    ``slots_by_step`` by ``j % step``: the same slots under other names)."""
    return (s.num_layers, s.layers, s.position, s.copy_bytes, s.groups, s.group_users,
            s.next_users, s.prev_users, s.preload)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The rules on small stacks
# --------------------------------------------------------------------------------------------


def test_every_layer_offloaded_step_2_hands_each_slot_on_two_layers_later():
    s = uniform(8, list(range(8)), 2)
    assert s.layers == tuple(range(8))
    assert s.position == tuple(range(8))
    assert s.slots == tuple((("w", j % 2),) for j in range(8))
    assert s.group_users == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert s.groups == ((0,), (1,)) * 4
    assert s.next_users == ((2,), (3,), (4,), (5,), (6,), (7,), (0,), (1,))  # 6 -> 0 wraps
    assert s.prev_users == ((6,), (7,), (0,), (1,), (2,), (3,), (4,), (5,))  # 0 -> 6 wraps
    assert s.preload == (0, 1)
    assert s.num_groups == 2


def test_every_other_layer_offloaded_step_1_shares_one_slot_around_the_ring():
    s = uniform(8, [1, 3, 5, 7], 1)
    assert s.position == (-1, 0, -1, 1, -1, 2, -1, 3)
    assert s.group_users == ((0, 1, 2, 3),)
    assert s.next_users == ((1,), (2,), (3,), (0,))
    assert s.prev_users == ((3,), (0,), (1,), (2,))
    assert s.preload == (0,)


def test_two_of_each_group_of_four_step_2():
    s = schedule_of([4] * 8, prefetch(4, 2, 2))
    assert s.layers == (2, 3, 6, 7)
    assert s.position == (-1, -1, 0, 1, -1, -1, 2, 3)
    assert s.next_users == ((2,), (3,), (0,), (1,))
    assert s.prev_users == ((2,), (3,), (0,), (1,))
    assert s.preload == (0, 1)
    assert s.copy_bytes == (64,) * 4


def test_a_step_that_does_not_divide_the_ring_wraps_unevenly():
    s = uniform(8, list(range(8)), 3)
    assert s.group_users == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert s.next_users == ((3,), (4,), (5,), (6,), (7,), (2,), (0,), (1,))
    assert s.prev_users == ((6,), (7,), (5,), (0,), (1,), (2,), (3,), (4,))
    assert s.preload == (0, 1, 2)


def test_a_step_as_long_as_the_ring_leaves_every_layer_alone_in_its_slots():
    s = uniform(8, [1, 3, 5, 7], 4)
    assert s.next_users == s.prev_users == ((), (), (), ())
    assert s.preload == (0, 1, 2, 3)
    assert s.group_users == ((0,), (1,), (2,), (3,))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("step", [1, 2, 3, 8])
def test_uniform_layers_follow_the_j_plus_step_rule(n, step):
    """Next user of ``j``: ``j + step``, past the end the first layer of the same slot
    position; previous user: ``j - step``, before the start the last one; nobody when ``j``
    is alone in its slots. Preloaded: the first ``min(step, n)``."""
    s = uniform(n, list(range(n)), step)
    for j in range(n):
        nxt = j + step if j + step < n else j % step
        prev = j - step if j >= step else max(p for p in range(n) if p % step == j % step)
        assert s.next_users[j] == (() if nxt == j else (nxt,))
        assert s.prev_users[j] == (() if prev == j else (prev,))
    assert s.preload == tuple(range(min(step, n)))


def test_layers_of_two_kinds_each_have_their_own_slots():
    # Widths 4 and 8 alternate: two pool entries, each shared by every other offloaded layer.
    s = schedule_of([4, 8] * 4, prefetch(1, 1, 1))
    assert s.group_users == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert s.next_users == ((2,), (3,), (4,), (5,), (6,), (7,), (0,), (1,))
    assert s.preload == (0, 1)
    assert s.copy_bytes == (64, 128) * 4


def test_a_layer_with_more_entries_hands_its_slots_to_several_layers_in_slot_order():
    # Every layer has a weight; the even ones a bias too. Step 3: the weights' slot 0 goes
    # 0 -> 3 -> 6 -> 0, the biases' slot 0 goes 0 -> 6 -> 0 (positions 2, 4: alone).
    s = schedule_of([4] * 8, prefetch(1, 1, 3), bias=[True, False] * 4)
    assert s.next_users[0] == (3, 6)  # the weight's slot first, as the copy goes
    assert s.next_users[3] == (6,)
    assert s.next_users[6] == (0,)  # both entries wrap around to the same layer
    assert s.prev_users[0] == (6,)
    assert s.prev_users[6] == (3, 0)
    assert s.groups[0] == (0, 1)  # weight and bias slots: different users, two groups
    assert s.preload == (0, 1, 2)


def test_slots_with_the_same_users_merge_into_one_group():
    s = ring_schedule(4, [0, 2], [["a", "b"], ["a", "b"]])
    assert s.groups == ((0,), (0,))
    assert s.num_groups == 1
    assert s.copy_bytes == (0, 0)


def test_a_layer_whose_slots_are_partly_taken_is_not_preloaded():
    s = ring_schedule(3, [0, 1, 2], [["a", "b"], ["a"], ["b"]])
    assert s.group_users == ((0, 1), (0, 2))
    assert s.next_users == ((1, 2), (0,), (0,))
    assert s.prev_users == ((1, 2), (0,), (0,))
    assert s.preload == (0,)


def test_an_empty_ring():
    s = ring_schedule(4, [], [])
    assert s.position == (-1,) * 4
    assert s.next_users == s.preload == ()


@pytest.mark.parametrize(
    ("layers", "slots", "sizes", "message"),
    [
        ([0, 1], [["a"]], None, "one entry per offloaded layer"),
        ([0], [["a"]], [1, 2], "one entry per offloaded layer"),
        ([4], [["a"]], None, "outside the stack"),
        ([1, 1], [["a"], ["a"]], None, "repeated"),
    ],
)
def test_inconsistent_arguments_are_refused(layers, slots, sizes, message):
    with pytest.raises(ValueError, match=message):
        ring_schedule(4, layers, slots, sizes)


# --------------------------------------------------------------------------------------------
# One schedule for the plan, the simulator and the runtime
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "bias", "group", "k", "step"),
    [
        ([4] * 8, None, 2, 1, 2),
        ([4] * 7, None, 1, 1, 3),
        ([4, 8] * 4, None, 1, 1, 2),
        ([4, 8, 8, 4, 4, 8], None, 1, 1, 2),
        ([4] * 8, [True, False] * 4, 1, 1, 3),
        ([4] * 8, [True, True, False] * 2 + [False, True], 4, 3, 3),
    ],
)
def test_the_simulator_s_hypothetical_ring_is_the_plan_s(widths, bias, group, k, step):
    """``suggest_prefetch`` builds the schedule of each setting from one plan of every layer,
    without planning again: it is the one the plan of that setting gives."""
    from hydra_offload.tuning.search import _stacks_of_plan

    model = stack(widths, bias)
    (full,) = _stacks_of_plan(plan_offload(model, prefetch(1, 1, 1)))
    chosen = [layer for layer in full.layers if layer.index % group >= group - k]
    hypothetical = full.ring(chosen, step)
    (planned,) = schedules_of(plan_offload(model, prefetch(group, k, step)))
    assert without_slot_names(hypothetical) == without_slot_names(planned)


def test_the_plan_s_schedules_are_computed_once_per_plan():
    model = stack([4] * 8)
    plan = plan_offload(model, prefetch(2, 1, 2))
    first = schedules_of(plan)
    assert schedules_of(plan) is first
    other = plan_offload(model, prefetch(2, 1, 2))
    assert schedules_of(other) == first  # an equal plan: an equal schedule...
    assert schedules_of(other)[0] is not first[0]  # ...of its own
    key = id(plan)
    assert key in schedule_module._CACHE
    del plan, first
    gc.collect()
    assert key not in schedule_module._CACHE  # gone with its plan


@pytest.mark.parametrize(
    ("widths", "bias", "group", "k", "step"),
    [
        ([4] * 8, None, 1, 1, 3),
        ([4, 8] * 4, None, 1, 1, 2),
        ([4] * 8, [True, False] * 4, 1, 1, 3),
        ([4] * 8, None, 4, 2, 2),
    ],
)
def test_the_runtime_ring_and_the_simulator_read_the_same_schedule(
    monkeypatch, widths, bias, group, k, step
):
    from hydra_offload.tuning import simulate

    read: list[tuple[RingSchedule, ...]] = []

    def spy(plan):
        read.append(schedules_of(plan))
        return read[-1]

    monkeypatch.setattr(simulate, "schedules_of", spy)
    model = stack(widths, bias, device="cpu")
    with apply_offload(model, prefetch(group, k, step)) as handle:
        (ring,) = handle._installed.rings
        simulate.simulate_prefetch(handle.plan, layer_seconds=1e-3, bandwidth=1e9)
        (simulated,) = read[-1]
        assert ring.schedule is simulated
        schedule = ring.schedule
        layers = ring.layers
        # The runtime's ring is the schedule's: prefetch order, forward and backward...
        assert [[u.position for u in layer.next_users] for layer in layers] == [
            list(users) for users in schedule.next_users
        ]
        assert [[u.position for u in layer.prev_users] for layer in layers] == [
            list(users) for users in schedule.prev_users
        ]
        # ...its slot identities name the pool's slots one to one, in copy order...
        slot_of: dict = {}
        for layer, ids in zip(layers, schedule.slots, strict=True):
            for slot, sid in zip(layer.slots, ids, strict=True):
                assert slot_of.setdefault(sid, slot) is slot
        assert len({id(slot) for slot in slot_of.values()}) == len(slot_of)
        assert [layer.nbytes for layer in layers] == list(schedule.copy_bytes)
        # ...and the install filled the slots with the schedule's preload (a slot whose
        # users' other slots are all taken stays empty, as the simulator's does).
        owners = [slot.owner for layer in layers for slot in layer.slots]
        holders = {id(owner) for owner in owners if owner is not None}
        assert holders == {id(layers[p]) for p in schedule.preload}
        assert all(ring.holds(layers[p]) for p in schedule.preload)
