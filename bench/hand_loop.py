"""The hand-written training loop that bench.py (CPU, tiny model) and gpu.py (`hand`: CUDA, the BioGPT shape) time
per batching strategy, written once: the same batches, the same LoRA and the same step on both machines.

Strategies (`STRATEGIES`; bench/README.md describes them):
  padded_512  random order, `batch_size` examples a batch, every row padded to 512 tokens (the original project);
  grouped     Trainer's length-grouped sampler (`train.packing: false`), padded to the batch's longest row;
  packed      medqa.packing's rows of up to 512 tokens in random order, ~`batch_size` examples' worth of rows a
              batch (`train.packing: true`).

Hand-written rather than transformers' Trainer because the Trainer does not batch the original project's way, and
so that the three strategies differ in their batches only: `medqa train`'s own path is timed apart (gpu.py
`trainer`, bench/peer.py).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Iterable

MAX_LENGTH = 512  # data.max_length: what the original project padded every example to, and the packing budget
STRATEGIES = ("padded_512", "grouped", "packed")


def packed_rows_per_batch(lengths: list[int], batch_size: int) -> int:
    """Packed rows per batch that hold about `batch_size` examples, so every strategy sees the same examples per
    optimizer step (~2 rows of 512 tokens for 8 examples at a mean of 110 tokens)."""
    return max(1, round(batch_size * statistics.mean(lengths) / MAX_LENGTH))


def make_batches(rows: list[dict], strategy: str, batch_size: int, rows_per_batch: int, seed: int) -> list[list[dict]]:
    """The rows of each batch of one epoch, in training order (seeded): `collate` turns one into tensors."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from medqa.packing import pack_examples

    rng = random.Random(seed)
    if strategy == "packed":
        packed = pack_examples(rows, MAX_LENGTH)
        rng.shuffle(packed)
        return [packed[i : i + rows_per_batch] for i in range(0, len(packed), rows_per_batch)]
    if strategy == "grouped":
        order = get_length_grouped_indices(
            [len(r["input_ids"]) for r in rows], batch_size, generator=torch.Generator().manual_seed(seed)
        )
    else:
        order = list(range(len(rows)))
        rng.shuffle(order)
    return [[rows[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def collate(batch: list[dict], strategy: str, pad_id: int, mask_dtype=None) -> dict:
    """One batch's tensors: packed rows with their block-diagonal mask in `mask_dtype` (the attention's compute
    dtype; None: PackedCollator's default), other rows right-padded (`medqa.metrics.pad_batch`), to 512 for
    padded_512."""
    from medqa.metrics import pad_batch
    from medqa.packing import PackedCollator
    from medqa.prompts import IGNORE_INDEX

    if strategy == "packed":
        return PackedCollator(pad_id, mask_dtype=mask_dtype)(batch)
    if strategy == "padded_512":  # a dummy row of 512 tokens makes pad_batch pad every row to 512, then is dropped
        dummy = {"input_ids": [pad_id] * MAX_LENGTH, "labels": [IGNORE_INDEX] * MAX_LENGTH}
        return {k: v[:-1] for k, v in pad_batch(batch + [dummy], pad_id).items()}
    return pad_batch(batch, pad_id)


def add_lora(model, r: int = 8, alpha: int = 16):
    """`model` with LoRA on all linear layers (as `medqa train` resolves them), in train mode, with its AdamW
    optimizer and its trainable parameter count. Wraps `model` itself: pass a copy to keep the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa.lora_targets import resolve_lora_targets
    from medqa.modeling import count_parameters

    targets = resolve_lora_targets(model, "all-linear")
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM")
    )
    n_lora = count_parameters(model)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return model.train(), optimizer, n_lora


def train_epoch(model, optimizer, batches: Iterable[dict], device=None, max_grad_norm: float | None = None) -> float:
    """Seconds for one pass over `batches` (collated; a generator collates inside the timing): forward with the
    model's own loss (bf16 autocast on CUDA), backward, gradient clipping to `max_grad_norm` when given, AdamW.
    With a `device`, each batch is moved there and the device is synchronised before and after."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    cuda = device is not None and device.type == "cuda"
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def answer_tokens(row: dict) -> int:
    """The tokens the loss is on: labels other than IGNORE_INDEX after the shift (answer and EOS)."""
    from medqa.prompts import IGNORE_INDEX

    return sum(label != IGNORE_INDEX for label in row["labels"][1:])


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so that a timing ends when the work does."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()
