"""Training offloaded weights under data parallelism: gradients averaged over the processes,
the optimizer step split among the processes of a node (docs/spec.md §7.4).

The Lightning runs launch 2 DDP processes on the CPU (gloo) with
``tests/lightning_apps/ddp_train.py``; a few launches share every check. The partition's own
rules run in this process, in a process group of one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hydra_offload import OffloadError, apply_offload
from hydra_offload.runtime.partition import Partition, _deal, partition_problem

APP = Path(__file__).parent / "lightning_apps" / "ddp_train.py"
MIB = 2**20
TRAINABLE_BYTES = 128 * MIB  # ddp_train.py's offloaded layers in the memory runs
TOLERANCE = 1e-6


def launch(
    out: Path, *args: str, expect_ok: bool = True, accelerator: str = "cpu"
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TRAIN_ACCELERATOR": accelerator}
    result = subprocess.run(
        [sys.executable, str(APP), str(out), *args],
        cwd=APP.parent, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


# -- Lightning DDP, 2 processes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """128 MiB of trainable offloaded layers, AdamW, 3 steps: each option in its own launch,
    so that no run inherits what another left in the processes' memory."""
    out = tmp_path_factory.mktemp("ddp_train_memory")
    runs = {}
    for option in ("none", "prefetch", "uva"):
        output = launch(out, "memory", option)
        # The app turns the project's own deprecated calls into errors; and the gather of
        # the ranks' host-memory readings no longer goes through Lightning's deprecated one.
        assert "all_gather is deprecated" not in output.stdout + output.stderr
        runs[option] = [
            torch.load(out / f"memory-{option}-rank{r}.pt", weights_only=False) for r in (0, 1)
        ]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
def test_trained_offloaded_weights_equal_ddp_without_offload_with_one_copy_per_node(
    memory_runs, option
):
    plain, offloaded = memory_runs["none"], memory_runs[option]
    for without, with_ in zip(plain, offloaded, strict=True):
        assert max_difference(without["params"], with_["params"]) <= TOLERANCE
        # The trainable weights are one copy for the node too.
        assert with_["shared_by"] == 2
        assert with_["host_bytes_shared"] == with_["offloaded_bytes"] >= TRAINABLE_BYTES
    # Both processes hold the same weights (each node's copy takes the same steps).
    assert max_difference(offloaded[0]["params"], offloaded[1]["params"]) == 0
    node = [sum(rank["pss_max"] for rank in runs) for runs in (plain, offloaded)]
    saved = node[0] - node[1]
    assert saved >= TRAINABLE_BYTES, f"the node holds only {saved / MIB:.1f} MiB less"


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    """Every variant of ddp_train.py (a small model), with and without offload, in one
    launch."""
    out = tmp_path_factory.mktemp("ddp_train_variants")
    launch(out, "variants")
    return torch.load(out / "variants.pt", weights_only=False)


VARIANTS = {
    "plain": "AdamW, 3 steps",
    "accumulate": "2 micro-batches per step (gradients averaged at each, added by the owner)",
    "clip": "gradient clipping by norm: the norm of every process's partition together",
    "clip_value": "gradient clipping by value",
    "mixed": "16-mixed: found-inf agreed on by the processes, the loss scale alike",
    "mixed_inf": "16-mixed, an inf in one offloaded gradient (one owner sees it): all skip",
    "schedule": "a learning-rate schedule stepped every step",
    "slow": "rank 1 sleeps before each step: rank 0 never reads a half-stepped weight",
    "sgd": "SGD with momentum",
    "resume": "2 steps, a checkpoint, 2 more from it in a new Trainer",
}


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_as_ddp_without_offload(variants, variant, option):
    assert max_difference(variants[(variant, "none")], variants[(variant, option)]) <= TOLERANCE


@pytest.mark.slow
def test_the_variants_differ_from_each_other(variants):
    """Clipping clips, mixed precision changes the arithmetic: the equalities above compare
    runs that exercise what they name."""
    plain = variants[("plain", "none")]
    for variant in ("accumulate", "clip", "clip_value", "mixed", "schedule"):
        assert max_difference(plain, variants[(variant, "none")]) > 1e-4, variant
    skipped = variants[("mixed_inf", "none")]  # one step fewer
    assert max_difference(variants[("mixed", "none")], skipped) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
