"""Token budgets: how many tokens a training micro-batch, an optimizer step and a scoring batch hold.

On a GPU a training step has a fixed host cost (about 110 ms for full-size BioGPT with LoRA on an H200, measured
in BENCHMARKS.md: 1x32 tokens and 16x512 tokens cost the same), so what decides throughput is how many real tokens
each step carries. With packing every micro-batch is `rows_per_batch` rows of exactly `data.max_length` tokens:
one shape for the whole run, so `torch.compile` compiles once, and the budget is a number of tokens, not of
examples.

    micro-batch    = rows_per_batch x data.max_length tokens        (train.tokens_per_batch; 0 = auto)
    optimizer step = micro-batch x grad_accum tokens                (train.tokens_per_step; 0 = micro-batch x
                                                                      train.grad_accum)
    e.g. biogpt.yaml on an H100: 32 rows x 512 = 16,384 tokens x 2 = 32,768 tokens (~145 examples) per step;
         on a T4 the same 32,768 tokens per step come from 8 rows x 8 accumulation steps.

`auto` on CUDA sizes the micro-batch from the card's free memory and the model's shape (`train_bytes_per_token`);
elsewhere it is `train.batch_size` rows. The optimizer step (what the learning rate is tuned for) does not depend
on the card: only the split into accumulation steps does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

from medqa.errors import ConfigError

log = logging.getLogger(__name__)

# Share of the free memory the activations may use: the rest covers the allocator's fragmentation, the
# optimizer's LoRA states, cuBLAS workspaces and torch.compile's buffers.
MEMORY_FRACTION = 0.6
# Largest micro-batch auto picks: past ~64k tokens a step is long enough that the host cost is < 2%.
MAX_AUTO_TOKENS = 65_536


@dataclass
class BatchPlan:
    """The shape of training: every micro-batch is rows_per_batch x row_tokens tokens (packed, padded)."""

    rows_per_batch: int
    row_tokens: int
    grad_accum: int
    how: str  # where rows_per_batch came from, for the log and metrics.json

    @property
    def tokens_per_batch(self) -> int:
        return self.rows_per_batch * self.row_tokens

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_batch * self.grad_accum

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_batch": self.tokens_per_batch, "tokens_per_step": self.tokens_per_step}

    def describe(self) -> str:
        return (
            f"{self.rows_per_batch} rows x {self.row_tokens} tokens = {self.tokens_per_batch:,} tokens per "
            f"micro-batch ({self.how}), x {self.grad_accum} accumulation = {self.tokens_per_step:,} tokens per "
            "optimizer step"
        )


def _dims(model_config) -> tuple[int, int, int, int]:
    """(layers, hidden, feed-forward, vocabulary) of a transformers config, with BioGPT's names as fallbacks."""
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 24)
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 1024)
    ffn = getattr(model_config, "intermediate_size", None) or 4 * hidden
    return int(layers), int(hidden), int(ffn), int(model_config.vocab_size)


def train_bytes_per_token(model_config, loss_chunk_tokens: int = 0) -> int:
    """Activation memory one training token costs (bf16/fp16 autocast, LoRA, no activation checkpointing).

    Per layer the saved activations are about 2 bytes x (12 x hidden + 3 x feed-forward): the inputs of the
    four attention and two feed-forward projections (and of their LoRA A matrices), the attention output and
    softmax statistics (SDPA/flash keep no L x L scores), the layer norms and the GELU input. Full-size BioGPT:
    2 x (12 x 1024 + 3 x 4096) x 24 layers = 1.18 MB. The output layer adds 12 bytes per vocabulary entry: bf16
    logits, their fp32 copy for the loss, its gradient, and the bf16 gradient (42,384 x 12 = 0.51 MB), unless the
    loss is computed in chunks of `loss_chunk_tokens` (then that cost is per chunk, not per token)."""
    layers, hidden, ffn, vocab = _dims(model_config)
    per_token = 2 * (12 * hidden + 3 * ffn) * layers
    if not loss_chunk_tokens:
        per_token += 12 * vocab
    return per_token


def eval_bytes_per_token(model_config) -> int:
    """Memory one scored token costs (no gradients): its logits in the model dtype (fp32 copies are made a few
    thousand positions at a time, `metrics.token_nll`), counted as 4 bytes per vocabulary entry for a margin, plus
    a few hidden-size buffers that live one layer at a time."""
    _, hidden, ffn, vocab = _dims(model_config)
    return 4 * vocab + 2 * (4 * hidden + ffn)


