"""Several processes (``torchrun --nproc_per_node N -m dualcoop_kernels train ...``): each rank takes a
slice of every global batch, the prompts' gradients are summed across ranks (the loss is a sum over the
batch, so the step equals a single process's to rounding), and rank 0 alone writes files and shows
progress. Without torchrun's environment everything here is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def total(self, *values: float) -> list[float]:
        """The sums over ranks of some numbers (each rank's share of the loss, say)."""
        if self.world == 1:
            return list(values)
        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def shared(self, value):
        """The first rank's ``value`` (any picklable object) on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def slice(self, batch: list[int]) -> list[int]:
        """This rank's part of a global batch."""
        share = len(batch) // self.world
        return batch[self.rank * share : (self.rank + 1) * share]


SINGLE_PROCESS = Ranks()


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU); the device of this
    rank (its local GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE_PROCESS, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
