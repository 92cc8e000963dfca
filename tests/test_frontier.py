"""The trade-off front (`medqa.frontier`): an adapter scaled after training is exact at its ends (alpha 0 is the base
model, 1 the adapter), the saved scaled adapter is the in-memory scaled one, and the front keeps exactly the points
no other point dominates."""

from __future__ import annotations

import pytest
import torch

from medqa.frontier import knowledge_cost, pareto, scale_adapter
from medqa.selection import Rule


def _lora(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking update (peft starts B at 0)
    model.save_pretrained(tmp_path / "adapter")
    return model.eval()


def test_alpha_ends_and_saved_scaled_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from peft.helpers import rescale_adapter_scale
    from transformers import AutoModelForCausalLM

    model = _lora(tiny_model_dir, tmp_path)
    ids = torch.randint(5, 500, (2, 24))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with rescale_adapter_scale(model, 0.0):
            zero = model(input_ids=ids).logits
        with rescale_adapter_scale(model, 1.0):
            one = model(input_ids=ids).logits
        with rescale_adapter_scale(model, 0.6):
            scaled = model(input_ids=ids).logits
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the model
    assert torch.allclose(zero, base, atol=1e-6) and torch.allclose(one, tuned, atol=1e-6)
    assert not torch.allclose(scaled, tuned, atol=1e-4) and not torch.allclose(scaled, base, atol=1e-4)
    scale_adapter(tmp_path / "adapter", tmp_path / "scaled", 0.6)
    fresh = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    saved = PeftModel.from_pretrained(fresh, str(tmp_path / "scaled")).eval()
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, scaled, atol=1e-5)


def test_front_excludes_exactly_the_dominated_points():
    # (val answer loss, abstract change): lower is better on both
    points = [(1.0, 0.05), (1.2, 0.01), (1.1, 0.03), (1.3, 0.00), (1.2, 0.02), (1.1, 0.03), (1.4, 0.00), (2.0, -0.01)]
    assert pareto(points) == [True, True, True, True, False, True, False, True]
    # dominated by (1.2, 0.01): (1.2, 0.02); by (1.3, 0.00): (1.4, 0.00); equal points dominate neither
    three = [(1.0, 0.0, 0.0), (1.0, 0.0, 0.1), (0.9, 0.1, 0.1)]
    assert pareto(three) == [True, False, True]


def test_knowledge_cost_follows_the_measure():
    point = {"abstract_change": 0.03, "knowledge_change": -0.02}
    assert knowledge_cost(point, Rule("answer_loss_within_knowledge", "abstract_loss")) == (0.03,)
    assert knowledge_cost(point, Rule("answer_loss_within_knowledge", "pubmedqa")) == (0.02,)
    assert knowledge_cost(point, Rule("answer_loss_within_knowledge", "both")) == (0.03, 0.02)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_scaled_adapter_file_is_b_times_alpha(tiny_model_dir, tmp_path, alpha):
    from safetensors.torch import load_file

    _lora(tiny_model_dir, tmp_path)
    scale_adapter(tmp_path / "adapter", tmp_path / "scaled", alpha)
    before = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "scaled" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any("lora_B" in k for k in before)
    for k in before:
        assert torch.equal(after[k], before[k] * alpha if "lora_B" in k else before[k])


def test_plain_fine_tune_on_the_front_is_saved_scaled_with_its_own_config(tmp_path):
    """The plain fine-tune (outputs/finetune) joins the front when it was trained on this model and data; chosen,
    it is saved to outputs/best scaled, with its own settings (from its manifest) and the point's numbers."""
    import json

    from conftest import demo_config, prepare_demo

    from medqa.frontier import run_frontier
    from medqa.modeling import load_tokenizer
    from medqa.selection import Rule
    from medqa.train import train
    from medqa.tunechoice import FINETUNE, _finetune_source, save_best
    from medqa.workdir import paths

    run = ["train.max_steps=6", "train.eval_steps=3", "scoring.bootstrap_samples=0", "train.report_to=[]"]
    prepare_demo(tmp_path, *run)
    cfg = demo_config(tmp_path, *run, "train.learning_rate=0.02", "tune.frontier_alphas=[0, 0.5, 1]")
    train(cfg)
    tokenizer = load_tokenizer(cfg)
    sources = _finetune_source(cfg, tokenizer)
    assert [s.name for s in sources] == [FINETUNE]
    front = run_frontier(cfg, sources, tokenizer)
    assert [r["alpha"] for r in front.rows] == [0.0, 0.5, 1.0]
    point = front.rows[front.chosen]
    best = {"trial": FINETUNE, "adapter_scale": point["alpha"], "best_val_answer_loss": point["val_answer_loss"]}
    save_best(cfg, tmp_path / "outputs" / "ray_x", sources[0], best, front, front.choice, tokenizer)
    saved = json.loads((paths(cfg).best / "trial.json").read_text())
    assert saved["adapter_scale"] == point["alpha"] and saved["trial"] == FINETUNE
    assert saved["config"]["train"]["learning_rate"] == 0.02 and saved["frontier"]["points"] == 3
    assert saved["selection"]["objective"] == Rule.of(cfg).objective
    assert (paths(cfg).frontier / "frontier.csv").exists() and (paths(cfg).best / "adapter_model.safetensors").exists()
    # a fine-tune of another base model (or data) is not a source
    from medqa.manifest import MANIFEST

    manifest = paths(cfg).finetune / MANIFEST
    record = json.loads(manifest.read_text())
    record["inputs"]["base_model"] = "another model"
    manifest.write_text(json.dumps(record))
    assert _finetune_source(cfg, tokenizer) == []


