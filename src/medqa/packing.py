"""Sequence packing: several examples per training row, so compute goes to real tokens instead of padding.

Measured with `bench/bench.py` (`make bench`) on the 500 real HealthCareMagic records shipped in data/real/, as
`medqa prepare` tokenizes them with the BioGPT tokenizer shipped in assets/biogpt-tokenizer: the 410 train examples
are 96 to 512 tokens, median 227, mean 245, the prompt 47% of the tokens. Padding every example to 512 computes
~2.1x the real tokens; packing into rows of 512 tokens holds 1.95 examples per row and fills them to 0.933; rows
of 1,024 tokens hold 3.9 examples and fill to 0.980. (GenMedGPT's synthetic records are much shorter: with them
the 5,952 records of `make bench` fill 512-token rows to 0.99.)

Why 0.933 is the ceiling for rows of 512: a third of the real examples are longer than 256 tokens, so each of
those needs a row of its own and can share it only with an example short enough to fit beside it, and there are
too few of those. Best-fit decreasing (below) already uses the fewest rows possible on the real train split: 210,
where the linear-programming lower bound of bin packing (arc-flow relaxation) is 209.4 (`bench/bench.py` computes
it). No ordering of whole examples does better; only wider rows do (`pack_stats`; rows may be wider than
data.max_length, as positions restart at every example).

How it works:

1. `plan_packs(lengths, max_tokens)` assigns example indices to rows with best-fit decreasing (longest example
   first, each into the fullest row it still fits, else a new row).
2. `pack_examples(rows, max_tokens)` (or `pack_dataset(ds, max_tokens)` for a `datasets.Dataset`) concatenates
   each row's examples: `input_ids`, `labels`, `position_ids` that restart at 0 for every example, `length`.
   The first label of every example is forced to `IGNORE_INDEX`: the model would otherwise be asked to predict
   an example's first token from the end of the previous one. (Prepared examples already start with prompt
   labels, so this changes nothing for them; it is a guarantee, not a fix.)
3. `PackedCollator(pad_id)` pads a batch of packed rows to its longest row and builds a block-diagonal causal
   4D mask from the position ids, so no token attends to another example.

Why a 4D mask: BioGPT (transformers 5.x) calls `create_causal_mask` without `position_ids`, so transformers'
automatic packed-sequence detection (what `DataCollatorWithFlattening` relies on for Llama-family models) does
not apply; given only position ids, BioGPT would let examples attend to each other. A 4D mask passed as
`attention_mask` is used as-is by `create_causal_mask`, and an additive float mask (0 = attend, dtype min =
blocked) is correct for both the eager and the SDPA attention. `position_ids` must be passed too: BioGPT's
learned positional embedding then restarts at each example, exactly as when the example is alone.
`tests/test_packing.py` checks that every answer token's NLL is unchanged by packing.

Cost: the dense mask makes attention compute all L x L pairs of a packed row (not sum(l_i^2)); at 512 tokens
and hidden 1024 attention is a small share of the FLOPs, so the gain from not computing padding dominates.

Use with transformers' Trainer (dataset rows packed once, before training):

    train_packed = pack_dataset(train_ds, max_tokens=cfg.data.max_length)
    trainer = Trainer(..., train_dataset=train_packed, data_collator=PackedCollator(tokenizer.pad_token_id),
                      args=TrainingArguments(..., remove_unused_columns=False))

Each packed row holds ~max_tokens / mean length examples (1.95 at 512 tokens on the real records), so use a
batch size that many times smaller for the same examples per step. Evaluation stays unpacked (`medqa.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medqa.prompts import IGNORE_INDEX

PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "length", "num_examples", "example_index"]


def plan_packs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group example indices into rows of at most `max_tokens` tokens (best-fit decreasing).

    Deterministic. Every index appears exactly once; an example longer than `max_tokens` raises ValueError
    (prepare already cut examples to `data.max_length`, so pack with at least that budget)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than max_tokens={max_tokens} (e.g. index {too_long[0]} "
            f"with {lengths[too_long[0]]} tokens); pack with max_tokens >= data.max_length."
        )
    if any(n < 1 for n in lengths):
        raise ValueError("every example needs at least one token")
    packs: list[list[int]] = []
    # by_room[r] = rows with exactly r free tokens. Free space is an integer <= max_tokens, so finding the
    # fullest row that fits is a short upward scan instead of a search through every row (O(n) overall for
    # 100k examples instead of O(n * rows)).
    by_room: list[list[int]] = [[] for _ in range(max_tokens + 1)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        room = next((r for r in range(n, max_tokens + 1) if by_room[r]), None)
        if room is None:
            row, room = len(packs), max_tokens
            packs.append([])
        else:
            row = by_room[room].pop()
        packs[row].append(i)
        by_room[room - n].append(row)
    return packs


def pack_examples(rows: Sequence[Mapping[str, Any]], max_tokens: int) -> list[dict[str, list[int] | int]]:
    """Packed rows from tokenized examples (each with `input_ids` and `labels`; `length` is optional).

    Each packed row: `input_ids`, `labels` (the first label of every example set to IGNORE_INDEX),
    `position_ids` (0, 1, ... restarting at each example), `length` (tokens), `num_examples` and
    `example_index` (the indices in `rows`, in packed order)."""
    lengths = [len(r["input_ids"]) for r in rows]
    packed = []
    for group in plan_packs(lengths, max_tokens):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in group:
            ids, lab = list(rows[i]["input_ids"]), list(rows[i]["labels"])
            if len(ids) != len(lab):
                raise ValueError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
            input_ids += ids
            labels += [IGNORE_INDEX] + lab[1:]  # never predict an example's first token from the previous one
            position_ids += range(len(ids))
        packed.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                "length": len(input_ids),
                "num_examples": len(group),
                "example_index": list(group),
            }
        )
    return packed


def pack_dataset(ds, max_tokens: int):
    """`pack_examples` for a tokenized `datasets.Dataset` (as written by `medqa prepare`); returns a Dataset
    with PACKED_COLUMNS, whose `length` column works with Trainer's group-by-length sampling."""
    import datasets

    rows = [{"input_ids": ids, "labels": lab} for ids, lab in zip(ds["input_ids"], ds["labels"])]
    return datasets.Dataset.from_list(pack_examples(rows, max_tokens))


