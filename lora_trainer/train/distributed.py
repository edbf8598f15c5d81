"""Data-parallel training under ``torchrun`` / ``accelerate launch``: one process per device, each a share of
every batch.

A launcher starts N copies of the same command and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``). :func:`start` reads it and joins the process
group (NCCL on CUDA, gloo on the CPU); without it, :data:`SINGLE` is returned and torch.distributed is never
touched (the WebUI tab and a plain ``python -m lora_trainer train`` run exactly as before).

The training loop stays the one-process loop over the *global* micro-batch (``batch_size`` x processes): every
process draws the noise, timesteps, caption dropout and flips of the whole micro-batch from the same generator,
keeps its share (:meth:`Distributed.share`) and divides its loss by the global batch, so that the sum of the
gradients over the processes (:meth:`Distributed.sync_update`, one all-reduce per update that also carries the
losses and the stop and out-of-memory flags) is the gradient of the one-process loss. Only the main process
writes files; what it decides or reads on behalf of all reaches the others through :meth:`Distributed.on_main`.

A text-generation run may also split the base model's weights over the processes (FSDP,
:mod:`lora_trainer.llm.sharded`): the LoRA weights stay whole in every process, so the same all-reduce, loop and
files serve it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lora_trainer.errors import UserError
from lora_trainer.train.sharding import Sharding, read_sharding

T = TypeVar("T")
#: Process counts set by MPI launchers (mpirun, which ``accelerate launch --cpu`` uses for several processes).
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedError(UserError):
    """The launcher's environment cannot start a data-parallel run (one line naming what to change)."""


class PeerLost(UserError):
    """A collective operation failed: another process died, was killed or stopped answering."""


class PeerFailed(UserError):
    """The main process failed in a step it does for all; the others stop with its message (and print nothing:
    the main process reports it)."""


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process: its place among ``world_size`` processes."""

    rank: int
    world_size: int
    local_rank: int


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"the launcher set {name}={value[:40]!r}, which is not a whole number") from None


def read_launch(environ: Mapping[str, str]) -> Launch | None:
    """The launcher's description of this process, or None when it runs alone (no launcher, or one process)."""
    world = _int_env(environ, "WORLD_SIZE")
    if world is None:
        mpi = next((name for name in MPI_SIZE_ENV if (_int_env(environ, name) or 1) > 1), None)
        if mpi is not None:
            raise DistributedError(f"started by an MPI launcher ({mpi}={environ[mpi]}) without torch.distributed's "
                                   "RANK / WORLD_SIZE; start several processes with torchrun or accelerate launch "
                                   "--multi_gpu instead")
        return None
    if world < 1:
        raise DistributedError(f"the launcher set WORLD_SIZE={world}; it must be at least 1")
    if world == 1:
        return None
    rank = _int_env(environ, "RANK")
    if rank is None or not 0 <= rank < world:
        raise DistributedError(f"the launcher set WORLD_SIZE={world} but RANK={environ.get('RANK')!r}; start the "
                               "processes with torchrun or accelerate launch, which set both")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not; start the processes "
                               "with torchrun or accelerate launch, which set them")
    local = _int_env(environ, "LOCAL_RANK")
    return Launch(rank, world, rank if local is None else local)


