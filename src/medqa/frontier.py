"""The trade-off front: every kept adapter, scaled back after training, scored for its gain and what it keeps.

WiSE-FT (Wortsman et al. 2022) and the weight averaging that gave the best reward-forgetting front in Lin et al.
2024 ("Mitigating the Alignment Tax of RLHF") interpolate between the base and the tuned weights. For LoRA that
interpolation is exact and free: W = W0 + alpha * (s * B A), i.e. peft's `rescale_adapter_scale(model, alpha)`
(alpha 0 is the base model, 1 the adapter as trained; not exact for DoRA, whose magnitude is not linear in it).

`frontier(cfg, sources)` scores each source (the kept checkpoint of every trial and the plain fine-tune) at every
alpha in tune.frontier_alphas on the val answer loss and on the knowledge dev questions (`medqa.knowledge`: the
base model's scores cached once per workdir), marks the Pareto front (no other point is at least as good on every
measure and better on one), lets the rule (`medqa.selection`) choose from the front, scores the chosen point's
PubMedQA accuracy on all 500 dev questions (with a rule on accuracy the choice itself is made on them:
`check_on_dev`), and writes outputs/frontier/frontier.csv (one row per point),
frontier.png and the chosen adapter already scaled (its lora_B matrices times alpha: the saved adapter is the
in-memory scaled one), so evaluate, benchmark, ask, chat and export load it unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medqa.artifacts import atomic_dir, write_json
from medqa.knowledge import compare, knowledge_probe
from medqa.metrics import evaluate_answer_loss
from medqa.modeling import load_model, scoring_dtype
from medqa.plots import plot_frontier
from medqa.pubmedqa import CHOICES, score_knowledge, summarize
from medqa.schema import Config
from medqa.selection import Rule, candidate, choose
from medqa.workdir import load_split, paths

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TARGET_PERPLEXITY_DROP = 0.40  # the target box: answer perplexity at least 40% below the base model's


@dataclass
class Source:
    """A kept adapter: `name` (finetune, or the trial's id), its folder, and the step it was kept at."""

    name: str
    path: Path
    step: int | None = None
    params: dict | None = None  # the searched values of a trial


def knowledge_cost(point: dict, rule: Rule) -> tuple[float, ...]:
    """What the front minimises besides val answer loss, by tune.knowledge_measure (lower is better)."""
    cost = []
    if rule.knowledge_measure in ("abstract_loss", "both") and point.get("abstract_change") is not None:
        cost.append(point["abstract_change"])
    if rule.knowledge_measure in ("pubmedqa", "both") and point.get("knowledge_change") is not None:
        cost.append(-point["knowledge_change"])
    return tuple(cost)


def pareto(costs: list[tuple[float, ...]]) -> list[bool]:
    """True for each point no other point dominates (at least as low on every cost and lower on one)."""

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [not any(dominates(other, c) for other in costs) for c in costs]


def scale_adapter(src: Path, dst: Path, alpha: float) -> None:
    """Copy a saved LoRA adapter with its update scaled by alpha: every lora_B matrix times alpha (the update is
    s * B A, so this is exactly `rescale_adapter_scale`), in safetensors."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "adapter_config.json").read_text())
    if alpha != 1.0 and (config.get("modules_to_save") or config.get("bias", "none") != "none"):
        raise ValueError(
            f"{src}: an adapter with modules_to_save or trained biases is not the base model plus a scaled update; "
            "only alpha 1 is exact for it."
        )
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    scaled = {
        k: (v * alpha if "lora_B" in k or "lora_embedding_B" in k else v).contiguous() for k, v in tensors.items()
    }
    save_file(scaled, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})


def _uses_dora(path: Path) -> bool:
    return bool(json.loads((path / "adapter_config.json").read_text()).get("use_dora"))


def score_front(cfg: Config, sources: list[Source], tokenizer, val_ds, probe) -> list:
    """One row per (source, alpha), and the base model as alpha 0: val answer loss and the knowledge fields."""
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale

    rule = Rule.of(cfg)
    pad = tokenizer.pad_token_id
    bs = cfg.scoring.batch_size

    def answer(model) -> dict:
        m, _ = evaluate_answer_loss(model, val_ds, pad, bs, bootstrap_samples=0)
        return {"val_answer_loss": m["answer_loss"], "val_answer_perplexity": m["answer_perplexity"]}

    base = load_model(cfg)
    rows = [{"source": "base", "step": None, "alpha": 0.0, **answer(base)}]
    if probe is not None:
        base_scores = probe.base(base, tokenizer)
        rows[0].update(compare(base_scores, base_scores))
    model = None
    for i, src in enumerate(sources):
        name = f"s{i}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(src.path), adapter_name=name)
        else:
            model.load_adapter(str(src.path), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        alphas = [a for a in cfg.tune.frontier_alphas if a > 0] or [1.0]
        if _uses_dora(src.path) and alphas != [1.0]:
            log.warning("frontier: %s is a DoRA adapter, whose scaling is not exact: only alpha 1 is scored", src.name)
            alphas = [1.0]
        for alpha in alphas:
            with rescale_adapter_scale(model, alpha):
                row = {"source": src.name, "step": src.step, "alpha": alpha, **(src.params or {}), **answer(model)}
                if probe is not None:
                    row.update(compare(probe.scores(model, tokenizer), probe.base(model, tokenizer)))
            rows.append(row)
            log.info(
                "frontier: %s alpha %.2f: val answer_loss %.4f%s",
                src.name,
                alpha,
                row["val_answer_loss"],
                f", abstract loss {row['abstract_change']:+.2%}" if "abstract_change" in row else "",
            )
    base_loss = rows[0]["val_answer_loss"]
    for row in rows:
        row["best_val_answer_perplexity"] = row["val_answer_perplexity"]
        row["gain"] = base_loss - row["val_answer_loss"]
        row["answer_perplexity_change"] = math.exp(-row["gain"]) - 1.0
    front = pareto([(r["val_answer_loss"], *knowledge_cost(r, rule)) for r in rows])
    for row, on in zip(rows, front):
        row["on_front"] = on
        row["eligible"] = rule.eligible(_candidate(row))
        row["objective"] = rule.value(_candidate(row))
    return rows, model


def _candidate(row: dict) -> dict:
    return candidate(row, "val_answer_loss")


def _front(rows: list[dict]) -> list[int]:
    """The adapters on the front (alpha > 0); none there: every adapter point."""
    return [i for i, r in enumerate(rows) if r["on_front"] and r["alpha"] > 0] or [
        i for i, r in enumerate(rows) if r["alpha"] > 0
    ]


def choose_point(rows: list[dict], rule: Rule):
    """The rule's choice among the front's points (never the base model, alpha 0, when an adapter is on it)."""
    front = _front(rows)
    choice = choose([_candidate(rows[i]) for i in front], rule, "point of the frontier")
    return front[choice.index], choice


def check_on_dev(rows: list[dict], rule: Rule, score, checks: int):
    """With a rule that uses PubMedQA accuracy: the choice made on all the dev questions, not the noisy subset.
    The front's points (alpha > 0) within the rule's other limits (the abstract loss for `both`; all of them for
    `pubmedqa`), ordered by val answer loss, are searched by bisection for the lowest-loss point that keeps its
    accuracy within the limit on the dev questions `score(row)` scores (`final_knowledge` at that point): along the
    front more gain goes with more forgetting, so `checks` scorings cover 2**checks points, and a choice is always
    one that was checked. None passing: the nearest miss among those checked, said so. Each checked row gets
    dev_questions and dev_knowledge_change. Returns (index into rows, Choice, its final dict)."""
    from dataclasses import replace

    other = replace(rule, knowledge_measure="abstract_loss") if rule.knowledge_measure == "both" else None
    front = _front(rows)
    order = [i for i in front if other is None or other.eligible(_candidate(rows[i]))] or front
    order.sort(key=lambda i: rows[i]["val_answer_loss"])
    checked, lo, hi = [], 0, len(order) - 1
    while lo <= hi and len(checked) < checks:
        mid = (lo + hi) // 2
        row = rows[order[mid]]
        final = score(row)
        row.update(dev_questions=final["questions"], dev_knowledge_change=final["knowledge_change"])
        on_dev = {**_candidate(row), "knowledge_change": final["knowledge_change"]}
        checked.append((order[mid], final, on_dev))
        if rule.eligible(on_dev):
            hi = mid - 1  # a lower-loss point may keep it too
        else:
            lo = mid + 1
    what = f"point of the frontier (checked on {checked[0][1]['questions']} dev questions)"
    choice = choose([c[2] for c in checked], rule, what)
    if not choice.eligible:
        choice.message += (
            f" {len(checked)} of the front's {len(order)} points were checked (tune.final_knowledge_checks)."
        )
    index, final, _ = checked[choice.index]
    return index, choice, final


def final_knowledge(cfg: Config, model, tokenizer, questions: int) -> dict | None:
    """The chosen point's PubMedQA accuracy on `questions` dev questions (all 500 by default) beside the base
    model's (cached once per workdir), with answer shares, macro-F1 and the majority-answer baseline."""
    if not questions:
        return None
    probe = knowledge_probe(cfg, tokenizer, scoring_dtype(cfg), questions)
    now = score_knowledge(model, tokenizer, probe.items, cfg.scoring.batch_size)
    base = probe.base(model, tokenizer)
    out = {"questions": len(probe.items), **compare(now, base)}
    out["tuned"] = summarize(now, 0)
    out["base"] = summarize(base, 0)
    counts = np.bincount(now.gold, minlength=len(CHOICES))
    majority = int(counts.argmax())  # the first of equals: deterministic
    out["majority_answer"] = CHOICES[majority]
    out["majority_baseline_acc"] = float(counts[majority] / counts.sum())
    return out


@dataclass
class Front:
    rows: list[dict]  # one per point; the base model first
    chosen: int  # into rows
    choice: object  # medqa.selection.Choice
    final: dict | None  # the chosen point's PubMedQA accuracy on all dev questions, beside the base model's
    folder: Path

    def summary(self) -> dict:
        """What trial.json records of the front."""
        p = self.rows[self.chosen]
        return {
            "csv": str(self.folder / "frontier.csv"),
            "points": len(self.rows),
            "on_front": sum(r["on_front"] for r in self.rows),
            "alphas": sorted({r["alpha"] for r in self.rows}),
            "chosen": {k: v for k, v in p.items() if v is None or not isinstance(v, float) or v == v},
            "final_dev_pubmedqa": self.final,
        }


def run_frontier(cfg: Config, sources: list[Source], tokenizer) -> Front:
    """Score the front, choose from it, score the choice on all dev questions, write outputs/frontier/."""
    import pandas as pd
    from peft.helpers import rescale_adapter_scale

    if not sources:
        raise ValueError("the frontier needs at least one adapter")
    rule = Rule.of(cfg)
    val = load_split(cfg, "val")
    probe = knowledge_probe(cfg, tokenizer, scoring_dtype(cfg))
    rows, model = score_front(cfg, sources, tokenizer, val, probe)

    def final_at(point: dict) -> dict | None:
        model.set_adapter(f"s{[s.name for s in sources].index(point['source'])}")
        with rescale_adapter_scale(model, point["alpha"]):
            return final_knowledge(cfg, model, tokenizer, cfg.tune.final_knowledge_questions)

    if rule.uses_accuracy and rule.objective == "answer_loss_within_knowledge" and cfg.tune.final_knowledge_questions:
        chosen, choice, final = check_on_dev(rows, rule, final_at, cfg.tune.final_knowledge_checks)
    else:
        chosen, choice = choose_point(rows, rule)
        final = final_at(rows[chosen])
    point = rows[chosen]
    for row in rows:
        row["chosen"] = row is point
    folder = paths(cfg).frontier
    with atomic_dir(folder) as tmp:
        pd.DataFrame(rows).to_csv(tmp / "frontier.csv", index=False)
        plot_frontier(rows, rule, tmp / "frontier.png")
        write_json(tmp / "final_dev_pubmedqa.json", final or {})
    log.info(
        "frontier: %d points, %d on the front; chose %s at alpha %.2f (val answer_loss %.4f%s)",
        len(rows),
        sum(r["on_front"] for r in rows),
        point["source"],
        point["alpha"],
        point["val_answer_loss"],
        f", abstract loss {point['abstract_change']:+.2%}" if "abstract_change" in point else "",
    )
    return Front(rows, chosen, choice, final, folder)


def front_table(trial: dict):
    """The front's points (frontier.csv, those on the Pareto front) as a readable table, the chosen one marked."""
    import pandas as pd

    front = pd.read_csv(trial["frontier"]["csv"])
    keep = [
        c
        for c in (
            "source",
            "step",
            "alpha",
            "val_answer_perplexity",
            "answer_perplexity_change",
            "abstract_change",
            "knowledge_acc",
            "knowledge_change",
            "dev_knowledge_change",
            "choice_delta",
            "eligible",
            "chosen",
        )
        if c in front
    ]
    return front[front["on_front"]][keep].sort_values("answer_perplexity_change").reset_index(drop=True)


def final_table(trial: dict):
    """The chosen point and the base model on all the dev questions: accuracy, macro-F1, answer shares, the
    majority-answer baseline, the choice loss (-log p of the labelled answer among the three) and the abstract
    loss."""
    import pandas as pd

    final = (trial.get("frontier") or {}).get("final_dev_pubmedqa")
    if not final:
        return "Not scored: tune.final_knowledge_questions is 0 (or no frontier ran)."
    rows = {}
    choice = {"tuned": final.get("choice_loss")}
    choice["base"] = choice["tuned"] - final["choice_delta"] if choice["tuned"] is not None else None
    for name, key, loss in (
        ("base", "base", "abstract_base_loss"),
        (f"chosen ({trial.get('trial')}, alpha {trial.get('adapter_scale', 1):g})", "tuned", "abstract_loss"),
    ):
        s = final[key]
        rows[name] = {
            "questions": s["questions"],
            "accuracy": s["acc"],
            "macro-F1": s["macro_f1"],
            **{f"answered {c}": s["predicted_share"][c] for c in ("yes", "no", "maybe")},
            "choice loss": choice[key],
            "abstract loss": final.get(loss),
        }
    frame = pd.DataFrame(rows).T
    frame.attrs["majority baseline"] = final["majority_baseline_acc"]
    print(
        f"Always answering {final['majority_answer']!r}: {final['majority_baseline_acc']:.3f}. Change: accuracy "
        f"{final['knowledge_change']:+.3f}, abstract loss {final.get('abstract_change', float('nan')):+.2%}."
    )
    return frame


__all__ = [
    "TARGET_PERPLEXITY_DROP",
    "Source",
    "choose_point",
    "final_knowledge",
    "final_table",
    "front_table",
    "knowledge_cost",
    "pareto",
    "scale_adapter",
    "score_front",
]
