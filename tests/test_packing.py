"""Sequence packing changes no metric: every answer token's NLL in a packed batch equals its NLL when the
example is scored alone, no label crosses an example boundary, and packing wastes almost nothing."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import REPO

from medqa.metrics import token_nll
from medqa.packing import (
    PackedCollator,
    block_causal_mask,
    pack_dataset,
    pack_examples,
    pack_stats,
    padding_efficiency,
    plan_packs,
)
from medqa.prompts import IGNORE_INDEX

PAD = 1


def tiny_biogpt(attn: str):
    from transformers import BioGptConfig, BioGptForCausalLM

    torch.manual_seed(0)
    cfg = BioGptConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=PAD,
    )
    return BioGptForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def make_rows(n: int = 13, seed: int = 0, label_everything: bool = False) -> list[dict]:
    """Examples shaped like `medqa prepare` output: `</s>` (id 2), prompt, answer; labels -100 on the prompt.
    With `label_everything`, every token is labelled (the first included), to test the boundary rule."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p, a = int(rng.integers(3, 12)), int(rng.integers(2, 20))
        ids = [2] + rng.integers(4, 99, size=p + a - 1).tolist()
        labels = list(ids) if label_everything else [IGNORE_INDEX] * p + ids[p:]
        rows.append({"id": f"e{i}", "input_ids": ids, "labels": labels, "length": p + a})
    return rows


