"""The closing text of each notebook is written from the run's numbers: it changes when they do, and it names
only what was measured."""

from ray import tune

from medqa.findings import (
    baseline_findings,
    final_findings,
    prepare_findings,
    search_space_table,
    train_findings,
)


def _test(ppl, loss=None, ci=(1.0, 2.0), n=41, tokens=4831):
    return {
        "answer_perplexity": ppl,
        "answer_loss": loss if loss is not None else __import__("math").log(ppl),
        "answer_perplexity_ci95": list(ci),
        "examples": n,
        "answer_tokens": tokens,
    }


def test_prepare_findings_add_up_and_order_reasons():
    report = {
        "read": 500,
        "kept": {"train": 410, "val": 43, "test": 41},
        "rejected": {"question_too_short": 1, "answer_too_short": 5},
        "truncated": 191,
        "max_length": 256,
    }
    text = prepare_findings(report)
    assert "**500** records read, **494** were kept (train 410, val 43, test 41)" in text
    assert "**6** rejected: 5 `answer_too_short`, 1 `question_too_short`." in text  # largest first
    assert "191 kept examples (38.7%)" in text and "raise `data.max_length`" in text
    report.update(truncated=0, sources={"a": {"read": 3, "kept": {"train": 2}, "rejected": {"duplicate_question": 1}}})
    text = prepare_findings(report)
    assert "raise" not in text and "Source **a**: read 3, kept 2 (train 2), rejected 1 (1 `duplicate_question`)" in text


def test_baseline_findings_state_the_uniform_reference():
    metrics = {"test": _test(46.16, ci=(40.18, 54.2)), "val": _test(44.0), "tokenizer": {"vocab_size": 49152}}
    text = baseline_findings(metrics)
    assert "**46.16** (95% CI 40.18 to 54.20) over 41 doctor answers" in text and "on val 44.00" in text
    assert "49,152" in text and "1,065 times better" in text
    assert "vocabulary" not in baseline_findings({"test": _test(46.16)})


def test_train_findings_compare_with_the_baseline_and_name_the_checkpoint():
    base = {"test": _test(46.16), "val": _test(44.0)}
    metrics = {
        "test": _test(28.52, ci=(24.6, 33.8)),
        "val": _test(27.9),
        "trainable_parameters": 4_884_480,
        "total_parameters": 139_399_488,
        "steps": 40,
        "selection": {
            "objective": "answer_loss_within_knowledge",
            "checkpoint": {"step": 20, "answer_loss": 3.3, "knowledge_change": -0.01, "knowledge_base_acc": 0.45},
        },
    }
    text = train_findings(metrics, base)
    assert (
        "lowered test answer perplexity from 46.16 to **28.52** (-38.2%" in text and "val from 44.00 to 27.90" in text
    )
    assert "step 20 of 40" in text and "changed by -0.010 from the base model's 0.450" in text and "lost" in text
    assert "fell back" not in text
    metrics["selection"].update(eligible=False, max_knowledge_drop=0.005)
    text = train_findings(metrics, base)
    assert "chosen by the rule's fallback" in text and "fell back to the nearest miss" in text
    metrics["selection"]["checkpoint"]["abstract_change"] = 0.0123
    assert "abstract loss on the dev abstracts was +1.23%" in train_findings(metrics, base)
    metrics["test"] = _test(50.0)
    del metrics["selection"]
    text = train_findings(metrics, base)
    assert "raised test answer perplexity" in text and "+8.3%" in text and "checkpoint" not in text