def process_device(name: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its machine: ``cuda:<local_rank>`` for ``auto`` (when
    CUDA is there) and ``cuda``; ``cpu`` stays the CPU; one named GPU cannot serve several processes."""
    from lora_trainer.train.preflight import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None and name != "auto":
        raise DistributedError(f"device: {name} names one GPU, but each of the processes needs its own; use device: "
                               "cuda (or auto): the process with LOCAL_RANK n uses cuda:n")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(f"the process with LOCAL_RANK {local_rank} has no GPU: this machine has {count}; "
                               f"start at most {count} processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class UpdateSync:
    """What :meth:`Distributed.sync_update` agreed on: the global micro-batch losses, and whether any process
    asked to stop or failed its micro-batches (out of memory)."""

    losses: list[torch.Tensor]
    stop: bool
    failed: bool


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (``world_size`` 1: the run is alone and nothing is shared)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: alone, the config's device applies
    owns_group: bool = False  # :func:`start` created the process group, so :meth:`close` ends it
    sharding: Sharding | None = None  # FSDP: the base model's weights are split over the processes

    def refuse_sharding(self, what: str) -> None:
        """One line when the launcher asked for sharded weights, which ``what`` cannot use."""
        if self.sharding is not None:
            raise DistributedError(f"accelerate launch is configured for FSDP (sharded weights), which only "
                                   f"text-generation LoRAs use: {what}; launch with a data-parallel config "
                                   "(examples/accelerate_multi_gpu.yaml) or torchrun")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, size: int) -> slice:
        """This process's positions in a global batch of ``size``: ``rank * b .. (rank + 1) * b - 1`` for a full
        one (``b`` = ``batch_size``), balanced for a short one (the last batch of an epoch or of a bucket)."""
        return slice(self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size)

    # ---- collectives --------------------------------------------------------------------------------
    def collective(self, what: str, operation: Callable[[], T]) -> T:
        """``operation()`` (a collective call named ``what``); :class:`PeerLost` when another process is gone."""
        try:
            return operation()
        except (RuntimeError, ConnectionError) as err:  # torch's DistError is a RuntimeError
            raise PeerLost(f"process {self.rank}: {what} failed, another process has stopped or died "
                           f"({' '.join(str(err).split())[:200]})") from None

    def sync_update(self, params: Sequence[torch.Tensor], losses: Sequence[torch.Tensor | None], *, stop: bool,
                    failed: bool) -> UpdateSync:
        """Sum the gradients of ``params`` over the processes (in place: afterwards every process holds the
        gradient of the global batch), together with the micro-batch ``losses`` and the flags, in one all-reduce.

        A process that ``failed`` (its micro-batches ran out of memory) sends zeros; every process then learns
        that the update must run again. A missing gradient (a process whose share of a short batch was empty)
        counts as zeros."""
        import torch.distributed as dist

        device = params[0].device
        parts = [p.grad.reshape(-1).float() if p.grad is not None and not failed else torch.zeros(p.numel(),
                                                                                                  device=device)
                 for p in params]
        parts += [torch.zeros(1, device=device) if loss is None or failed else loss.detach().float().reshape(1)
                  for loss in losses]
        parts.append(torch.tensor([float(stop), float(failed)], device=device))
        bucket = torch.cat(parts)
        self.collective("the gradient all-reduce", lambda: dist.all_reduce(bucket, op=dist.ReduceOp.SUM))
        stop_any, failed_any = (value > 0 for value in bucket[-2:].tolist())
        offset = 0
        for p in params:
            if not failed_any:
                p.grad = bucket[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        return UpdateSync(list(bucket[offset:offset + len(losses)]), stop_any, failed_any)

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the main process only and hand its result to every process. When it raises there, the
        error is raised on the main process and :class:`PeerFailed` with its message on the others."""
        if not self.enabled:
            return work()
        outcome: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = [("ok", work())]
            except BaseException as err:  # noqa: BLE001 - every process must learn that the step failed
                error = err
                outcome = [("error", f"{type(err).__name__}: {' '.join(str(err).split())[:2000]}")]
        self._broadcast(outcome)
        if error is not None:
            raise error
        kind, value = outcome[0]
        if kind == "error":
            raise PeerFailed(f"the main process failed: {value}")
        return value

    def from_main(self, value: T) -> T:
        """The main process's ``value`` on every process."""
        return self.on_main(lambda: value)

    def _broadcast(self, holder: list[Any]) -> None:
        import torch.distributed as dist

        self.collective("a broadcast from the main process", lambda: dist.broadcast_object_list(holder, src=0))

    def agree(self, value: Any, what: str) -> None:
        """Check that every process has the same ``value`` (e.g. the data set's digest); a UserError on every
        process, naming the ones that differ from the main process, when not."""
        if not self.enabled:
            return
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        self.collective(f"comparing {what}", lambda: dist.all_gather_object(values, value))
        differ = [rank for rank, other in enumerate(values) if other != values[0]]
        if differ:
            raise DistributedError(f"{what} differs between the processes: process(es) {differ} see other {what} "
                                   "than process 0; every machine needs the same files at the same paths")

    def close(self) -> None:
        """End the process group :func:`start` created (a no-op alone, or in a group someone else started)."""
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Distributed()


def start(device_name: str) -> Distributed:
    """Join the process group the launcher's environment describes (or use the one this program has started
    already), or return :data:`SINGLE` when this process runs alone. ``device_name`` is the config's ``device``.

    FSDP asked for in the environment (:mod:`lora_trainer.train.sharding`) is carried in ``sharding`` (one
    process alone has nothing to shard with and runs as usual); DeepSpeed, Megatron-LM and FSDP options that
    cannot apply are refused with one line."""
    environ = os.environ
    launch = read_launch(environ)
    sharding = read_sharding(environ)
    if launch is None:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError(f"this build of torch ({torch.__version__}) has no torch.distributed support, but the "
                               f"launcher started {launch.world_size} processes; run one process, or install a torch "
                               "build with distributed support")
    device = process_device(device_name, launch.local_rank)
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Distributed(launch.rank, launch.world_size, launch.local_rank, device, sharding=sharding)
    try:
        # env://: under torchrun the store at MASTER_ADDR:MASTER_PORT is the launcher's own
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size)
    except (RuntimeError, ValueError, OSError) as err:
        raise DistributedError(f"process {launch.rank} of {launch.world_size} could not join the process group at "
                               f"{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')} ({backend}): "
                               f"{' '.join(str(err).split())[:200]}") from None
    return Distributed(launch.rank, launch.world_size, launch.local_rank, device, owns_group=True, sharding=sharding)