def alone_nll(model, row: dict) -> np.ndarray:
    """Per-position NLL of one example scored by itself, no padding, no mask (label positions 1..n-1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
    return token_nll(logits, torch.tensor([row["labels"]]))[0].numpy()


def packed_nll(model, rows: list[dict], packed: list[dict], collator: PackedCollator) -> list[np.ndarray]:
    """Per-position NLL of each example in `rows`, cut back out of one forward pass over the packed batch."""
    batch = collator(packed)
    with torch.no_grad():
        # use_cache=False as in training (Trainer sets it): with a cache transformers skips packed-sequence
        # detection from position_ids (matters for block_mask=False only).
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    nll = token_nll(logits, batch["labels"]).numpy()
    out: dict[int, np.ndarray] = {}
    for r, row in enumerate(packed):
        start = 0
        for i in row["example_index"]:
            n = len(rows[i]["input_ids"])
            out[i] = nll[r, start : start + n - 1]  # labels start+1 .. start+n-1, each predicted from inside i
            start += n
    return [out[i] for i in range(len(rows))]


def test_plan_packs_uses_each_example_once_within_budget():
    lengths = np.random.default_rng(1).integers(1, 60, size=500).tolist()
    packs = plan_packs(lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert plan_packs(lengths, 64) == packs  # deterministic
    assert len(packs) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing leaves little room unused


def test_plan_packs_rejects_examples_over_budget():
    with pytest.raises(ValueError, match="longer than max_tokens=8"):
        plan_packs([3, 9, 4], 8)


def test_packed_row_layout():
    rows = make_rows(20)
    packed = pack_examples(rows, 48)
    assert sorted(i for p in packed for i in p["example_index"]) == list(range(20))
    assert any(p["num_examples"] > 1 for p in packed)
    for p in packed:
        assert p["length"] == len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= 48
        start = 0
        for i in p["example_index"]:
            n = len(rows[i]["input_ids"])
            assert p["input_ids"][start : start + n] == rows[i]["input_ids"]
            assert p["position_ids"][start : start + n] == list(range(n))
            assert p["labels"][start] == IGNORE_INDEX
            assert p["labels"][start + 1 : start + n] == rows[i]["labels"][1:]
            start += n


def test_block_causal_mask_blocks_other_examples_and_the_future():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(pos)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_answer_nll_equals_scoring_each_example_alone(attn):
    model = tiny_biogpt(attn)
    rows = make_rows(13)
    packed = pack_examples(rows, 48)
    assert len({p["length"] for p in packed}) > 1  # the batch needs padding too
    got = packed_nll(model, rows, packed, PackedCollator(PAD))
    for row, nll in zip(rows, got):
        want = alone_nll(model, row)
        answer = np.array(row["labels"][1:]) != IGNORE_INDEX
        np.testing.assert_allclose(nll[answer], want[answer], atol=1e-4)

    # Sanity check of the test itself: without the block mask BioGPT lets examples see each other.
    leaky = packed_nll(model, rows, packed, PackedCollator(PAD, block_mask=False))
    worst = max(np.abs(a - alone_nll(model, r)).max() for a, r in zip(leaky, rows))
    assert worst > 1e-2


def test_training_loss_summed_over_answer_tokens_is_identical():
    """The loss the Trainer optimises (the model's own, from `labels`) covers exactly the same answer tokens
    with the same NLL: mean loss x answer tokens equals the sum over examples scored alone."""
    model = tiny_biogpt("sdpa")
    rows = make_rows(13, seed=3)
    batch = PackedCollator(PAD)(pack_examples(rows, 64))
    with torch.no_grad():
        loss = model(**batch).loss.item()
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    want = sum(alone_nll(model, r).sum() for r in rows)
    assert n_tokens == sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    assert loss * n_tokens == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_no_label_crosses_an_example_boundary():
    """Even when an example labels its first token, packing masks it: that token would be predicted from the
    previous example. Every other labelled token keeps its NLL."""
    model = tiny_biogpt("sdpa")
    rows = make_rows(13, seed=5, label_everything=True)
    packed = pack_examples(rows, 48)
    batch = PackedCollator(PAD)(packed)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == IGNORE_INDEX).all()
    # Every labelled position t is predicted from t-1, inside the same example: position_ids[t] > 0.
    labelled = batch["labels"] != IGNORE_INDEX
    assert (batch["position_ids"][labelled] > 0).all()
    for row, nll in zip(rows, packed_nll(model, rows, packed, PackedCollator(PAD))):
        np.testing.assert_allclose(nll, alone_nll(model, row), atol=1e-4)


@pytest.mark.parametrize("median", [93, 225])  # GenMedGPT-like short examples; HealthCareMagic-like (real: 227)
def test_padding_efficiency_on_realistic_lengths(median):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(median), 0.5, size=4000), 38, 512).astype(int).tolist()
    totals = [sum(lengths[i] for i in p) for p in plan_packs(lengths, 512)]
    order = rng.permutation(len(totals))  # Trainer's random sampler over packed rows, batches of 8 rows
    batches = [[totals[j] for j in order[k : k + 8]] for k in range(0, len(order), 8)]
    assert padding_efficiency(batches) > 0.95
    assert padding_efficiency([lengths[k : k + 8] for k in range(0, 4000, 8)], pad_to=512) < 0.5


@pytest.fixture(scope="module")
def real_train_lengths(real_500, biogpt_tokenizer_dir, tmp_path_factory) -> list[int]:
    """Token counts of the real train split as `medqa prepare` tokenizes the 500 shipped records with the
    shipped BioGPT tokenizer."""
    import datasets

    from medqa.config import load_config
    from medqa.prepare import prepare

    workdir = tmp_path_factory.mktemp("real-packing")
    prepare(
        load_config(
            None, [f"workdir={workdir}", f"data.source={real_500}", f"model.name_or_path={biogpt_tokenizer_dir}"]
        )
    )
    return [len(ids) for ids in datasets.load_from_disk(str(workdir / "tokenized" / "tokenized_train"))["input_ids"]]


def test_packing_the_real_records(real_train_lengths):
    """On the real records rows of 512 tokens cannot be filled beyond ~0.93 by any packing of whole examples
    (best-fit decreasing already reaches the bin-packing lower bound); rows of 1,024 tokens reach >= 0.97, counted
    as `medqa train` computes them: every row padded to its full width, the last batch's empty rows included."""
    lengths = real_train_lengths
    assert len(lengths) > 400 and max(lengths) <= 512
    for width in (512, 1024):
        packs = plan_packs(lengths, width)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths)))  # every example exactly once
        assert all(sum(lengths[i] for i in p) <= width for p in packs)
    narrow, wide = pack_stats(lengths, 512, rows_per_batch=4), pack_stats(lengths, 1024, rows_per_batch=2)
    assert wide["efficiency"] >= 0.97
    assert narrow["efficiency"] < 0.95 and narrow["fill"] == pytest.approx(sum(lengths) / (narrow["rows"] * 512))
    # Why 512 stays below: the examples over 256 tokens each need a row, and best-fit decreasing is optimal here
    # (its row count is the ceiling of the arc-flow linear-programming bound, computed by bench/bench.py).
    spec = importlib.util.spec_from_file_location("medqa_bench", REPO / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bound = bench.packing_lower_bound(lengths, 512)
    if bound is None:
        pytest.skip("scipy is not installed: the lower bound was not computed")
    assert narrow["rows"] == math.ceil(bound - 1e-6)


def test_trainer_trains_on_a_packed_dataset(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    model = tiny_biogpt("sdpa").train()
    train = pack_dataset(datasets.Dataset.from_list(make_rows(40)), 64)
    assert set(train.column_names) >= {"input_ids", "labels", "position_ids", "length"}
    before = model.biogpt.layers[0].fc1.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=PackedCollator(PAD))
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert not torch.equal(before, model.biogpt.layers[0].fc1.weight)


def test_position_ids_alone_suffice_for_llama_family():
    """block_mask=False: transformers detects packed sequences from position_ids for Llama-family models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    rows = make_rows(13, seed=7)
    packed = pack_examples(rows, 48)
    for row, nll in zip(rows, packed_nll(model, rows, packed, PackedCollator(PAD, block_mask=False))):
        answer = np.array(row["labels"][1:]) != IGNORE_INDEX
        np.testing.assert_allclose(nll[answer], alone_nll(model, row)[answer], atol=1e-4)
