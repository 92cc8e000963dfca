"""Choosing the adapter by its gain and by what it keeps (tune.objective): the rule on made-up metrics, the same
rule in the Trainer (best checkpoint), in Ray Tune (reported metric, ASHA, kept checkpoint) and the best trial;
knowledge scores logged during training equal scoring the saved adapter afterwards."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import demo_config, prepare_demo

from medqa.errors import ConfigError
from medqa.selection import INELIGIBLE, MISS_SCALE, Rule, choose

WITHIN = Rule("answer_loss_within_knowledge", knowledge_measure="pubmedqa", max_knowledge_drop=0.02)
ABSTRACT = Rule("answer_loss_within_knowledge", knowledge_measure="abstract_loss", max_abstract_loss_rise=0.02)
BOTH = Rule("answer_loss_within_knowledge", knowledge_measure="both")
# made-up trials: answer_loss and PubMedQA dev accuracy change against the base model
TRIALS = [
    {"answer_loss": 1.00, "knowledge_change": -0.10},  # gains most, forgets most
    {"answer_loss": 1.20, "knowledge_change": -0.01},  # the best that keeps enough
    {"answer_loss": 1.10, "knowledge_change": -0.03},  # just over the limit
    {"answer_loss": 1.50, "knowledge_change": +0.02},
]  # keeps everything, gains least


def _acc(loss, change):
    return {"answer_loss": loss, "knowledge_change": change}


def test_each_rule_picks_its_trial():
    assert choose(TRIALS, Rule()).index == 0  # lowest val answer_loss
    choice = choose(TRIALS, WITHIN)
    assert choice.index == 1 and choice.eligible
    assert [WITHIN.eligible(t) for t in TRIALS] == [False, True, False, True]
    # weighted on accuracy: loss - w * change; w = 10 makes forgetting 0.1 cost 1 nat
    weighted = Rule("weighted", knowledge_measure="pubmedqa", accuracy_weight=10.0)
    assert choose(TRIALS, weighted).index == 1  # 2.0, 1.3, 1.4, 1.3 -> first of equals
    assert choose(TRIALS, Rule("weighted", knowledge_measure="pubmedqa", accuracy_weight=0.0)).index == 0
    assert weighted.value(_acc(1.1, -0.03)) == pytest.approx(1.4)


def test_abstract_loss_rule_and_both():
    trials = [
        {"answer_loss": 1.0, "abstract_change": 0.05, "abstract_delta": 0.10, "knowledge_change": 0.0},
        {"answer_loss": 1.2, "abstract_change": 0.01, "abstract_delta": 0.02, "knowledge_change": -0.04},
        {"answer_loss": 1.3, "abstract_change": 0.015, "abstract_delta": 0.03, "knowledge_change": -0.01},
    ]
    assert choose(trials, ABSTRACT).index == 1  # 1.0 rose 5% > 2%
    assert choose(trials, BOTH).index == 2  # 1 also lost 4 points of accuracy
    # weighted on abstract loss: 25 x the relative change (a 2% rise costs 0.5 nats)
    w = Rule("weighted", knowledge_measure="abstract_loss")
    assert [w.value(t) for t in trials] == pytest.approx([2.25, 1.45, 1.675])
    assert choose(trials, w).index == 1
    with pytest.raises(ValueError, match="needs abstract_change"):
        ABSTRACT.value({"answer_loss": 1.0, "knowledge_change": 0.0})


def test_a_drop_equal_to_the_limit_is_eligible():
    change = 0.40 - 0.42  # accuracies are k / n: -0.020000000000000018 in floating point
    assert WITHIN.eligible(_acc(1.3, change)) and not WITHIN.eligible(_acc(1.3, 0.40 - 0.43))
    assert WITHIN.value(_acc(1.3, change)) == 1.3
    assert WITHIN.value(_acc(1.3, -0.03)) == pytest.approx(1.3 + INELIGIBLE + MISS_SCALE * 0.01)


def test_near_misses_rank_before_far_misses_then_by_loss(caplog):
    """None within the limit: the nearest miss is chosen (not the lowest answer loss, the most forgetful), equal
    misses by answer loss; the Trainer and ASHA see the same order through the value."""
    forgetful = [_acc(1.3, -0.05), _acc(1.1, -0.20), _acc(1.2, -0.04), _acc(1.25, -0.04)]
    values = [WITHIN.value(t) for t in forgetful]
    assert sorted(range(4), key=values.__getitem__) == [2, 3, 0, 1]
    with caplog.at_level(logging.WARNING, logger="medqa.selection"):
        choice = choose(forgetful, WITHIN, "trial")
    assert choice.index == 2 and not choice.eligible and choose(forgetful, Rule()).index == 1
    assert "No trial kept its knowledge within the limits" in choice.message
    assert "nearest miss" in choice.message and "tune.max_knowledge_drop" in choice.message
    assert "accuracy change -0.040" in choice.message
    assert choice.message in caplog.text
    # any eligible candidate beats every miss, whatever its loss
    assert choose([*forgetful, _acc(9.0, 0.0)], WITHIN).index == 4


def test_knowledge_rules_need_knowledge_questions(tmp_path):
    with pytest.raises(ConfigError, match="scoring.knowledge_questions"):
        demo_config(tmp_path, "scoring.knowledge_questions=0", "tune.objective=weighted")
    with pytest.raises(ConfigError, match="tune.objective must be one of"):
        demo_config(tmp_path, "tune.objective=lowest_loss")
    with pytest.raises(ConfigError, match="scoring.knowledge_questions must be between"):
        demo_config(tmp_path, "scoring.knowledge_questions=501")
    with pytest.raises(ValueError, match="needs knowledge_change"):
        WITHIN.value({"answer_loss": 1.0})


def test_trainer_tune_and_asha_use_one_metric(tmp_path, monkeypatch):
    """The Trainer keeps the checkpoint with the lowest eval_objective; each trial reports it as val_objective,
    which Tune's config (hence ASHA) and the per-trial checkpoint choice name."""
    import sys
    import types

    from ray.tune.schedulers import ASHAScheduler

    from medqa.train import _training_args
    from medqa.trainer import ReportToTune, tune_report
    from medqa.tune import METRIC, tune_config

    # without a frontier (with one, trials compete on val answer loss: test_asha_lets_the_longest_searched_trial_finish)
    cfg = demo_config(
        tmp_path,
        "tune.objective=answer_loss_within_knowledge",
        "tune.knowledge_measure=pubmedqa",
        "tune.frontier_alphas=[]",
    )
    args = _training_args(cfg, tmp_path, False, None)
    assert args.metric_for_best_model == "eval_objective" and not args.greater_is_better
    tc = tune_config(cfg, total_steps=120)
    assert tc.metric == METRIC == "val_objective" and tc.mode == "min"
    assert isinstance(tc.scheduler, ASHAScheduler) and tc.scheduler._time_attr == "step"
    # ASHA compares what the trial reports under tc.metric: the Trainer's eval_objective
    metrics = {
        "eval_answer_loss": 1.1,
        "eval_answer_perplexity": 3.0,
        "eval_knowledge_change": -0.03,
        "eval_objective": WITHIN.value(_acc(1.1, -0.03)),
    }
    reported = []
    fake_tune = types.SimpleNamespace(
        report=lambda m, checkpoint=None: reported.append(m),
        Checkpoint=types.SimpleNamespace(from_directory=lambda d: d),
    )
    monkeypatch.setitem(sys.modules, "ray.tune", fake_tune)
    monkeypatch.setattr(sys.modules["ray"], "tune", fake_tune, raising=False)
    model = types.SimpleNamespace(save_pretrained=lambda d: None)
    state = types.SimpleNamespace(global_step=40, max_steps=120)
    ReportToTune().on_evaluate(None, state, None, metrics=metrics, model=model)
    assert reported == [tune_report(metrics, 40, 120)]
    assert reported[0][tc.metric] == metrics["eval_objective"] > INELIGIBLE
    assert reported[0]["val_answer_loss"] == 1.1 and reported[0]["step"] == 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("select"))


