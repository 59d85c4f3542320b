"""The backend contract (hydra_offload/backends/base.py) and get_offload_handle.

Every backend implements OffloadBackendBase, and a backend missing any member cannot be
built; create_backend is the one place a backend is chosen from a plan; the handle reads the
backend only through the contract, so a broken member fails loudly instead of being replaced
by a default; get_offload_handle finds the active handle and forgets it on remove().
See docs/spec.md §6.1.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn

import hydra_offload
import hydra_offload.offload as offload_module
from hydra_offload import OffloadPlanWarning, apply_offload, get_offload_handle, plan_offload
from hydra_offload.backends import NoOffload, OffloadBackendBase, create_backend
from hydra_offload.backends.prefetch import PrefetchOffload
from hydra_offload.backends.uva import UVAOffload
from hydra_offload.models import DecoderLM
from hydra_offload.offload import OffloadHandle
from hydra_offload.runtime import DeviceRuntime
from hydra_offload.runtime.counters import Counters

CONTRACT = {"staged", "hooks", "host_bytes", "host_bytes_pinned", "remove"}
"""What every backend must implement."""
DEFAULTS = {"pool_bytes": 0, "wait_ms": None}
"""What the base provides (and forward_started, which does nothing)."""

# (config, keyword arguments of apply_offload / create_backend, the backend it installs)
BACKENDS = {
    "none": ({}, {}, NoOffload),
    "uva_host": ({"uva": {"cpu_offload_gb": 1.0}}, {}, UVAOffload),
    "uva_copy": ({"uva": {"cpu_offload_gb": 1.0}}, {"zero_copy": False}, UVAOffload),
    "prefetch": ({"prefetch": {"offload_group_size": 2}}, {}, PrefetchOffload),
}


def small_decoder(seed: int = 0) -> tuple[DecoderLM, torch.Tensor]:
    torch.manual_seed(seed)
    sizes = {"vocab_size": 64, "hidden_size": 32, "num_layers": 4, "num_heads": 4}
    model = DecoderLM(**sizes, intermediate_size=64).eval()
    return model, torch.randint(0, 64, (2, 7))


def cpu_runtime() -> DeviceRuntime:
    return DeviceRuntime(torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------


def test_the_contract_declares_exactly_what_the_handle_uses():
    assert set(OffloadBackendBase.__abstractmethods__) == CONTRACT
    with pytest.raises(TypeError, match="abstract"):
        OffloadBackendBase()  # type: ignore[abstract]


def test_the_base_gives_the_optional_members_one_default():
    backend = type("Minimal", (OffloadBackendBase,), dict.fromkeys(CONTRACT))()
    assert {name: getattr(backend, name) for name in DEFAULTS} == DEFAULTS
    assert backend.forward_started() is None
    # Only the prefetch backend has a device pool and timing of its own.
    overriding = {
        backend: {name for name in (*DEFAULTS, "forward_started") if name in vars(backend)}
        for backend in (NoOffload, UVAOffload, PrefetchOffload)
    }
    assert overriding == {
        NoOffload: set(),
        UVAOffload: set(),
        PrefetchOffload: {"pool_bytes", "wait_ms", "forward_started"},
    }


@pytest.mark.parametrize("backend", [NoOffload, UVAOffload, PrefetchOffload])
def test_every_backend_implements_the_whole_contract(backend):
    assert issubclass(backend, OffloadBackendBase)
    assert backend.__abstractmethods__ == frozenset()
    for member in CONTRACT:
        implementation = getattr(backend, member)
        assert not getattr(implementation, "__isabstractmethod__", False), member
        # Each member is the backend's own, not the abstract declaration.
        assert implementation is not getattr(OffloadBackendBase, member), member


FIGURES = {
    "staged": None,
    "hooks": (),
    "pool_bytes": 7,
    "host_bytes": 123,
    "host_bytes_pinned": 5,
    "wait_ms": 1.5,
}
"""What :class:`Complete` reports: figures a test can recognise."""


def figure(value: object) -> property:
    return property(lambda self: value)


class Complete(OffloadBackendBase):
    """A backend implementing every member, defaults included, with :data:`FIGURES`."""

    staged, hooks, pool_bytes, host_bytes, host_bytes_pinned, wait_ms = map(
        figure, FIGURES.values()
    )

    def __init__(self) -> None:
        self.forwards = 0
        self.removed_to: list[torch.device | None] = []

    def forward_started(self) -> None:
        self.forwards += 1

    def remove(self, device: torch.device | None = None) -> None:
        self.removed_to.append(device)


@pytest.mark.parametrize("missing", sorted(CONTRACT))
def test_a_backend_missing_one_member_cannot_be_instantiated(missing):
    own = {k: v for k, v in vars(Complete).items() if not k.startswith("__") or k == "__init__"}
    partial = type("Partial", (OffloadBackendBase,), {k: v for k, v in own.items() if k != missing})
    with pytest.raises(TypeError, match=missing):
        partial()
    # With that member back, the same members make a backend that can be built.
    whole = type("Whole", (OffloadBackendBase,), own)()
    assert whole.host_bytes == 123


def test_no_offload_holds_nothing_and_does_nothing():
    backend = NoOffload()
    assert backend.staged is None
    assert list(backend.hooks) == []
    assert (backend.pool_bytes, backend.host_bytes, backend.host_bytes_pinned) == (0, 0, 0)
    assert backend.wait_ms is None
    assert backend.forward_started() is None
    assert backend.remove(torch.device("cpu")) is None


def test_the_no_backend_stand_in_is_gone():
    assert not hasattr(offload_module, "_Nothing")
    assert not hasattr(offload_module, "_install")


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
def test_create_backend_installs_the_backend_the_plan_names(name):
    config, kwargs, expected_type = BACKENDS[name]
    model, inputs = small_decoder()
    expected = model(inputs)
    before = {n: (p, p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    plan = plan_offload(model, config)
    counters = Counters()
    backend = create_backend(model, plan, cpu_runtime(), counters, **kwargs)
    assert type(backend) is expected_type
    assert torch.equal(model(inputs), expected)
    if expected_type is NoOffload:
        assert plan.backend == "none"
        # Nothing moved: every parameter still has its own storage.
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == {
            n: ptr for n, (_, _, ptr) in before.items()
        }
        assert backend.host_bytes == 0
    else:
        assert plan.backend in name
        assert [e.name for e in backend.staged.params] == list(plan.offloaded_params)
        assert backend.host_bytes >= plan.offloaded_bytes > 0
        assert len(backend.hooks) > 0 or name == "uva_host"
        if expected_type is PrefetchOffload:
            assert backend.pool_bytes > 0
            assert counters.forwards == 0
            assert counters.loads > 0
        else:
            assert backend.pool_bytes == 0
            assert backend.mode == ("copy" if kwargs.get("zero_copy") is False else "host")
    backend.remove()
    for n, param in model.named_parameters():
        assert param is before[n][0], n
        assert torch.equal(param, before[n][1]), n
    assert list(backend.hooks) == []


def test_create_backend_gives_no_offload_for_an_empty_selection():
    model, _ = small_decoder()
    config = {"uva": {"cpu_offload_gb": 1.0, "cpu_offload_params": ["nope"]}}
    with pytest.warns(OffloadPlanWarning, match="matched no parameter"):
        plan = plan_offload(model, config)
    assert plan.backend == "uva"
    assert plan.params == ()
    assert type(create_backend(model, plan, cpu_runtime())) is NoOffload


def test_create_backend_refuses_an_unknown_backend():
    model, _ = small_decoder()
    plan = plan_offload(model, {"uva": {"cpu_offload_gb": 1.0}})
    bogus = dataclasses.replace(plan, backend="bogus")
    with pytest.raises(ValueError, match="bogus"):
        create_backend(model, bogus, cpu_runtime())


@pytest.mark.parametrize("name", list(BACKENDS))
def test_apply_offload_installs_through_the_factory(monkeypatch, name):
    config, kwargs, expected_type = BACKENDS[name]
    calls = []

    def spy(*args, **kw):
        backend = create_backend(*args, **kw)
        calls.append(backend)
        return backend

    monkeypatch.setattr(offload_module, "create_backend", spy)
    model, inputs = small_decoder()
    with apply_offload(model, config, **kwargs) as handle:
        assert len(calls) == 1
        assert handle._installed is calls[0]
        assert type(calls[0]) is expected_type
        model(inputs)
    assert not handle.active


# --------------------------------------------------------------------------------------------
# The handle talks to the contract only
# --------------------------------------------------------------------------------------------


def handle_over(backend: OffloadBackendBase) -> tuple[OffloadHandle, nn.Module, torch.Tensor]:
    model, inputs = small_decoder()
    plan = plan_offload(model, {})
    return OffloadHandle(model, plan, cpu_runtime(), backend, Counters(), None), model, inputs


def test_the_handle_reports_the_backend_figures_and_calls_its_members():
    backend = Complete()
    handle, model, inputs = handle_over(backend)
    model(inputs)
    model(inputs)
    assert backend.forwards == 2
    stats = handle.stats
    assert (stats.pool_bytes, stats.host_bytes, stats.host_bytes_pinned) == (7, 123, 5)
    assert stats.wait_ms == 1.5
    assert stats.forwards == 2
    handle.remove("cpu")
    assert backend.removed_to == [torch.device("cpu")]
    handle.remove()  # a second call does nothing
    assert backend.removed_to == [torch.device("cpu")]
    after = handle.stats
    assert (after.pool_bytes, after.host_bytes, after.host_bytes_pinned) == (0, 0, 0)
    assert after.wait_ms is None
    model(inputs)
    assert backend.forwards == 2  # no hook of the handle is left


@pytest.mark.parametrize("member", ["wait_ms", "host_bytes", "host_bytes_pinned", "pool_bytes"])
def test_a_broken_member_fails_loudly_instead_of_falling_back(member):
    # A probing handle (getattr with a default) would report 0 / None here.
    def broken(self):
        raise AttributeError(f"{member} is broken")

    Broken = type("Broken", (Complete,), {member: property(broken)})
    handle, _, _ = handle_over(Broken())
    with pytest.raises(AttributeError, match=f"{member} is broken"):
        handle.stats  # noqa: B018


def test_a_broken_forward_started_fails_the_forward():
    class Broken(Complete):
        def forward_started(self) -> None:
            raise AttributeError("forward_started is broken")

    handle, model, inputs = handle_over(Broken())
    with pytest.raises(AttributeError, match="forward_started is broken"):
        model(inputs)
    handle.remove()


def test_the_handle_refuses_a_backend_outside_the_contract():
    class DuckTyped:  # what the handle used to accept: the old stand-in for "no backend"
        pool_bytes = 0
        staged = None
        hooks = ()

        def remove(self, device=None):
            return None

    model, _ = small_decoder()
    plan = plan_offload(model, {})
    with pytest.raises(TypeError, match="OffloadBackendBase"):
        OffloadHandle(model, plan, cpu_runtime(), DuckTyped(), Counters(), None)  # type: ignore
    assert get_offload_handle(model) is None


# --------------------------------------------------------------------------------------------
# get_offload_handle
# --------------------------------------------------------------------------------------------


def test_get_offload_handle_is_public():
    assert "get_offload_handle" in hydra_offload.__all__
    assert hydra_offload.get_offload_handle is offload_module.get_offload_handle


def test_a_model_never_offloaded_has_no_handle():
    model, _ = small_decoder()
    assert get_offload_handle(model) is None
    assert get_offload_handle(model.layers[0]) is None


@pytest.mark.parametrize("name", list(BACKENDS))
def test_get_offload_handle_while_applied_and_after_remove(name):
    config, kwargs, _ = BACKENDS[name]
    model, inputs = small_decoder()
    other, _ = small_decoder(seed=1)
    handle = apply_offload(model, config, **kwargs)
    assert get_offload_handle(model) is handle
    assert get_offload_handle(model.layers[2]) is handle  # a module inside the model
    assert get_offload_handle(other) is None  # another model is not affected
    model(inputs)
    assert get_offload_handle(model).stats.forwards == 1
    handle.remove()
    assert get_offload_handle(model) is None
    assert get_offload_handle(model.layers[2]) is None
    again = apply_offload(model, config, **kwargs)
    assert get_offload_handle(model) is again is not handle
    again.remove()
    assert get_offload_handle(model) is None


def test_get_offload_handle_follows_the_context_manager_and_a_submodule_offload():
    model, inputs = small_decoder()
    with apply_offload(model.layers, {"uva": {"cpu_offload_gb": 1.0}}) as handle:
        assert get_offload_handle(model.layers) is handle
        assert get_offload_handle(model.layers[0]) is handle
        assert get_offload_handle(model) is None  # the offload is on a part of it
        model(inputs)
    assert get_offload_handle(model.layers) is None


def test_get_offload_handle_does_not_keep_a_model_alive():
    import gc
    import weakref

    model, _ = small_decoder()
    handle = apply_offload(model, {"uva": {"cpu_offload_gb": 1.0}})
    assert get_offload_handle(model) is handle
    copy = pickle.loads(pickle.dumps(model))  # a plain model: not offloaded
    assert get_offload_handle(copy) is None
    handle.remove()
    ref = weakref.ref(model)
    del model, copy
    gc.collect()
    assert ref() is None