def budget_from_memory(
    free_bytes: int, bytes_per_token: int, row_tokens: int, fixed_bytes: int = 0, cap: int = MAX_AUTO_TOKENS
) -> int:
    """Tokens per micro-batch that fit in MEMORY_FRACTION of `free_bytes` (minus `fixed_bytes`), as whole rows of
    `row_tokens`, at least one row and at most `cap` tokens."""
    usable = max(free_bytes * MEMORY_FRACTION - fixed_bytes, 0)
    rows = int(usable // (bytes_per_token * row_tokens))
    rows = max(1, min(rows, max(cap // row_tokens, 1)))
    return rows * row_tokens


def cuda_free_bytes(device=None) -> int | None:
    """Free memory of the CUDA device now (after the model is loaded), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def plan_batches(
    train_cfg, row_tokens: int, model_config=None, free_bytes: int | None = None, world: int = 1
) -> BatchPlan:
    """The micro-batch and accumulation for packed training (see the module docstring).

    `free_bytes` is the CUDA device's free memory (None off CUDA); `model_config` sizes the auto budget. With
    `world` processes the micro-batch stays per process (it is a memory budget) and train.tokens_per_step stays
    the whole optimizer step (what the learning rate is tuned for): each process takes 1/world of its rows."""
    t = train_cfg
    if t.tokens_per_batch:
        rows, how = max(1, t.tokens_per_batch // row_tokens), f"train.tokens_per_batch={t.tokens_per_batch}"
    elif free_bytes is not None and model_config is not None:
        # one loss chunk: bf16 logits, their fp32 copy, its gradient and the bf16 gradient (16 bytes per entry)
        chunk_bytes = 16 * _dims(model_config)[3] * t.loss_chunk_tokens
        per_token = train_bytes_per_token(model_config, t.loss_chunk_tokens)
        cap = t.tokens_per_step or MAX_AUTO_TOKENS
        tokens = budget_from_memory(free_bytes, per_token, row_tokens, fixed_bytes=chunk_bytes, cap=cap)
        rows = tokens // row_tokens
        how = (
            f"auto: {free_bytes / 2**30:.1f} GiB free on the GPU, about {per_token / 2**20:.2f} MiB per token, "
            f"{MEMORY_FRACTION:.0%} of it used"
        )
    else:
        rows, how = t.batch_size, f"train.batch_size={t.batch_size} rows"
    if not t.tokens_per_step:
        return BatchPlan(rows, row_tokens, t.grad_accum, how)
    step_rows = max(1, t.tokens_per_step // row_tokens)
    if step_rows % world:
        raise ConfigError(
            f"train.tokens_per_step={t.tokens_per_step} is {step_rows} rows of {row_tokens} tokens, "
            f"which do not split evenly over {world} processes. Use a multiple of {world} x "
            f"{row_tokens} = {world * row_tokens} tokens, so every process runs the same rows."
        )
    step_rows //= world
    # The largest micro-batch that fits and divides the step, so every step holds exactly step_rows rows.
    rows = max(r for r in range(1, min(rows, step_rows) + 1) if step_rows % r == 0)
    return BatchPlan(rows, row_tokens, step_rows // rows, how)


def optimizer_steps(n_rows: int, rows_per_step: int, epochs: float, max_steps: int = 0) -> int:
    """Optimizer steps the Trainer will run: max_steps, else ceil(epochs x ceil(batches / grad_accum)). With
    whole micro-batches per step, ceil(ceil(n / b) / a) = ceil(n / (a x b)), so only rows per step matters."""
    if max_steps > 0:
        return max_steps
    per_epoch = max(-(-n_rows // rows_per_step), 1)
    return math.ceil(epochs * per_epoch)  # the Trainer's own arithmetic (set_initial_training_values)


def length_budget_batches(lengths: list[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first. With `max_tokens`, a batch holds as many
    examples as fit in max_tokens once padded to its longest (first) one; otherwise `batch_size` examples."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not max_tokens:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def eval_tokens_per_batch(configured: int, model, device_free: int | None = None) -> int:
    """Scoring budget: `configured` (scoring.tokens_per_batch) when set, else (on CUDA) sized from free memory, else 0
    (= scoring.batch_size examples per batch)."""
    if configured:
        return configured
    free = device_free if device_free is not None else _model_cuda_free(model)
    if free is None:
        return 0
    return budget_from_memory(free, eval_bytes_per_token(model.config), 1, cap=MAX_AUTO_TOKENS)


def _model_cuda_free(model) -> int | None:
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return None
    return cuda_free_bytes(device) if device.type == "cuda" else None
