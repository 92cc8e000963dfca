"""Several training processes (`torchrun --nproc_per_node N -m medqa train`, `accelerate launch -m medqa train`):
who this process is, who writes, and the few collectives medqa needs beside the Trainer's own.

transformers' Trainer does the data-parallel part itself (DDP, or FSDP from an accelerate config): it shards the
training batches over the processes, all-reduces the gradients and saves checkpoints from rank 0. What it cannot
know is medqa's own work around it, handled here:
- one writer: only rank 0 writes run.json, metrics.jsonl, the finished run folder, plots and manifests; the others
  wait at a `barrier()` so no process reads a file before it is complete, or removes one another still reads;
- one metric: `answer_loss` is sum NLL / sum answer tokens over the whole split. Each process scores every
  world_size-th example (`shard`) and the scores are put back together (`gather_scores`), so the
  number is the one a single process reports, not a mean of per-process means.

With one process (plain `medqa train`, a notebook, a Ray Tune trial) every function here is a no-op: rank 0 of 1.
torchrun and accelerate set RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; nothing else is read.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from medqa.metrics import ExampleScores, score_examples, summarize

log = logging.getLogger(__name__)


def world_size() -> int:
    """Number of training processes (WORLD_SIZE from torchrun / accelerate launch; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints results."""
    return rank() == 0


def replicas() -> int:
    """Copies of the model that each take a micro-batch per optimizer step, as the Trainer counts them: the
    processes, or in one process its visible GPUs (the Trainer then uses torch DataParallel, e.g. a Ray Tune trial
    given tune.gpus_per_trial=2)."""
    if world_size() > 1:
        return world_size()
    import torch

    return max(1, torch.cuda.device_count())


def init(timeout_seconds: int = 1800) -> None:
    """Join the process group early (before the Trainer exists), so medqa can place barriers around its own files
    and load the model on this process's GPU. The Trainer later finds the group and uses it (so its own
    `ddp_timeout` would come too late: the group's timeout, `train.ddp_timeout`, is set here). gloo on CPU (what CI
    runs), NCCL on CUDA, each via accelerate's PartialState, as the Trainer itself would create it.

    The timeout bounds how long any collective waits for the slowest process: a barrier while rank 0 writes the
    run, an all-reduce while another rank compiles or has died."""
    if world_size() == 1:
        return
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    if not torch.distributed.is_initialized():
        # cpu=True is what selects gloo without a GPU: without it accelerate would see no device and stay single.
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_seconds))
    if is_main():
        timeout = group_timeout()
        log.info(
            "%d training processes (%s backend%s); rank 0 writes the outputs",
            world_size(),
            torch.distributed.get_backend(),
            f", collectives time out after {timeout:.0f} s" if timeout else "",
        )


def group_timeout() -> float | None:
    """Seconds the process group's collectives wait, read back from the group itself (None when torch does not
    expose it)."""
    import torch

    try:
        group = torch.distributed.distributed_c10d._get_default_group()
        return group._get_backend(_device()).options._timeout.total_seconds()
    except Exception:  # private API: a torch without it just does not say
        return None


def _active() -> bool:
    import torch

    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait until every process gets here. Every process must call it the same number of times: a barrier that one
    process skips (an early return, an exception on one rank only) hangs the others until the timeout
    (`train.ddp_timeout`, 30 minutes by default, given to the process group in `init`)."""
    if _active():
        import torch

        torch.distributed.barrier()


def _device():
    import torch

    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    nccl = "nccl" in str(torch.distributed.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Each value summed over all processes (float64, so sums of NLL over a large split lose nothing)."""
    if not _active():
        return [float(v) for v in values]
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.cpu().tolist()


def min_over_ranks(value: int | None) -> int | None:
    """The smallest value over all processes (e.g. free GPU memory, so every rank sizes its batches alike)."""
    if value is None or not _active():
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every process if it is true on any: e.g. a stop request (Ctrl-C) that reached one process first
    must stop all of them at the same step, or the others wait forever in the next gradient all-reduce."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def shard(dataset):
    """This process's share of a split: examples rank, rank + world_size, ... (the whole split on one process)."""
    if world_size() == 1:
        return dataset
    return dataset.select(range(rank(), len(dataset), world_size()))


def answer_loss(model, dataset, pad_id: int, batch_size: int, tokens_per_batch: int = 0) -> dict:
    """Split-level metrics (no bootstrap) with each process scoring its `shard`: `metrics.summarize`, the one
    definition, on the scores `gather_scores` puts back together."""
    return summarize(
        gather_scores(model, dataset, pad_id, batch_size, tokens_per_batch=tokens_per_batch), bootstrap_samples=0
    )


def gather_scores(model, dataset, pad_id: int, batch_size: int, progress: bool = False, tokens_per_batch: int = 0):
    """Per-example scores of the whole split, in its order, on every process; each process scores its `shard`.
    (The final metrics need every example: the bootstrap interval and per_example.jsonl.) The shards are put
    together with one sum over processes of a zero-filled table (float64; no pickled objects travel)."""
    mine = score_examples(model, shard(dataset), pad_id, batch_size, progress and is_main(), tokens_per_batch)
    if not _active():
        return mine
    import torch

    n = len(dataset)
    table = torch.zeros(len(_FIELDS), n, dtype=torch.float64)
    mine_at = torch.arange(rank(), n, world_size())
    for row, name in enumerate(_FIELDS):
        table[row, mine_at] = torch.as_tensor(getattr(mine, name), dtype=torch.float64)
    table = table.to(_device())
    torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.SUM)
    nll, tokens, seq_nll, seq_tokens = table.cpu().numpy()
    # ids as one process reports them: the split's own, or positions in the split (not in a shard)
    ids = list(dataset["id"]) if "id" in dataset.column_names else [str(i) for i in range(n)]
    return ExampleScores(ids, nll, tokens.round().astype(np.int64), seq_nll, seq_tokens.round().astype(np.int64))


_FIELDS = ("answer_nll", "answer_tokens", "sequence_nll", "sequence_tokens")
