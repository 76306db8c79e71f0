"""Training on several processes (GPUs, machines) with PyTorch's DistributedDataParallel.

    torchrun --nproc-per-node 4 -m imgclf train --data ../shared/datasets/cifar10-jpeg.tar.gz
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m imgclf train ...

torchrun starts one process per GPU (or per CPU slot) and sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`process_group` (around the Trainer in ``imgclf.training.train``) joins them: nccl on CUDA, gloo on CPU.
Without WORLD_SIZE > 1 everything here is a no-op and ``imgclf train`` runs exactly as in one process.

How a run is shared out, so that N processes train the model one process would:

- **Data.** The first process on each machine decodes the data into the disk cache while the others
  wait, then they load the cached arrays. Every process draws the same global permutation each epoch
  and takes every N-th image of each global batch (:meth:`World.share`): the batch size and learning
  rate stay what was asked for, a batch of 64 on 2 processes is 32 images each (any split is exact:
  64 on 3 processes is 22/21/21, and the loss is weighted to match).
- **Gradients.** Each process's summed loss is scaled by N / (global batch), so DDP's average over the
  processes is the global batch's mean loss: the step equals one process's step on the whole batch.
  Dropout draws the whole batch's mask from the (identically seeded) global generator and keeps its
  own rows, so it is the one-process mask. Augmentation draws from a stream per (seed, epoch, step,
  process): independent between processes, reproducible for a given number of processes.
- **Figures.** Train loss/accuracy are summed over the processes; validation is split between them and
  the logits gathered, so every process computes the same metrics (early stopping and the plateau
  schedule decide alike). Only rank 0 prints, writes the run folder (its name chosen by rank 0 and
  broadcast) and tests the final model.
- **Resume.** Epoch-boundary state (weights, optimizer, scheduler, permutation generator, counters) does
  not depend on the number of processes, so ``--resume`` may use another number. Mid-epoch, the
  remaining steps use the same global batches too; augmentation draws then differ from an uninterrupted
  run unless the number of processes is the same (BatchNorm statistics without --sync-bn likewise).
- **Failures.** A process that raises ends with its error; torchrun then stops the others. A process
  that hangs is detected by the process-group timeout, ``IMGCLF_DIST_TIMEOUT`` seconds (default 300),
  after which the waiting processes fail with a message naming it. Checkpoints are written atomically
  by rank 0, so those already written stay loadable.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..data.shards import select
from ..errors import ImgclfError
from ..inference import predict_logits
from ..utils import resolve_device

TIMEOUT_ENV = "IMGCLF_DIST_TIMEOUT"    # seconds a collective may wait for the other processes
BACKEND_ENV = "IMGCLF_DIST_BACKEND"    # force "gloo" or "nccl" (default: nccl for CUDA, gloo for CPU)
DEFAULT_TIMEOUT_S = 300                # long enough for a slow validation or checkpoint on rank 0
# Waiting for the first process to decode the data can take far longer than a step; a failing decoder
# is stopped by torchrun (and the wait with it), so this bound only matters for a decoder that hangs.
DATA_WAIT_S = 6 * 3600


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ImgclfError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ImgclfError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return seconds


@dataclass
class Share:
    """One process's part of one global batch (see :meth:`World.share`)."""
    idx: torch.Tensor                 # this process's rows of the global batch (every size-th, from rank)
    loss_scale: float | torch.Tensor  # x the local *summed* loss: DDP's mean over processes = the batch mean
    loss_count: float                 # loss.item() x this = this process's part of the batch's summed loss
    total: int                        # images in the global batch
    rank: int
    size: int
    seed: int                         # of this step's augmentation stream
    device: torch.device

    @property
    def generator(self) -> torch.Generator:
        """This step's augmentation generator: its own stream per (seed, epoch, step, process)."""
        return torch.Generator(device=self.device).manual_seed(self.seed)


