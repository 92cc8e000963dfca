"""The fast training step: the loss of a packed micro-batch computed from the decoder's hidden states (compiled,
static shapes, optionally chunked loss and FlexAttention), and the loss functions it and `medqa.trainer` share.

The fast step (`FastStep`) replaces `model(**batch).loss` in training only. It computes the same number: the
decoder's hidden states, the output layer, cross-entropy summed over labelled tokens and divided by the labelled
tokens of the whole accumulated batch (`num_items_in_batch`, as transformers' ForCausalLMLoss does); tests check
that losses and gradients equal the model's own. Evaluation never goes through it: `medqa.metrics` scores the
plain model, whose shapes vary by batch and would make a compiled graph recompile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medqa.fallbacks import Fallbacks
from medqa.packing import block_causal_mask
from medqa.prompts import IGNORE_INDEX

# Architectures whose logits are exactly output_embeddings(last hidden state): no logit scaling or soft-capping
# after the output layer, so the fast step's loss is the model's. Others train through model(**batch).
FAST_LOSS_MODEL_TYPES = {"biogpt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "opt", "phi3"}


def supports_fast_step(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "model_type", "") in FAST_LOSS_MODEL_TYPES and base.get_output_embeddings() is not None


def _chunk_loss_sum(hidden, labels, weight, bias):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(hidden, labels, lm_head, chunk_tokens: int = 0):
    """Sum over labelled positions of -log p(labels[:, t+1] | hidden[:, t]) (fp32 cross-entropy), the numerator of
    the causal-LM loss. The output layer runs at labelled positions only (outside torch.compile). With
    `chunk_tokens`, the logits are made `chunk_tokens` rows at a time and recomputed in backward (activation
    checkpointing), so at most one chunk's fp32 logits exist at once: for a 32k-token micro-batch and BioGPT's
    42,384-token vocabulary that is 0.7 GB per 4k-token chunk instead of 5.6 GB."""
    from torch.utils.checkpoint import checkpoint

    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    if not torch.compiler.is_compiling():
        # The output layer only where a label is scored: prompt and padding positions would give logits that
        # cross_entropy then ignores. On SmolLM2-135M (49,152 x 576) with the real records, 43% of a batch's
        # real tokens are prompt, and skipping their logits made a CPU step 1.09x faster (`make bench-peer`,
        # BENCHMARKS.md). The sum is today's up to float summation order (tests/test_logits_only.py: 1e-6). A
        # compiled step keeps every position: the labelled count changes per batch, and its one shape must not.
        keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)
    if not chunk_tokens or chunk_tokens >= h.shape[0]:
        return _chunk_loss_sum(h, y, lm_head.weight, lm_head.bias)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(
            _chunk_loss_sum,
            h[start : start + chunk_tokens],
            y[start : start + chunk_tokens],
            lm_head.weight,
            lm_head.bias,
            use_reentrant=False,
        )
    return total


def kl_to_base_sum(tuned_logits, base_logits, labels):
    """Sum over labelled positions of KL(p_base || p_tuned) of the next-token distributions (fp32): the
    `train.kl_to_base` regulariser's numerator. Forward KL from the frozen base keeps mass wherever the base model
    puts it (what it knew), where the reverse would let the tuned model drop modes."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return kl_rows(tuned_logits[:, :-1][mask], base_logits[:, :-1][mask])


def kl_rows(tuned_logits, base_logits):
    """Sum over rows of KL(softmax(base) || softmax(tuned)), in fp32."""
    tuned = tuned_logits.float().log_softmax(-1)
    base = base_logits.float().log_softmax(-1)
    return (base.exp() * (base - tuned)).sum()