def test_a_checkpoint_holds_the_full_optimizer_state_as_without_offload(variants, option):
    plain = variants[("checkpoint", "none")]["optimizer_states"]
    offloaded = variants[("checkpoint", option)]["optimizer_states"]
    assert len(plain) == len(offloaded) == 1
    assert plain[0]["state"].keys() == offloaded[0]["state"].keys()
    assert len(plain[0]["state"]) == 14  # 6 layers and the head, weight and bias each
    for index, state in plain[0]["state"].items():
        for key, value in state.items():
            assert torch.allclose(value, offloaded[0]["state"][index][key], atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
def test_after_the_fit_every_process_holds_the_full_optimizer_state(variants, option):
    plain, offloaded = variants[("state", "none")], variants[("state", option)]
    for rank in (0, 1):
        assert offloaded[rank].keys() == plain[rank].keys()
        assert len(offloaded[rank]) == 14
        for index, state in plain[rank].items():
            for key, value in state.items():
                assert torch.allclose(value, offloaded[rank][index][key], atol=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
def test_an_offloaded_runs_checkpoint_resumes_without_offload(variants, option):
    difference = max_difference(variants[("resume", "none")], variants[("resume_plain", option)])
    assert difference <= TOLERANCE


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_others_and_leaves_the_checkpoint_intact(tmp_path):
    result = launch(tmp_path, "fail", expect_ok=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "rank 1 fails on purpose" in output
    checkpoint = torch.load(tmp_path / "fail.pt", weights_only=False)
    assert checkpoint["global_step"] == 1
    assert len(checkpoint["optimizer_states"][0]["state"]) == 14


# -- the partition's rules, in a process group of one -------------------------------------------


@pytest.fixture
def group_of_one():
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_owners_are_dealt_by_size_the_same_on_every_process():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 40, 30, 20)]
    owners = _deal(params, 2)
    assert [owners[id(p)] for p in params] == [0, 0, 1, 1]  # 40, 10 | 30, 20: 50 bytes each
    assert _deal(params, 2) == owners
    assert set(_deal(params, 1).values()) == {0}


def test_lbfgs_cannot_be_split_and_says_what_to_use():
    weight = nn.Parameter(torch.zeros(2))
    problem = partition_problem(torch.optim.LBFGS([weight]))
    assert problem is not None
    assert "LBFGS" in problem
    assert "AdamW" in problem
    assert partition_problem(torch.optim.SGD([weight], lr=0.1)) is None


def test_one_process_owns_everything_and_reduces_nothing():
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    partition = Partition(None, params)
    assert all(partition.owns(p) for p in params)
    grad = torch.full((3,), 2.0)
    assert partition.reduce(grad) is None
    assert grad.tolist() == [2.0, 2.0, 2.0]


CONFIGS = {
    "prefetch": {"prefetch": {"offload_group_size": 1}},
    "uva": {"uva": {"cpu_offload_gb": 1.0}},
}


def trainable_stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))


def train_with_and_without_offload(
    group: object, backend: str, device: str = "cpu", clip: float | None = None
) -> tuple[list[nn.Module], str | None]:
    """The same 3 AdamW steps without and with offload in ``group``; the two models, and
    the UVA backend's mode."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)).to(device)
    models, mode = [], None
    for offloaded in (False, True):
        model = trainable_stack().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        handle = apply_offload(model, CONFIGS[backend], process_group=group) if offloaded else None
        if handle is not None:
            assert handle.partition is not None
            assert handle.partition.world == 1
            mode = getattr(handle._installed, "mode", None)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            if clip is not None:
                clipping = (
                    torch.nn.utils.clip_grad_norm_ if handle is None else handle.clip_grad_norm_
                )
                assert float(clipping(model.parameters(), clip)) > clip  # it clips
            optimizer.step()
        if handle is not None:
            handle.gather_optimizer_state(optimizer)
            handle.remove()
        models.append(model)
    return models, mode


@pytest.mark.parametrize("backend", ["prefetch", "uva"])
def test_in_a_group_of_one_training_equals_training_without_offload(group_of_one, backend):
    (plain, offloaded), _ = train_with_and_without_offload(group_of_one, backend, clip=0.1)
    for a, b in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert torch.allclose(a, b, atol=TOLERANCE)


def test_an_optimizer_that_cannot_be_split_is_refused_at_its_first_step(group_of_one):
    model = trainable_stack()
    handle = apply_offload(model, CONFIGS["uva"], process_group=group_of_one)
    optimizer = torch.optim.LBFGS(model.parameters())

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.ones(2, 8)).sum()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OffloadError, match="LBFGS needs one view"):
        optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    handle.remove()


# -- CUDA: NCCL, the reductions on their own stream ---------------------------------------------


@pytest.fixture
def nccl_group_of_one():
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["prefetch", "uva"])
def test_cuda_training_in_an_nccl_group_matches_training_without_offload(
    nccl_group_of_one, backend
):
    """The NCCL path: each gradient reduced on the communicator's stream, the copy to host
    memory waiting for it on the gradient stream (not on the host); UVA trains in copy mode."""
    (plain, offloaded), mode = train_with_and_without_offload(nccl_group_of_one, backend, "cuda")
    assert mode == ("copy" if backend == "uva" else None)
    for a, b in zip(plain.parameters(), offloaded.parameters(), strict=True):
        assert a.is_cuda
        assert b.is_cuda
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_two_gpus_under_lightning_ddp_train_as_without_offload(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (one NCCL rank each)")
    runs = {}
    for option in ("none", "prefetch"):
        launch(tmp_path, "memory", option, accelerator="cuda")
        runs[option] = torch.load(tmp_path / f"memory-{option}-rank0.pt", weights_only=False)
    assert max_difference(runs["none"]["params"], runs["prefetch"]["params"]) <= 1e-5