RUN = [
    "train.max_steps=8",
    "train.eval_steps=2",
    "train.logging_steps=2",
    "scoring.bootstrap_samples=0",
    "scoring.knowledge_questions=6",
    "train.report_to=[]",
]


def _scripted(monkeypatch, losses, changes):
    """Make the Trainer's evaluations return made-up answer losses and knowledge changes, in turn."""
    from medqa import trainer as tr

    calls = {"loss": 0, "knowledge": 0}

    def fake_loss(*a, **kw):
        i = calls["loss"] = calls["loss"] + 1
        return {"answer_loss": losses[i - 1], "answer_perplexity": 2.0}, None

    def fake_knowledge(self):
        i = calls["knowledge"] = calls["knowledge"] + 1
        return {"knowledge_acc": 0.5 + changes[i - 1], "knowledge_base_acc": 0.5, "knowledge_change": changes[i - 1]}

    monkeypatch.setattr(tr, "evaluate_answer_loss", fake_loss)
    monkeypatch.setattr(tr.AnswerLossTrainer, "_knowledge", fake_knowledge)


@pytest.mark.parametrize(
    "changes, step, eligible",
    [
        ([0.0, -0.01, -0.05, -0.10], 4, True),  # steps 6, 8 gain more but forget too much
        ([-0.05, -0.06, -0.08, -0.10], 2, False),  # none keeps enough: the nearest miss, with the message
    ],
)
def test_trainer_keeps_the_checkpoint_the_rule_picks(prepared, monkeypatch, changes, step, eligible, caplog):
    from medqa.train import train

    losses = [3.0, 2.0, 1.5, 1.0]
    _scripted(monkeypatch, losses, changes)
    cfg = demo_config(prepared, *RUN, "tune.objective=answer_loss_within_knowledge", "tune.knowledge_measure=pubmedqa")
    with caplog.at_level(logging.WARNING, logger="medqa.selection"):
        result = train(cfg)
    evals = [r for r in result.history if "eval_objective" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert [r["eval_objective"] for r in evals] == [WITHIN.value(_acc(a, c)) for a, c in zip(losses, changes)]
    assert result.metrics["best_checkpoint"].endswith(f"checkpoint-{step}")
    pick = choose([{"answer_loss": a, "knowledge_change": c} for a, c in zip(losses, changes)], WITHIN)
    assert evals[pick.index]["step"] == step  # the function tune uses agrees with the Trainer's choice
    sel = result.metrics["selection"]
    assert (
        sel["checkpoint"]["step"] == step
        and sel["eligible"] is eligible
        and sel["objective"] == "answer_loss_within_knowledge"
    )
    assert result.metrics["best_val_answer_loss"] == losses[step // 2 - 1]
    assert ("No checkpoint kept its knowledge" in caplog.text) is not eligible


def test_knowledge_in_metrics_jsonl_equals_scoring_the_saved_adapter(prepared):
    """The in-training knowledge scores (and the base model's) are what scoring the same dev questions with the
    saved adapter (and the base model) gives after training."""
    from medqa.modeling import load_adapter_model, load_model, load_tokenizer
    from medqa.pubmedqa import accuracy, dev_questions, score_items
    from medqa.train import train
    from medqa.workdir import adapter_inputs

    cfg = demo_config(prepared, *RUN, "train.max_steps=10", "train.eval_steps=5")
    result = train(cfg)
    rows = [json.loads(x) for x in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_answer_loss" in r]
    assert evals and all(
        {
            "eval_knowledge_acc",
            "eval_knowledge_acc_norm",
            "eval_knowledge_base_acc",
            "eval_knowledge_change",
            "eval_objective",
        }
        <= set(r)
        for r in evals
    )
    kept = next(r for r in evals if r["step"] == result.metrics["selection"]["checkpoint"]["step"])
    assert kept["eval_objective"] == kept["eval_answer_loss"]  # the default rule
    items = dev_questions(cfg.scoring.knowledge_questions, cfg.seed)
    tokenizer = load_tokenizer(cfg)
    adapter = load_adapter_model(cfg, result.out_dir, adapter_inputs(cfg, tokenizer))
    after = accuracy(score_items(adapter, tokenizer, items, cfg.scoring.batch_size))
    base = accuracy(score_items(load_model(cfg), tokenizer, items, cfg.scoring.batch_size))
    assert kept["eval_knowledge_acc"] == after["acc"] and kept["eval_knowledge_acc_norm"] == after["acc_norm"]
    assert kept["eval_knowledge_base_acc"] == base["acc"] and kept["eval_knowledge_base_acc_norm"] == base["acc_norm"]
    assert kept["eval_knowledge_change"] == pytest.approx(after["acc"] - base["acc"])
    assert result.metrics["selection"]["checkpoint"]["knowledge_acc"] == after["acc"]
    assert (result.out_dir / "loss_curves.png").exists()


def test_tradeoff_plot_and_frontier(tmp_path):
    from medqa.plots import pareto_front, plot_tradeoff

    points = [(0.5, -0.10), (0.3, -0.01), (0.2, -0.03), (0.1, 0.02), (0.3, -0.05)]
    assert pareto_front(points) == [3, 1, 0]  # by gain; (0.2, -0.03) and (0.3, -0.05) are beaten
    trials = [
        {"trial": f"t{i}", "gain": g, "knowledge_change": c, "eligible": WITHIN.eligible(_acc(1, c)), "chosen": i == 1}
        for i, (g, c) in enumerate(points)
    ]
    plot_tradeoff(trials, 0.02, tmp_path / "tradeoff.png")
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_asha_lets_the_longest_searched_trial_finish(prepared):
    """tune.max_steps searched: ASHA's max_t is the longest choice's step count (a whole epoch for 0), not the base
    config's train.max_steps; with a frontier, trials compete on val answer loss and keep their lowest-loss
    checkpoint (the frontier scales them back and applies the rule)."""
    from medqa.runplan import planned_steps
    from medqa.tune import FRONTIER_METRIC, METRIC, metric, search_steps, tune_config
    from medqa.workdir import load_split

    cfg = demo_config(prepared, "train.max_steps=4", "tune.max_steps=[0, 6]")
    ds = load_split(cfg, "train")
    epoch = planned_steps(demo_config(prepared, "train.max_steps=0"), ds)
    assert epoch > 6 and search_steps(cfg, ds) == epoch
    assert search_steps(demo_config(prepared, "train.max_steps=4"), ds) == 4
    assert tune_config(cfg, search_steps(cfg, ds)).scheduler._max_t == epoch
    assert metric(cfg) == FRONTIER_METRIC and metric(demo_config(prepared, "tune.frontier_alphas=[]")) == METRIC
