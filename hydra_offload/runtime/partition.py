"""Data-parallel training of offloaded weights: gradients averaged over the processes, the
optimizer step split among the processes of a node.

Under data parallelism (DDP) every process computes gradients for its own batch, and every
replica must take the same step. For weights that live on the device, DDP averages the
gradients. Offloaded weights are kept out of DDP (it would read and write them where they are
not); :class:`Partition` does for them what DDP does for the rest, in the way ZeRO-Offload
does it:

1. **Averaged on the device.** As backward produces the gradient of a trainable offloaded
   parameter on the device, it is scaled by ``1 / world size`` and all-reduced (summed) over
   the group, asynchronously, with DDP's arithmetic (each gradient times ``1 / world size``,
   then the sum). The reductions run on a process group of their own (the same processes), so
   they never interleave with DDP's. The device-to-host copy of the gradient waits for its
   reduction, not for the whole backward.
2. **One owner per parameter and node.** The processes of a node share one host copy of the
   offloaded weights (:mod:`hydra_offload.runtime.shared`), so exactly one of them must update
   each weight: every trainable offloaded parameter has an owner among them (parameters are
   dealt out by size, largest first, each to the process holding the fewest bytes so far).
   Only the owner copies the averaged gradient to host memory; the others drop theirs. The
   optimizer the user configured runs unchanged on every process: a parameter without a
   gradient is skipped by every ``torch.optim`` optimizer, so each process steps only the
   parameters it owns, and keeps optimizer state (Adam's moments) for those only.
3. **In step.** Each process waits for the others once its backward is done (no process
   writes a weight another may still be reading for its backward) and once its optimizer step
   is done (no process reads a weight before its owner has written it).

Every node takes the same step on its own copy: the same averaged gradients, the same owners.
With one process per node (or ``share_host_memory=false``), each process owns everything and
steps its own copy.

Why an all-reduce, not a reduce-scatter: parameters are owned whole (their optimizer state
stays an ordinary ``state_dict`` entry), and one owner per node needs the averaged gradient on
every node; an all-reduce is the collective DDP itself uses, and it keeps the arithmetic
identical to DDP's. A reduce to each owner would save traffic on a single node only.

Gradient accumulation reduces at every backward, as ZeRO stage 2 does (not only at the last
micro-batch as DDP's ``no_sync`` does for its own parameters): the owner adds the averaged
gradients in host memory, and no process keeps gradients of parameters it does not own. The
sum of averages equals the average of sums, up to rounding.

Optimizers that need one view of all parameters (``torch.optim.LBFGS``: a line search over
the flattened parameters) cannot be split and are refused (:func:`partition_problem`).

Example (one process: it owns every parameter, and nothing is reduced):
    >>> import torch
    >>> weights = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))]
    >>> partition = Partition(None, weights)
    >>> partition.world, [partition.owns(p) for p in weights]
    (1, [True, True])
    >>> partition_problem(torch.optim.LBFGS(weights))  # doctest: +ELLIPSIS
    'LBFGS needs one view of every parameter ...'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from hydra_offload.errors import OffloadError
from hydra_offload.runtime.shared import NodeGroup, exchange

__all__ = ["Partition", "check_optimizer", "partition_problem"]

_UNSPLITTABLE = (torch.optim.LBFGS,)


def partition_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot step a node's offloaded parameters split among its
    processes, or ``None`` when it can (any ``torch.optim`` optimizer that updates each
    parameter from its own gradient and state).

    Example:
        >>> weight = torch.nn.Parameter(torch.zeros(1))
        >>> partition_problem(torch.optim.AdamW([weight])) is None
        True
    """
    if isinstance(optimizer, _UNSPLITTABLE):
        return (
            f"{type(optimizer).__name__} needs one view of every parameter (a line search "
            "over all of them), so the step of offloaded weights cannot be split among the "
            "processes of a node; use an optimizer that updates each parameter on its own "
            "(SGD, Adam, AdamW, ...), or offload only frozen weights"
        )
    return None


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that cannot step a node's offloaded parameters split among its
    processes (see :func:`partition_problem`).

    Raises:
        OffloadError: it cannot; the message says why and what to use instead.
    """
    problem = partition_problem(optimizer)
    if problem is not None:
        raise OffloadError(problem)


class Partition:
    """Which process of this node steps which trainable offloaded parameter, and the
    collectives that keep the processes in step (see the module docstring).

    Args:
        group: the data-parallel ``torch.distributed`` process group (every process of it
            must construct its partition together: a collective), or ``None`` for a single
            process, which owns everything and reduces nothing.
        params: the trainable offloaded parameters, in the same order on every process.
        node: the processes of this node that share the host copy
            (:func:`~hydra_offload.runtime.shared.join_node`); ``None``: each process has its
            own copy, and owns every parameter of it.
        device: where the small tensors of the collectives live (the compute device, for a
            backend such as NCCL that reduces only device tensors).
    """

    def __init__(
        self,
        group: Any,
        params: Sequence[nn.Parameter],
        node: NodeGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.group = group
        self.node = node
        self.device = device if device is not None else torch.device("cpu")
        self.comm: Any = None
        self.world = 1
        self.rank = 0
        self.node_ranks: list[int] = [0]
        if group is not None:
            import torch.distributed as dist

            self.world = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
            ranks = dist.get_process_group_ranks(group)
            # The reductions' own group: its collectives never interleave with DDP's.
            backend = dist.get_backend(group)
            self.comm = dist.new_group(ranks, backend=backend)
            if backend != "nccl":  # gloo reduces host tensors; NCCL only device ones
                self.device = torch.device("cpu")
            self.node_ranks = [self.rank]
            if node is not None:
                keys = exchange(node, self.rank)
                self.node_ranks = list(keys)
        self.parts = node.size if node is not None else 1
        self.index = node.index if node is not None else 0
        self.params = list(params)
        self._owner = _deal(self.params, self.parts)

    def __contains__(self, param: object) -> bool:
        """Whether ``param`` is one of the partition's parameters."""
        return id(param) in self._owner

    def owner(self, param: torch.Tensor) -> int:
        """The index, among the node's processes, of the process that steps ``param``."""
        return self._owner[id(param)]

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this process owns ``param``, one of the partition's parameters: it
        copies its averaged gradient to host memory, steps it and keeps its optimizer
        state."""
        return self._owner.get(id(param)) == self.index

    def steps(self, param: torch.Tensor) -> bool:
        """Whether this process may step ``param``: it owns it, or ``param`` is not one of
        the partition's (a frozen or device-resident parameter)."""
        owner = self._owner.get(id(param))
        return owner is None or owner == self.index

    def reduce(self, grad: torch.Tensor) -> Any:
        """Start averaging ``grad`` (a device gradient, in place) over the group: scaled by
        ``1 / world``, then summed, asynchronously. Returns the collective's work (``None``
        for a single process: nothing to wait for)."""
        if self.comm is None:
            return None
        import torch.distributed as dist

        grad.mul_(1.0 / self.world)
        return dist.all_reduce(grad, group=self.comm, async_op=True)

    def barrier(self) -> None:
        """Wait until every process of the group gets here."""
        if self.comm is not None:
            import torch.distributed as dist

            if self.device.type == "cuda":  # NCCL: name the device, or it guesses one
                index = self.device.index
                device = index if index is not None else torch.cuda.current_device()
                dist.barrier(group=self.comm, device_ids=[device])
            else:
                dist.barrier(group=self.comm)

    def node_values(self, value: float) -> torch.Tensor:
        """``value`` of every process of this node, in node order, the same on each of them
        (one collective of the whole group: every process calls it)."""
        if self.comm is None:
            return torch.tensor([value], dtype=torch.float64)
        import torch.distributed as dist

        values = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        values[self.rank] = value  # summed with zeros: every process's value, exactly
        dist.all_reduce(values, group=self.comm)
        return values[self.node_ranks].cpu()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process of the group (a collective)."""
        if self.comm is None:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.comm)
        return bool(value.item() > 0)

    def total_norm(
        self,
        owned: Iterable[torch.Tensor],
        others: Iterable[torch.Tensor],
        norm_type: float = 2.0,
    ) -> float:
        """The norm of all gradients, as one process of plain DDP would compute it: those
        of the offloaded parameters (``owned``: the ones this process owns; the node's other
        processes own the rest) and ``others`` (the gradients every process holds alike).
        A collective: every process calls it."""
        norm_type = float(norm_type)
        mine = float(torch.nn.utils.get_total_norm(list(owned), norm_type))
        rest = float(torch.nn.utils.get_total_norm(list(others), norm_type))
        if math.isinf(norm_type):
            return max(float(self.node_values(mine).max()), rest)
        offloaded = float(self.node_values(mine**norm_type).sum())
        return (offloaded + rest**norm_type) ** (1.0 / norm_type)

    def gather_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Give every process the optimizer state of every parameter of the partition that
        ``optimizer`` holds (a collective): each process sends the state of the ones it owns,
        and takes the others'. After it, each process's optimizer holds the full state, as
        without the partition (for a checkpoint, or when the offload is removed)."""
        if self.comm is None or self.parts == 1:
            return
        import torch.distributed as dist

        params = self.params
        index = {id(p): i for i, p in enumerate(params)}
        mine = {
            index[id(p)]: {k: _to_cpu(v) for k, v in optimizer.state[p].items()}
            for p in params
            if self.owns(p) and p in optimizer.state
        }
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (self.node_ranks[0], mine), group=self.comm)
        for leader, states in gathered:
            if leader != self.node_ranks[0]:
                continue  # another node's copy of the same state
            for i, state in states.items():
                param = params[i]
                if self.owns(param):
                    continue
                optimizer.state[param] = {
                    k: _like_state(v, optimizer.state.get(param, {}).get(k), param)
                    for k, v in state.items()
                }

    def drop_state(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
        """Forget the optimizer state of the parameters of ``params`` this process does
        not own (a loaded checkpoint gives every process all of it)."""
        for param in params:
            if not self.steps(param):
                optimizer.state.pop(param, None)


def _deal(params: Sequence[nn.Parameter], parts: int) -> dict[int, int]:
    """Owners of ``params`` among ``parts`` processes: largest first, each to the process
    holding the fewest bytes so far (ties to the lower index); the same on every process."""
    held = [0] * parts
    owner: dict[int, int] = {}
    order = sorted(
        range(len(params)), key=lambda i: (-params[i].numel() * params[i].element_size(), i)
    )
    for i in order:
        take = min(range(parts), key=lambda p: (held[p], p))
        owner[id(params[i])] = take
        held[take] += params[i].numel() * params[i].element_size()
    return owner


def _to_cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def _like_state(value: Any, current: Any, param: torch.Tensor) -> Any:
    """A gathered state value, where this process keeps such state: a scalar step stays on
    the CPU, a tensor of the parameter's shape goes where the parameter is."""
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(current, torch.Tensor):
        return value.to(current.device)
    if value.dim() == 0:
        return value
    return value.to(param.device)