def test_notebook_tables_show_the_front_and_the_dev_verdict(tmp_path, capsys):
    """Notebook 4's views of the front: only the points on it, the chosen one marked, sorted by gain; and the
    chosen point beside the base on all dev questions (the base's choice loss recovered from the paired delta)."""
    import pandas as pd

    from medqa.frontier import final_table, front_table

    rows = [
        {"source": "base", "alpha": 0.0, "answer_perplexity_change": 0.0, "choice_delta": 0.0, "on_front": True},
        {"source": "t1", "alpha": 1.0, "answer_perplexity_change": -0.4, "choice_delta": -0.1, "on_front": True},
        {"source": "t1", "alpha": 0.5, "answer_perplexity_change": -0.2, "choice_delta": 0.2, "on_front": False},
    ]
    pd.DataFrame([{**r, "chosen": r["alpha"] == 1.0} for r in rows]).to_csv(tmp_path / "f.csv", index=False)
    share = {"yes": 0.5, "no": 0.4, "maybe": 0.1}
    side = {"questions": 500, "acc": 0.5, "macro_f1": 0.4, "predicted_share": share}
    final = {
        "tuned": {**side, "acc": 0.46},
        "base": side,
        "choice_loss": 0.9,
        "choice_delta": -0.1,
        "knowledge_change": -0.04,
        "abstract_change": 0.01,
        "abstract_loss": 2.0,
        "abstract_base_loss": 1.98,
        "majority_answer": "yes",
        "majority_baseline_acc": 0.55,
    }
    trial = {
        "trial": "t1",
        "adapter_scale": 1.0,
        "frontier": {"csv": str(tmp_path / "f.csv"), "final_dev_pubmedqa": final},
    }
    front = front_table(trial)
    assert list(front["alpha"]) == [1.0, 0.0] and list(front["chosen"]) == [True, False]
    assert "choice_delta" in front and "on_front" not in front
    table = final_table(trial)
    assert table.loc["base", "choice loss"] == pytest.approx(1.0) and table.iloc[1]["accuracy"] == 0.46
    assert "Always answering 'yes': 0.550" in capsys.readouterr().out
    assert final_table({"frontier": None}).startswith("Not scored")


def _point(source, loss, abstract=0.0, acc=0.0, alpha=1.0):
    return {
        "source": source,
        "alpha": alpha,
        "val_answer_loss": loss,
        "abstract_change": abstract,
        "abstract_delta": abstract,
        "knowledge_change": acc,  # on the small subset: ignored by the check
        "on_front": True,
    }


def test_a_rule_on_accuracy_chooses_on_all_dev_questions():
    """With tune.knowledge_measure pubmedqa or both, the front's points (within the other limits) are searched by
    bisection over their val answer loss on all the dev questions, for the lowest-loss one that keeps accuracy;
    at most `checks` scorings, else the nearest miss among them, said so. The subset's accuracy plays no part."""
    from medqa.frontier import check_on_dev

    on_dev = {"a": -0.08, "b": -0.05, "c": -0.03, "d": -0.01, "e": 0.0}
    rows = [_point("base", 2.0, alpha=0.0)] + [
        _point(name, 1.0 + k / 10, acc=0.1 if name == "a" else -0.2) for k, name in enumerate(on_dev)
    ]
    scored = []

    def score(row):
        scored.append(row["source"])
        return {"questions": 500, "knowledge_change": on_dev[row["source"]]}

    pubmedqa = Rule("answer_loss_within_knowledge", "pubmedqa", max_knowledge_drop=0.02)
    index, choice, final = check_on_dev(rows, pubmedqa, score, checks=3)
    assert rows[index]["source"] == "d" and choice.eligible and scored == ["c", "d"]
    assert final["knowledge_change"] == -0.01 and rows[3]["dev_knowledge_change"] == -0.03
    assert "500 dev questions" in choice.message

    scored.clear()
    index, choice, _ = check_on_dev(rows, pubmedqa, score, checks=1)
    assert rows[index]["source"] == "c" and not choice.eligible and scored == ["c"]
    assert "1 of the front's 5 points were checked" in choice.message

    scored.clear()
    rows[4]["abstract_change"] = rows[4]["abstract_delta"] = 0.05  # d forgot on the abstracts: not a candidate
    both = Rule("answer_loss_within_knowledge", "both", max_knowledge_drop=0.02, max_abstract_loss_rise=0.02)
    index, choice, _ = check_on_dev(rows, both, score, checks=3)
    assert scored == ["b", "c", "e"] and rows[index]["source"] == "e" and choice.eligible
