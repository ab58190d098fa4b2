"""Training in many processes (torchrun): who this process is, and what the processes share.

``torchrun --nproc-per-node N -m sattrain run STORE ...`` starts N copies of ``sattrain
run`` with the environment variables RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; ``world_from_env`` reads them (absent, or WORLD_SIZE 1:
one process, the plain path). ``start(world, device)`` joins the process group and returns
a ``Comm``; for one process every ``Comm`` operation is local and nothing of
torch.distributed is touched.

The processes, and what each one does (sattrain.trainer):

* Process groups: NCCL for the model's gradients on CUDA (every process on
  ``cuda:LOCAL_RANK``), gloo on the CPU. The small exchanges of the trainer (agreement
  after each stage, the checkpoint's state on --resume, metric sums, the replica check) go
  through a gloo group on the CPU in both cases, so that a lost or hung process ends each
  of these waits with a Python exception after the timeout (``SATKIT_DIST_TIMEOUT``
  seconds, default ``DEFAULT_TIMEOUT_S``) instead of a hang, and the exception becomes one
  line (``DistributedError``).
* The model is wrapped in DistributedDataParallel (``Comm.wrap``): gradients are averaged
  over the processes in every backward pass, and rank 0's parameters and buffers are
  broadcast at construction, so every replica starts from the same weights.
* Errors: a stage every process runs (opening the store, resuming, loading the data) ends
  in ``Comm.stage``, an agreement: if any process failed, the failed process of lowest rank
  re-raises its own error (the one line the user sees) and every other one raises
  ``PeerFailed``, which the CLI turns into a silent exit status 1. A process that fails
  while training (between stages) exits at once; torchrun then stops the others, and
  without torchrun they lose their connection to it and stop with a one-line
  ``DistributedError`` naming the lost contact.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from satdata.errors import SatkitError

ENV_TIMEOUT = "SATKIT_DIST_TIMEOUT"
# Seconds a process waits for the others in one exchange: long enough for rank 0's held-out
# monitor on a large --eval-samples and its checkpoint writes, which the others wait for.
DEFAULT_TIMEOUT_S = 1800.0
LAUNCH = "torchrun --nproc-per-node N -m sattrain run STORE ..."


class DistributedError(SatkitError):
    """The processes of a torchrun launch lost each other, or disagree on what they train."""


class PeerFailed(SatkitError):
    """Another process failed and printed why; this one stops without a line of its own (exit status 1)."""


@dataclass(frozen=True)
class World:
    """This process among the processes that train together (torchrun's environment)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes the run directory."""
        return self.rank == 0

    def who(self) -> str:
        return f"rank {self.rank} of {self.size}"


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise SatkitError(f"{name} is not set, but WORLD_SIZE is {env.get('WORLD_SIZE')}: launch the processes "
                              f"with torchrun ({LAUNCH}), which sets RANK, WORLD_SIZE and LOCAL_RANK")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise SatkitError(f"{name}: {raw[:40]!r} is not a whole number (torchrun sets it)") from None


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """This process's ``World`` from torchrun's variables; one process when WORLD_SIZE is absent or 1.

    >>> world_from_env({})
    World(rank=0, size=1, local_rank=0, local_size=1)
    >>> world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}).who()
    'rank 1 of 2'
    """
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE", 1)
    if size < 1:
        raise SatkitError(f"WORLD_SIZE: must be >= 1 (processes), got {size}")
    if size == 1:
        return World()
    rank = _env_int(env, "RANK", None)
    local_rank = _env_int(env, "LOCAL_RANK", None)
    local_size = _env_int(env, "LOCAL_WORLD_SIZE", size)
    if not 0 <= rank < size:
        raise SatkitError(f"RANK: must be in [0, {size}) for WORLD_SIZE {size}, got {rank}")
    if not 1 <= local_size <= size or not 0 <= local_rank < local_size:
        raise SatkitError(f"LOCAL_RANK {local_rank} / LOCAL_WORLD_SIZE {local_size}: not a process of this machine "
                          f"among {size} (torchrun sets them)")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    """The exchange timeout in seconds: ``SATKIT_DIST_TIMEOUT`` or ``DEFAULT_TIMEOUT_S``."""
    env = os.environ if env is None else env
    raw = env.get(ENV_TIMEOUT)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < 10**7):
        raise SatkitError(f"{ENV_TIMEOUT}: must be a number of seconds > 0, got {raw[:40]!r}")
    return value


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    if not world.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise SatkitError(f"--device {device}: under torchrun each process uses the GPU of its local rank "
                          "(cuda:LOCAL_RANK); give --device cuda (or auto), and choose the GPUs with "
                          "CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise SatkitError(f"torchrun started {world.local_size} processes on this machine (--nproc-per-node), which "
                          f"has {count} CUDA device(s); give --nproc-per-node {count} or fewer")
    return torch.device("cuda", world.local_rank)