def _report(tuned_test_loss):
    def model(loss, p=None):
        m = {"test": _test(2.718281828**loss, loss=loss)}
        if p is not None:
            m["vs_base"] = {"p_value": p}
        return m

    return {
        "models": {
            "base": model(3.83),
            "fine-tuned": model(3.35, 0.001),
            "tuned (best trial)": model(tuned_test_loss, 0.001),
        },
        "benchmarks": {
            "models": {
                "base": {"tasks": {"pubmedqa_local": {"acc": {"value": 0.455}}}},
                "fine-tuned": {
                    "tasks": {"pubmedqa_local": {"acc": {"value": 0.395}}},
                    "questions": {"pubmedqa_local": 200},
                    "vs_base": {"pubmedqa_local": {"acc": {"delta": -0.06, "p_lost": 0.024}}},
                },
            }
        },
    }


def test_final_findings_say_when_the_best_trial_loses_on_test():
    val = {"fine-tuned": 3.256, "tuned (best trial)": 3.229}  # the trial won on validation
    text = final_findings(_report(3.42), val)
    assert "**fine-tuned**: test answer perplexity 46.06 -> 28.50 (-38.1%, paired p 0.001)" in text
    assert "pubmedqa_local accuracy 0.455 -> 0.395 (-0.060, p of a loss 0.024, 200 questions, lm-eval)" in text
    assert "beat the plain fine-tune on validation (val answer loss 3.2290 vs 3.2560) but lost to it on test" in text
    text = final_findings(_report(3.30), val)
    assert "and on test too" in text and "lost to it" not in text
    assert "validation" not in final_findings(_report(3.30))  # no val losses given: nothing claimed


def test_search_space_table_reads_ray_domains():
    rows = search_space_table(
        {"train.learning_rate": tune.loguniform(1e-4, 1e-3), "lora.r": tune.choice([4, 16]), "seed": 1}
    )
    assert rows == [
        {"parameter": "train.learning_rate", "sampled": "float, log-uniform", "values": "0.0001 to 0.001"},
        {"parameter": "lora.r", "sampled": "choice", "values": "4, 16"},
        {"parameter": "seed", "sampled": "fixed", "values": "1"},
    ]


def test_knowledge_frame_reads_lm_eval_or_medqa_and_is_none_without_either():
    from medqa.report import knowledge_frame

    report = _report(3.30)
    frame = knowledge_frame(report)
    assert list(frame.index) == ["base", "fine-tuned"]  # the best trial has no PubMedQA score here: left out
    assert frame.loc["fine-tuned", "lm-eval pubmedqa_local acc"] == 0.395
    assert frame.loc["fine-tuned", "lm-eval Δ acc"] == -0.06
    del report["benchmarks"]
    assert knowledge_frame(report) is None
    report["models"]["base"]["pubmedqa"] = {
        "acc": 0.5,
        "questions": 10,
        "predicted_share": {"yes": 0.7, "no": 0.3, "maybe": 0.0},
        "majority_baseline_acc": 0.6,
        "abstract_loss": 2.5,
    }
    frame = knowledge_frame(report)
    assert frame.loc["base", "PubMedQA acc"] == 0.5 and frame.loc["base", "answered yes/no/maybe"] == "70% / 30% / 0%"
    assert frame.loc["base", "majority baseline"] == 0.6 and frame.loc["base", "abstract loss"] == 2.5


def test_target_check_names_what_was_missed():
    from medqa.findings import target_check, target_sentence

    report = {
        "models": {
            "base": {"test": _test(46.16)},
            "a": {
                "test": _test(27.0),  # -41.5%
                "pubmedqa": {"vs_base": {"acc_delta": -0.02, "abstract_change": 0.019}},
            },
            "b": {
                "test": _test(28.52),  # -38.2%
                "pubmedqa": {"vs_base": {"acc_delta": -0.06, "abstract_change": 0.05}},
            },
        }
    }
    assert target_check(report, "a")["met"] and not target_check(report, "b")["met"]
    text = target_sentence(report)
    assert "**a** meets the target" in text
    assert "**b** misses the target: answer perplexity -38.2% (limit -40%) missed" in text
    assert "PubMedQA accuracy -0.060 (limit -0.02) missed" in text and "abstract loss +5.0% (limit +2%) missed" in text