def document_block_mask(position_ids):
    """FlexAttention BlockMask for packed rows: causal within each example (a new one starts where position_ids is
    0), nothing across examples. Only the blocks that hold allowed pairs are computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment = (position_ids == 0).cumsum(dim=1)

    def same_example_causal(b, h, q, k):
        return (segment[b, q] == segment[b, k]) & (q >= k)

    batch, length = position_ids.shape
    return create_block_mask(
        same_example_causal, batch, None, length, length, device=position_ids.device, _compile=position_ids.is_cuda
    )


class FastStep:
    """The training loss of a packed micro-batch: decoder -> output layer -> summed cross-entropy, optionally
    compiled (one static shape: every batch is rows x data.max_length) and with a chunked loss.

    Compilation (and CUDA graphs, and FlexAttention) can fail where the eager SDPA step runs: when torch.compile
    refuses the function, or the first training step on the optimised path raises (`AnswerLossTrainer.
    training_step`), `use_plain` switches to the eager step and records it in `fallbacks`."""

    def __init__(
        self,
        model,
        compile: bool = False,
        compile_mode: str = "default",
        loss_chunk_tokens: int = 0,
        attention: str = "sdpa",
        mask_dtype=None,
        fallbacks: Fallbacks | None = None,
        kl_beta: float = 0.0,
    ):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        # train.kl_to_base: the peft model, whose disable_adapter() gives the base model's forward for free
        self.kl_beta = kl_beta
        self.peft = model if kl_beta and hasattr(model, "disable_adapter") else None
        self.decoder = base.base_model  # BioGptModel, LlamaModel, ...: LoRA layers live inside it
        self.lm_head = base.get_output_embeddings()
        self.chunk = loss_chunk_tokens
        self.attention = attention
        self.mask_dtype = mask_dtype or torch.float32  # the attention's compute dtype (bf16 under bf16 autocast)
        self.compile_mode = compile_mode
        self.fallbacks = fallbacks if fallbacks is not None else Fallbacks()
        self.fn = self._loss_sum
        self.compiled = False
        if compile:
            try:
                # One shape for the whole run (dynamic=False); a changed shape would recompile, so the collator
                # pads every batch to rows_per_batch x data.max_length.
                self.fn = torch.compile(
                    self._loss_sum, dynamic=False, mode=None if compile_mode == "default" else compile_mode
                )
                self.compiled = True
            except Exception as exc:  # noqa: BLE001 - e.g. no compiler for this Python or platform
                self.fallbacks.record(self._optimisation("compile"), exc, "the eager training step")
        # True once a step ran on the optimised path (or when there is none): from then on errors are errors.
        self.proven = not self.compiled and attention != "flex"

    def _optimisation(self, *names: str) -> str:
        graphs = (
            ["cuda_graphs"] if "compile" in names and self.compile_mode in ("reduce-overhead", "max-autotune") else []
        )
        return "+".join([*names, *graphs])

    def use_plain(self, error: BaseException) -> None:
        """The optimised step failed with `error`: train with the eager SDPA step from now on (attention dropout
        stays as `_use_flex` set it)."""
        dropped = (["compile"] if self.compiled else []) + (["flex_attention"] if self.attention == "flex" else [])
        self.fn, self.compiled = self._loss_sum, False
        if self.attention == "flex":
            self.base.set_attn_implementation("sdpa")
            self.attention = "sdpa"  # the block-diagonal mask, built from the position ids in `_loss_sum`
        self.fallbacks.record(self._optimisation(*dropped), error, "the eager training step with SDPA attention")
        self.proven = True

    def _loss_sum(self, input_ids, attention_mask, position_ids, labels):
        if attention_mask is None and self.attention == "sdpa":
            # The block-diagonal mask, built on the device from the position ids (inside the compiled graph):
            # nothing of L x L size is made on the host or copied to the GPU.
            attention_mask = block_causal_mask(position_ids, self.mask_dtype)
        hidden = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        loss = lm_loss_sum(hidden, labels, self.lm_head, self.chunk)
        if self.peft is None:
            return loss
        with torch.no_grad(), self.peft.disable_adapter():
            base_hidden = self.decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        # only the labelled positions' logits: the KL is taken where the loss is
        mask = labels[:, 1:] != IGNORE_INDEX
        kl = kl_rows(self.lm_head(hidden[:, :-1][mask]), self.lm_head(base_hidden[:, :-1][mask]))
        return loss + self.kl_beta * kl

    def __call__(self, inputs: dict, num_items_in_batch=None):
        labels = inputs["labels"]
        position_ids = inputs.get("position_ids")
        mask = inputs.get("attention_mask")
        if self.attention == "flex":
            mask = document_block_mask(position_ids)
        loss_sum = self.fn(inputs["input_ids"], mask, position_ids, labels)
        if num_items_in_batch is None:  # a mean over this micro-batch; the Trainer divides by grad_accum
            return loss_sum / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        return loss_sum / num_items_in_batch