def params_digest(model: nn.Module) -> str:
    """A digest (BLAKE2b) of the model's parameters, in order: equal on every process iff the
    replicas hold the same weights (buffers such as batch norm's running statistics are per
    process and left out)."""
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


_COMM_WORDS = re.compile(r"gloo|nccl|c10d|processgroup|timed out|connection (?:reset|refused|closed)|broken pipe|"
                         r"socket|peer", re.IGNORECASE)


def comm_failure(e: BaseException) -> str | None:
    """A short reason when ``e`` is torch.distributed failing to reach another process, else None."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if not (isinstance(e, RuntimeError) and (dist_error is not None and isinstance(e, dist_error)
                                             or _COMM_WORDS.search(str(e)))):
        return None
    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text.split(". ")[0].rstrip(".")[:160] or type(e).__name__


class Comm:
    """What the processes of a run share; for one process every operation is local."""

    def __init__(self, world: World, device: torch.device, *, timeout: float = DEFAULT_TIMEOUT_S,
                 control: Any = None, backend: str | None = None) -> None:
        self.world = world
        self.device = device
        self.timeout = timeout
        self.backend = backend
        self._control = control  # the CPU (gloo) group of the small exchanges; None: the default group
        self._open = world.distributed

    # ---------------------------------------------------------------- facts

    def describe(self) -> dict[str, Any]:
        """What config.json records about the processes (for one process: world_size 1 alone)."""
        if not self.world.distributed:
            return {"world_size": 1}
        return {"world_size": self.world.size, "processes_per_machine": self.world.local_size,
                "backend": self.backend, "exchanges": "gloo", "timeout_s": self.timeout,
                "launch": "torchrun", "gradients": "averaged by DistributedDataParallel"}

    def seed(self, seed: int, *keys: int | str) -> int:
        """``derive_seed(seed, *keys)`` for one process; with the rank added under torchrun, so
        that the processes draw different noise (and one process keeps its exact old streams)."""
        from sattrain.data import derive_seed

        if not self.world.distributed:
            return derive_seed(seed, *keys)
        return derive_seed(seed, *keys, "rank", self.world.rank)

    # ---------------------------------------------------------------- the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model in DistributedDataParallel (gradients averaged; rank 0's weights broadcast now);
        the model itself for one process."""
        if not self.world.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        with self.collective("starting DistributedDataParallel"):
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---------------------------------------------------------------- exchanges

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn torch.distributed's failures to reach another process (a peer that died, a
        timeout) inside the block into one DistributedError line naming ``what``."""
        try:
            yield
        except RuntimeError as e:
            lost = self.lost(e, what)
            if lost is None:
                raise
            raise lost from None

    def lost(self, e: BaseException, what: str) -> DistributedError | None:
        """The one-line DistributedError for ``e`` when it is a failure to reach another process."""
        reason = comm_failure(e) if self.world.distributed else None
        if reason is None:
            return None
        return DistributedError(
            f"{self.world.who()}: lost contact with the other processes while {what} ({reason}); another process "
            f"failed or stopped (its error, above, says why), or was slower than {ENV_TIMEOUT}={self.timeout:g} s")

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every process (pickled; tensors should be on the CPU)."""
        if not self.world.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.world.main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every process's ``obj``, by rank, on every process."""
        if not self.world.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world.size
        with self.collective(what):
            dist.all_gather_object(out, obj, group=self._control)
        return out

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise sums over the processes (float64, on the CPU)."""
        if not self.world.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        with self.collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._control)
        return t.tolist()

    def barrier(self, what: str) -> None:
        """Wait until every process is here (through the control group, so with its timeout)."""
        self.gather(None, what)

    def same(self, value: Any, what: str) -> None:
        """Every process must hold an equal ``value`` (a JSON-like object): else DistributedError on
        rank 0 and PeerFailed elsewhere (one line in all)."""
        values = self.gather(value, f"comparing {what}")
        for r, v in enumerate(values):
            if v != values[0]:
                if not self.world.main:
                    raise PeerFailed(f"{self.world.who()}: the processes disagree on {what} (rank 0 says how)")
                raise DistributedError(f"the processes disagree on {what}: rank 0 has {_short(values[0])}, rank {r} "
                                       f"has {_short(v)} (every process must get the same options and store contents)")

    @contextmanager
    def stage(self, what: str) -> Iterator[None]:
        """A stage every process runs, ended by an agreement: when a process failed, the failed
        process of lowest rank re-raises its own error and every other one raises PeerFailed.

        The block must not itself wait for the other processes (a process that failed inside
        it never reaches that wait). For one process this is only the block.
        """
        if not self.world.distributed:
            yield
            return
        failure: BaseException | None = None
        try:
            yield
        except (DistributedError, PeerFailed):
            raise
        except Exception as e:  # noqa: BLE001 - every failure must reach the agreement, or the others wait
            lost = self.lost(e, what)
            if lost is not None:
                raise lost from None
            failure = e
        from satdata.clikit import format_error

        reports = self.gather(None if failure is None else format_error(failure), f"agreeing after {what}")
        failed = [r for r, msg in enumerate(reports) if msg is not None]
        if not failed:
            return
        if failure is not None and failed[0] == self.world.rank:
            raise failure
        raise PeerFailed(f"{self.world.who()}: stopped because rank {failed[0]} failed while {what}: "
                         f"{reports[failed[0]]}")

    def close(self) -> None:
        """Leave the process groups (idempotent)."""
        if not self._open:
            return
        self._open = False
        import torch.distributed as dist

        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except (RuntimeError, ValueError):  # a group already broken by a lost process: nothing to tidy
            pass


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def start(world: World, device: torch.device) -> Comm:
    """Join the process group of ``world`` (nothing for one process) and return its ``Comm``.

    The default group is NCCL on CUDA (``device`` must be this process's GPU, see
    ``rank_device``) and gloo on the CPU; on CUDA a second, gloo group carries the small
    exchanges. Both have the timeout of ``timeout_s()``. Failures are one SatkitError line.
    """
    if not world.distributed:
        return Comm(world, device)
    import torch.distributed as dist

    if not dist.is_available():
        raise SatkitError(f"this torch ({torch.__version__}) has no torch.distributed; train in one process")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise SatkitError(f"WORLD_SIZE is {world.size} but {' and '.join(missing)} not set: launch with torchrun "
                          f"({LAUNCH})")
    timeout = timeout_s()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise SatkitError(f"this torch ({torch.__version__}) has no NCCL for training on several GPUs")
        torch.cuda.set_device(device)
    if not dist.is_gloo_available():
        raise SatkitError(f"this torch ({torch.__version__}) has no gloo backend (needed for the processes' exchanges)")
    comm = Comm(world, device, timeout=timeout, backend=backend)
    with comm.collective(f"joining the {world.size} processes ({backend}, {os.environ['MASTER_ADDR']}:"
                         f"{os.environ['MASTER_PORT']})"):
        dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout))
        if backend != "gloo":
            comm._control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return comm
