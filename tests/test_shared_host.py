"""One host copy per node: data-parallel processes that offload alike share the frozen
offloaded weights' host memory (``apply_offload(..., process_group=...)``), in real processes
(``torchrun``-style environment, gloo on the CPU; ``lightning_apps/shared_host.py``).

One launch of two processes checks: outputs equal the model without offload, with prefetch and
with UVA; both processes map the very same memory (one inode); ``stats`` and the handle say it
is shared by 2; ``share_host_memory=false`` keeps one copy per process; ``remove()`` unmaps
it; plans that differ between processes, and a process refused before the meeting, are refused
on every process in one line, after which the processes are still in step. Killing a process
with SIGKILL while the memory is handed over, or while it runs, leaves nothing in
``/dev/shm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_offload.runtime.shared import SharedSegment, can_share

APP = Path(__file__).parent / "lightning_apps" / "shared_host.py"

pytestmark = pytest.mark.skipif(not can_share(), reason="needs Linux memfd_create and /proc")


def launch(*args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(APP), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("shared_host")
    result = launch("checks", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.parametrize("backend", ["prefetch", "uva"])
def test_the_processes_of_a_node_share_one_host_copy(ranks, backend):
    runs = [rank[f"{backend}-True"] for rank in ranks]
    for run in runs:
        assert run["equal"]
        assert run["after_remove"]
        assert run["shared_by"] == run["stats_shared_by"] == 2
        assert run["host_bytes_shared"] == run["offloaded_bytes"] > 0
        assert len(run["inodes"]) == 1
        assert run["inodes_after"] == []  # remove() unmapped it
    # The same memory: one memory file, mapped by both processes.
    assert runs[0]["inodes"] == runs[1]["inodes"]
    assert ranks[0]["pid"] != ranks[1]["pid"]


@pytest.mark.parametrize("backend", ["prefetch", "uva"])
def test_share_host_memory_false_keeps_one_copy_per_process(ranks, backend):
    for rank in ranks:
        run = rank[f"{backend}-False"]
        assert run["equal"]
        assert run["shared_by"] == run["stats_shared_by"] == 1
        assert run["host_bytes_shared"] == 0
        assert run["inodes"] == []


def test_plans_that_differ_are_refused_on_every_process_in_one_line(ranks):
    errors = [rank["differing"]["error"] for rank in ranks]
    assert all(e is not None and e.startswith("OffloadError: the processes of the group planned "
               "different offloads") for e in errors), errors  # fmt: skip
    assert all("\n" not in e for e in errors)


def test_a_process_refused_before_the_meeting_stops_every_process(ranks):
    mine, other = ranks[1]["refused"]["error"], ranks[0]["refused"]["error"]
    assert mine == (
        "OffloadError: layers.1.weight has layout torch.sparse_coo; only dense (strided) "
        "tensors can be offloaded"
    )
    assert other.startswith("OffloadError: process 1 of the group cannot offload, so none does")
    # No process was left waiting in a collective: both offload together afterwards.
    assert [rank["after_refusals"] for rank in ranks] == [2, 2]


@pytest.mark.slow
def test_the_processes_of_each_node_share_their_own_copy(tmp_path):
    result = launch("two-nodes", str(tmp_path), "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    assert all(rank["equal"] and rank["shared_by"] == 2 for rank in ranks)
    assert ranks[0]["inodes"] == ranks[1]["inodes"] != []
    assert ranks[2]["inodes"] == ranks[3]["inodes"] != []
    assert ranks[0]["inodes"] != ranks[2]["inodes"]


ROOT_UNSHARE = os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.mark.slow
@pytest.mark.skipif(not ROOT_UNSHARE, reason="needs root and unshare to mount a small /dev/shm")
def test_a_dev_shm_smaller_than_the_shared_copy_does_not_limit_it(tmp_path):
    # A container's /dev/shm is 64 MB by default; the shared memory does not live there.
    # Here /dev/shm is 1 MiB (in a mount namespace of the test's own), below the 1.5 MiB
    # the UVA run shares.
    script = (
        "mount -t tmpfs -o size=1m tmpfs /dev/shm && "
        f"{sys.executable} {APP} checks {tmp_path}"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        run = rank["uva-True"]
        assert run["equal"]
        assert run["shared_by"] == 2
        assert run["host_bytes_shared"] > 2**20


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_open_the_shared_memory(tmp_path):
    segment = SharedSegment.create(4096)
    code = (  # imports first: the other user may not read this Python's files
        "import os\n"
        "from hydra_offload.runtime.shared import SharedSegment\n"
        "from hydra_offload.errors import OffloadError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    SharedSegment.attach({os.getpid()}, {segment.fd}, 4096)\n"
        "except OffloadError as err:\n"
        "    print('refused:', err)\n"
        "else:\n"
        "    print('opened')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        segment.close()
    assert result.stdout.startswith("refused: could not map the node's shared host memory"), (
        result.stdout + result.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("when", ["setup", "run"])
def test_a_process_killed_leaves_nothing_in_dev_shm(tmp_path, when):
    before = sorted(os.listdir("/dev/shm"))
    result = launch(f"kill-{when}", str(tmp_path))
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "process 1 terminated with signal SIGKILL" in result.stdout
    assert sorted(os.listdir("/dev/shm")) == before


# -- under Lightning's DDP strategy -------------------------------------------------------------

DDP_APP = Path(__file__).parent / "lightning_apps" / "ddp_shared.py"
MIB = 2**20
FROZEN_BYTES = 128 * MIB  # ddp_shared.py's frozen layers


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[tuple[str, str], list[dict]]:
    """Each (stage, option) in its own launch of 2 DDP processes: no run inherits what another
    left in the processes' memory."""
    out = tmp_path_factory.mktemp("ddp_shared")
    runs = {}
    for stage in ("predict", "fit"):
        for option in ("none", "prefetch", "uva"):
            result = subprocess.run(
                [sys.executable, str(DDP_APP), str(out), stage, option],
                cwd=DDP_APP.parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            runs[(stage, option)] = [
                torch.load(out / f"{stage}-{option}-rank{r}.pt", weights_only=False)
                for r in (0, 1)
            ]
    return runs


def node_pss(ranks: list[dict]) -> int:
    """The node's host memory while the stage ran: the sum of its processes' largest Pss."""
    return sum(rank["pss_max"] for rank in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["prefetch", "uva"])
@pytest.mark.parametrize("stage", ["predict", "fit"])
def test_under_ddp_the_node_holds_one_copy_and_computes_as_without_offload(
    ddp_runs, stage, option
):
    plain, offloaded = ddp_runs[(stage, "none")], ddp_runs[(stage, option)]
    for without, with_ in zip(plain, offloaded, strict=True):
        assert with_["shared_by"] == 2
        assert with_["host_bytes_shared"] == with_["offloaded_bytes"] >= FROZEN_BYTES
        if stage == "predict":
            for a, b in zip(without["predictions"], with_["predictions"], strict=True):
                assert torch.equal(a, b)
        else:
            assert without["params"].keys() == with_["params"].keys()
            for name, value in without["params"].items():
                assert torch.equal(value, with_["params"][name]), name
    # Without offload each process holds its own 128 MiB; with it the node holds them once
    # (and, with prefetch, each process one layer's slots).
    saved = node_pss(plain) - node_pss(offloaded)
    assert saved >= 0.7 * FROZEN_BYTES, f"the node holds only {saved / MIB:.1f} MiB less"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["prefetch", "uva"])
def test_cuda_every_process_registers_its_mapping_of_the_shared_memory(tmp_path, backend):
    result = launch("cuda", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)[backend] for r in (0, 1)]
    for run in runs:
        assert run["equal"]
        assert run["after_remove"]
        assert run["shared_by"] == 2
        assert run["host_bytes_shared"] > 0
        assert run["registered"]  # cudaPointerGetAttributes: registered host memory
        assert run["pinned_is_all"]
    assert runs[0]["inodes"] == runs[1]["inodes"] != []
