"""Data-parallel helpers for PPO under `accelerate launch` (or torchrun): one process per device, rank 0 leads.

Without a process group (a plain `python run.py retrain`) every helper is the identity: one process holds all rows.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_env() -> None:
    """Join the process group the launcher described (WORLD_SIZE > 1 in the environment); gloo on CPU, NCCL on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # "cuda" then means this process's GPU
    # rank 0 trains the reward model (and SFT) while the others wait at the first broadcast: minutes, not seconds
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=1))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the one process that writes to the database, saves the adapter and runs the gate."""
    return rank() == 0


def row_share(rows):
    """This process's rows of a list or tensor: rank r of w takes rows r::w (all of them in one process)."""
    return rows[rank()::world_size()]


def gather_rows(mine: list, n_rows: int) -> list:
    """The `n_rows` rows in their order from every process's `row_share` (plain Python objects)."""
    if world_size() == 1:
        return list(mine)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(mine))
    rows: list = [None] * n_rows
    for r, part in enumerate(parts):
        rows[r::world_size()] = part
    return rows


def all_sum(value: Tensor) -> Tensor:
    """`value` summed over the processes (a new tensor, detached; `value` itself when there is one process)."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def sum_gradients(params: list[Tensor]) -> None:
    """Replace each gradient by its sum over the processes (one flat all-reduce). Each process's loss is its own
    tokens' sum over the whole minibatch's token count, so the sum is the gradient of the whole minibatch's loss."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def broadcast_from_main(params: list[Tensor]) -> None:
    """Copy rank 0's values into `params` on every process, so all start from the same weights."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def broadcast_object(value=None):
    """Rank 0's `value` on every process (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scored_on_main(reward_fn: Callable | None) -> Callable:
    """A reward function that runs `reward_fn` on rank 0 only (the one holding the reward model) and hands its
    scores to every process; the other processes pass None."""
    def score(messages: list, texts: list[str]) -> Tensor:
        scores = torch.as_tensor(reward_fn(messages, texts)).detach().float().cpu() if is_main() else None
        return broadcast_object(scores)
    return score


def finish() -> None:
    """Wait for every process, then leave the group: after PPO only rank 0 has work left."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
