"""Logits only where they are scored: the training step's output layer runs at labelled positions only, and its
loss and gradients are the output layer at every position's (today's), to 1e-6, packed and unpacked, chunked or
not, on a tiny Llama with LoRA (seconds, offline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import medqa.faststep
from medqa.faststep import FastStep, lm_loss_sum
from medqa.metrics import pad_batch
from medqa.packing import PackedCollator, pack_examples
from medqa.prompts import IGNORE_INDEX

VOCAB = 512


@pytest.fixture
def lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # B starts at zero: give it values, so every LoRA gradient is non-zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()  # no dropout; gradients still flow


def _rows(n: int = 5, seed: int = 1) -> list[dict]:
    """Examples of different lengths, each a prompt (labels -100) then an answer (labels = the tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt, answer = 6 + 3 * i, 4 + 2 * ((i * 7) % 5)
        ids = torch.randint(3, VOCAB, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": len(ids)})
    return rows


def _every_position_loss_sum(hidden, labels, lm_head):
    """Today's numerator: the output layer at every position, cross_entropy ignoring the unlabelled ones."""
    logits = F.linear(hidden[:, :-1], lm_head.weight, lm_head.bias).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("chunk", [0, 7])
def test_lm_loss_sum_equals_every_position_and_computes_only_labelled_rows(monkeypatch, chunk):
    torch.manual_seed(0)
    batch = pad_batch(_rows(), pad_id=0)
    lm_head = torch.nn.Linear(16, VOCAB, bias=True)
    hidden = torch.randn(*batch["input_ids"].shape, 16, requires_grad=True)
    seen = []
    original = medqa.faststep._chunk_loss_sum

    def counting(h, y, weight, bias):
        seen.append(h.shape[0])
        return original(h, y, weight, bias)

    monkeypatch.setattr(medqa.faststep, "_chunk_loss_sum", counting)
    new = lm_loss_sum(hidden, batch["labels"], lm_head, chunk)
    rows = list(seen)  # the forward's calls (a chunked loss recomputes each chunk again in backward)
    new.backward()
    g_new = (hidden.grad.clone(), lm_head.weight.grad.clone())
    hidden.grad, lm_head.weight.grad = None, None
    old = _every_position_loss_sum(hidden, batch["labels"], lm_head)
    old.backward()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    computed = hidden[:, :-1].shape[0] * hidden[:, :-1].shape[1]
    # the output layer ran on the labelled rows only (a third of them here), in chunks of `chunk` when set
    assert sum(rows) == labelled < computed / 2
    assert max(rows) <= (chunk or labelled)
    assert new.item() == pytest.approx(old.item(), rel=1e-6)
    torch.testing.assert_close(g_new[0], hidden.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_new[1], lm_head.weight.grad, rtol=1e-6, atol=1e-7)


def test_no_label_gives_a_differentiable_zero():
    lm_head = torch.nn.Linear(8, VOCAB)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss = lm_loss_sum(hidden, torch.full((2, 5), IGNORE_INDEX), lm_head)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum().item() == 0.0


def _packed_batch():
    rows = _rows()
    return PackedCollator(0, block_mask=False)(pack_examples(rows, 64)), rows


@pytest.mark.parametrize("layout", ["unpacked", "packed"])
@pytest.mark.parametrize("chunk", [0, 9])
def test_training_step_loss_and_gradients_equal_the_models_own(lora_llama, layout, chunk):
    """FastStep (labelled positions only) against the model's own forward (logits at every position, its own
    causal-LM loss), summed over answer tokens: padded rows, or packed rows against each example alone."""
    model = lora_llama
    if layout == "unpacked":
        batch = pad_batch(_rows(), pad_id=0)
        references = [batch]
    else:
        batch, rows = _packed_batch()
        assert batch["input_ids"].shape[0] < len(rows)  # several examples share a row
        references = [pad_batch([r], pad_id=0) for r in rows]
    n_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = FastStep(model, loss_chunk_tokens=chunk)(batch, torch.tensor(n_items))
    loss.backward()
    fast = _grads(model)
    reference = sum(model(**b).loss * int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in references) / n_items
    reference.backward()
    own = _grads(model)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert len(fast) == 2 * 7 * 2  # every LoRA A and B of 7 linear layers in 2 decoder layers
    for name, g in fast.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, own[name], rtol=1e-5, atol=1e-6)


def test_unpacked_training_uses_the_fast_step(lora_llama, tmp_path):
    """`medqa train` without packing trains through FastStep (so with logits only at labelled positions)."""
    from datasets import Dataset

    from medqa.config import load_config
    from medqa.runplan import setup_training

    cfg = load_config(None, [f"workdir={tmp_path}", "train.packing=false"])
    setup = setup_training(cfg, lora_llama, Dataset.from_list(_rows()), pad_id=0)
    assert isinstance(setup.fast_step, FastStep) and not setup.fast_step.compiled
    assert setup.describe()["attention"] == "sdpa"