class World:
    """The processes of one training job; a one-process run is rank 0 of 1 and every method is a no-op.

    ``rank`` 0 prints and writes; ``local_rank`` 0 (the first process on each machine) decodes the data."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, backend: str | None = None,
                 cpu_group=None):
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend
        self.cpu_group = cpu_group  # gloo group for barriers and Python objects (WORLD when gloo is the backend)
        self.is_main = rank == 0
        self._share: Share | None = None

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, backend={self.backend})"

    # ------------------------------------------------------------------ setup
    def local_device(self, device: torch.device) -> torch.device:
        """``cuda`` (no index) means this process's own GPU, cuda:LOCAL_RANK."""
        if self.size > 1 and device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The first process on each machine runs the block first (decoding the data into the disk cache);
        the others wait, then run it (loading the cache)."""
        if self.size == 1:
            yield
            return
        if self.local_rank != 0:
            self._barrier(DATA_WAIT_S)
        yield
        if self.local_rank == 0:
            self._barrier(DATA_WAIT_S)

    def _barrier(self, seconds: float) -> None:
        dist.monitored_barrier(group=self.cpu_group, timeout=datetime.timedelta(seconds=seconds))

    def from_main(self, make: Callable[[], object]) -> object:
        """``make()`` on rank 0 (e.g. creating the run folder), its result sent to every process."""
        if self.size == 1:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group, device=torch.device("cpu"))
        return box[0]

    def notes(self, model: nn.Module, batch_size: int, sync_bn: bool, device: torch.device) -> list[str]:
        """Lines for the run's header (and run.json) on how the work is shared; raises for settings that
        cannot work."""
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if self.size == 1:
            return ["--sync-bn has no effect in one process"] if sync_bn and has_bn else []
        if sync_bn and device.type != "cuda":
            raise ImgclfError("--sync-bn needs CUDA GPUs: PyTorch's SyncBatchNorm has no CPU kernel; "
                              "drop --sync-bn on CPU (each process then normalises over its own images)")
        per, extra = divmod(batch_size, self.size)
        split = f"{per}" if not extra else f"{per}-{per + 1} (an exact split: the loss is weighted to match)"
        lines = [f"{self.size} processes ({self.backend}): each computes {split} images of every batch of "
                 f"{batch_size}; gradients averaged by DistributedDataParallel, so batch size and lr are "
                 "those of one process"]
        if has_bn:
            lines.append("BatchNorm statistics over the whole batch (--sync-bn)" if sync_bn else
                         f"BatchNorm normalises over each process's own ~{max(per, 1)} images "
                         "(--sync-bn for the whole batch, CUDA only)")
        return lines

    # ------------------------------------------------------------------ training
    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """The module to run the training forward/backward through: DDP over several processes (the bare
        ``model`` stays what is evaluated and saved). Converts BatchNorm to SyncBatchNorm in place when
        asked (same parameters and buffers, so checkpoints are unchanged) and makes dropout draw the whole
        batch's mask (see :class:`_BatchDropout`)."""
        if self.size == 1:
            return model
        if sync_bn:
            _sync_batchnorm_in_place(model)
        for m in model.modules():
            if type(m) is nn.Dropout:
                m.__class__ = _BatchDropout
                m.world = self
        device = next(model.parameters()).device
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                   else None)

    def share(self, idx: torch.Tensor, y: torch.Tensor, loss_weight: torch.Tensor | None, seed: int, epoch: int,
              step: int) -> Share | None:
        """This process's part of the global batch ``idx`` (every size-th image, from its rank), or None in
        one process. The loss scale counts images (or their class weights, with --class-weights) in the
        whole batch, so the averaged gradient is exactly the one-process gradient."""
        if self.size == 1:
            return None
        total = len(idx)
        denom = float(total) if loss_weight is None else loss_weight[y[idx]].sum()
        key = hashlib.blake2b(f"{seed}/{epoch}/{step}/{self.rank}".encode(), digest_size=8).digest()
        self._share = Share(idx=self.local_rows(idx), loss_scale=self.size / denom,
                            loss_count=total / self.size, total=total, rank=self.rank, size=self.size,
                            seed=int.from_bytes(key, "little") >> 1, device=idx.device)
        return self._share

    def local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's images of a global batch: every size-th, from its rank (all of them in one process)."""
        return idx if self.size == 1 else idx[self.rank::self.size]

    def average_grads(self, model: nn.Module) -> None:
        """Average gradients over the processes by hand, for steps that bypass DDP (the head-only epochs
        run ``forward_head`` on cached features)."""
        if self.size == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.size)

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any (a stop asked on one process stops all)."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values: list) -> list:
        """Element-wise sum over the processes; ints stay ints."""
        if self.size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return [type(v)(round(s) if isinstance(v, int) else s) for v, s in zip(values, t.tolist())]

    def predict_logits(self, model: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """:func:`imgclf.inference.predict_logits` split over the processes, the logits gathered in order on
        every process. Rank 0's buffers (BatchNorm running statistics) are sent to all first, so every
        process evaluates the very model rank 0 saves."""
        if self.size == 1:
            return predict_logits(model, x, *args, **kwargs)
        for b in model.buffers():
            dist.broadcast(b, src=0)
        chunk = -(-len(x) // self.size)
        lo, hi = min(self.rank * chunk, len(x)), min((self.rank + 1) * chunk, len(x))
        local = predict_logits(model, select(x, slice(lo, hi)), *args, **kwargs)  # x: a tensor or ImageRows
        # gathered on the CPU under gloo (it has no CUDA all_gather, should IMGCLF_DIST_BACKEND force it on GPUs)
        padded = local.new_zeros((chunk, local.shape[1]), device=self._device())
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        sizes = [max(0, min(len(x), (r + 1) * chunk) - r * chunk) for r in range(self.size)]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


class _BatchDropout(nn.Dropout):
    """nn.Dropout that, during a distributed training step, draws the mask of the *whole* global batch
    and keeps this process's rows. Every process's global generator is seeded alike, so the masks are the
    one-process masks: processes never share a mask, and the generator state that ``last`` saves does not
    depend on the number of processes. Outside a step (or in eval mode) it is plain nn.Dropout.
    (On CPU this is ATen's dropout exactly: bernoulli_ on a tensor of the input's shape, divided, multiplied.
    On CUDA one process draws its masks in a fused kernel with another random stream: same distribution,
    other masks, so there several processes train a model of the same quality, not the same model.)"""

    world: World

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = self.world._share
        if not self.training or share is None or not 0 < self.p < 1 or len(x) != len(share.idx):
            return super().forward(x)
        noise = x.new_empty((share.total, *x.shape[1:])).bernoulli_(1 - self.p)
        noise = noise[share.rank::share.size].div_(1 - self.p)
        return x * noise


def _sync_batchnorm_in_place(model: nn.Module) -> None:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _sync_batchnorm_in_place(child)


# ---------------------------------------------------------------------------- the process group
_WORLD: World | None = None


def current() -> World:
    """The World of this process: the one :func:`process_group` joined, one adopted from a process group
    the caller initialised, else rank 0 of 1."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo")
        _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                       backend, cpu_group)
        return _WORLD
    return World()


def launched_size() -> int:
    """WORLD_SIZE as torchrun (or SLURM via torchrun) set it; 1 when not launched that way."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """Join the other processes when torchrun started several (WORLD_SIZE > 1), leave at the end.

    nccl for CUDA, gloo for CPU (``IMGCLF_DIST_BACKEND`` overrides), every collective bounded by
    ``IMGCLF_DIST_TIMEOUT`` seconds. Errors say which process they come from; a lost connection to
    another process (it failed, or hung past the timeout) becomes one clear ImgclfError. Does nothing
    in one process, or when the caller already initialised a process group (then it is theirs to end)."""
    global _WORLD
    size = launched_size()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise ImgclfError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    target = resolve_device(device)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if target.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ImgclfError(f"{BACKEND_ENV} must be gloo or nccl, got {backend!r}")
    seconds = timeout_s()
    timeout = datetime.timedelta(seconds=seconds)
    if target.type == "cuda":
        index = target.index if target.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ImgclfError(
                f"[rank {rank}/{size}] torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this "
                f"machine, but it has {torch.cuda.device_count()} GPU(s): each process needs its own "
                f"(--nproc-per-node {torch.cuda.device_count()}), or pass --device cpu to train on the CPUs, or "
                "--device cuda:0 with IMGCLF_DIST_BACKEND=gloo to share one GPU (NCCL refuses that)")
        torch.cuda.set_device(index)
    dist.init_process_group(backend, timeout=timeout)
    try:
        cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        _WORLD = World(rank, size, local_rank, backend, cpu_group)
        yield _WORLD
    except ImgclfError as e:
        raise ImgclfError(f"[rank {rank}/{size}] {e}") from None
    except Exception as e:
        if not _lost_contact(e):
            print(f"imgclf: [rank {rank}/{size}] stopped by {type(e).__name__}; torchrun stops the other "
                  "processes", file=sys.stderr, flush=True)
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImgclfError(
            f"[rank {rank}/{size}] lost contact with the other processes ({first[:300]}). Another process "
            f"most likely failed first: its error is printed above and torchrun's summary names it (\"Root "
            f"Cause\"). A process that stops answering fails the job after {seconds:g}s ({TIMEOUT_ENV}). "
            "Any checkpoint already written is intact (--resume continues from it)") from e
    finally:
        _WORLD = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _lost_contact(e: BaseException) -> bool:
    """A failed collective: c10d's own error types, or gloo's transport errors (plain RuntimeErrors)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("gloo" in text or "Connection closed by peer" in text
                                            or "Timed out" in text or "timed out" in text)