def block_causal_mask(position_ids, dtype=None):
    """Additive (batch, 1, L, L) mask: 0 where query i may attend key j (same example, j <= i), the dtype's
    minimum elsewhere. Examples are found from `position_ids`: a new one starts wherever it is 0."""
    import torch

    dtype = dtype or torch.float32
    segment = (position_ids == 0).cumsum(dim=1)  # (B, L): example number of each token within its row
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class PackedCollator:
    """Trainer `data_collator` for packed rows (from `pack_examples` / `pack_dataset`).

    Returns `input_ids` (right-padded with `pad_id`), `labels` (IGNORE_INDEX on padding), `position_ids` and,
    with `block_mask=True` (needed for BioGPT), the additive 4D `attention_mask` from `block_causal_mask` in
    `mask_dtype` (use the model's compute dtype, e.g. torch.bfloat16 for a bf16 model). Padding is one more
    "example" at the end of the row, with its own positions from 0, so it never touches a real token.

    `block_mask=False` returns no attention_mask: for models that detect packed sequences from position_ids
    themselves (Llama family in transformers 5), which then keep their fastest attention path. That detection
    only runs without a KV cache: call the model with use_cache=False (Trainer sets model.config.use_cache from
    TrainingArguments.use_cache, False by default).
    Rows without `position_ids` are treated as one example each, so unpacked rows work too.

    For static shapes (torch.compile), `pad_to_multiple_of=data.max_length` pads every row to max_length and
    `rows=N` pads every batch to N rows: then every batch of the epoch has the shape (N, max_length).
    """

    def __init__(
        self,
        pad_id: int,
        block_mask: bool = True,
        mask_dtype=None,
        pad_to_multiple_of: int | None = None,
        rows: int | None = None,
    ):
        self.pad_id = pad_id
        self.block_mask = block_mask
        self.mask_dtype = mask_dtype
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rows = rows

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.rows is not None:
            if len(rows) > self.rows:
                raise ValueError(f"a batch of {len(rows)} rows for a collator of {self.rows} rows per batch")
            # Static shape: the epoch's last, partial batch gets empty rows (all padding, no label), so the
            # compiled step sees one shape and the loss (a sum over labelled tokens) is unchanged.
            rows = list(rows) + [{"input_ids": [], "labels": []}] * (self.rows - len(rows))
        input_ids, labels, position_ids = [], [], []
        for r in rows:
            n, pad = len(r["input_ids"]), width - len(r["input_ids"])
            input_ids.append(list(r["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            pos = r.get("position_ids")
            position_ids.append(list(range(n) if pos is None else pos) + list(range(pad)))
        batch = {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(position_ids),
        }
        if self.block_mask:
            batch["attention_mask"] = block_causal_mask(batch["position_ids"], self.mask_dtype)
        return batch


def padding_efficiency(batches: Iterable[Sequence[int]], pad_to: int | None = None) -> float:
    """Real tokens / tokens computed, for batches given as the token count of each row. Each batch is padded
    to its longest row (dynamic padding), or to `pad_to` tokens per row (the original pad-to-512)."""
    real = computed = 0
    for rows in batches:
        real += sum(rows)
        computed += len(rows) * (pad_to or max(rows))
    return real / computed if computed else 0.0


def pack_stats(lengths: Sequence[int], row_tokens: int, rows_per_batch: int = 1) -> dict:
    """What packing these example lengths into rows of `row_tokens` computes, as `medqa train` runs it: every row
    padded to `row_tokens` (one static shape) and the last batch filled up to `rows_per_batch` with empty rows.

    `fill` = real tokens / (rows x row_tokens); `efficiency` = real tokens / tokens computed, the last batch's
    empty rows included (they count no real token)."""
    rows = len(plan_packs(lengths, row_tokens))
    real = sum(lengths)
    batches = -(-rows // rows_per_batch)
    return {
        "row_tokens": row_tokens,
        "rows": rows,
        "examples_per_row": len(lengths) / rows,
        "fill": real / (rows * row_tokens),
        "rows_per_batch": rows_per_batch,
        "efficiency": real / (batches * rows_per_batch * row_tokens),
    }
