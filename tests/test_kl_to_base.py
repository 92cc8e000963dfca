"""train.kl_to_base: beta x KL(base || tuned) per answer token on top of the loss. Beta 0 is exactly the plain loss;
an adapter that changes nothing adds nothing; otherwise the added term is the KL computed independently from the
model's own logits with the adapter on and off, on the packed fast step and on the model's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import demo_config, prepare_demo
from test_fast_training import PACKED, _packed_batch

from medqa.metrics import pad_batch


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_demo(tmp_path_factory.mktemp("kl"))


def _model(cfg, perturb: bool):
    from medqa.modeling import build_lora_model

    torch.manual_seed(0)
    model = build_lora_model(cfg).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    return model


def _reference_kl(model, rows) -> float:
    """Sum over each example's answer positions of KL(base || tuned), from the model's own logits, one example at
    a time (F.kl_div's definition, not medqa's)."""
    total = 0.0
    with torch.no_grad():
        for row in rows:
            single = pad_batch([row], pad_id=1)
            inputs = {k: single[k] for k in ("input_ids", "attention_mask")}
            tuned = model(**inputs).logits[0, :-1]
            with model.disable_adapter():
                base = model(**inputs).logits[0, :-1]
            mask = single["labels"][0, 1:] != -100
            total += F.kl_div(
                tuned[mask].log_softmax(-1), base[mask].log_softmax(-1), log_target=True, reduction="sum"
            ).item()
    return total


@pytest.mark.parametrize("perturb", [False, True])
def test_fast_step_adds_beta_times_the_kl(prepared, perturb):
    from medqa.faststep import FastStep

    cfg = demo_config(prepared, *PACKED)
    model = _model(cfg, perturb)
    rows, batch = _packed_batch(cfg)
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    with torch.no_grad():
        plain = FastStep(model)(batch, n).item()
        zero = FastStep(model, kl_beta=0.0)(batch, n).item()
        with_kl = FastStep(model, kl_beta=0.5)(batch, n).item()
    assert zero == plain  # beta 0: exactly the plain loss
    kl = _reference_kl(model, rows)
    if not perturb:
        assert kl == pytest.approx(0.0, abs=1e-6) and with_kl == pytest.approx(plain, abs=1e-6)
    else:
        assert kl > 1e-3
        assert with_kl - plain == pytest.approx(0.5 * kl / n.item(), rel=1e-4)


def test_models_own_forward_adds_the_same_term(prepared, tmp_path):
    """Unpacked batches train through the Trainer's compute_loss: the same regulariser, the same number."""
    from transformers import TrainingArguments

    from medqa.trainer import AnswerLossTrainer

    cfg = demo_config(prepared, "lora.dropout=0")
    model = _model(cfg, True).train()
    for module in model.modules():  # training mode without dropout: both passes see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "activation_dropout", "attention_dropout", "layerdrop"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    rows, _ = _packed_batch(cfg, n=3)
    batch = pad_batch(rows, pad_id=1)
    n = int((batch["labels"][:, 1:] != -100).sum())
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    plain = AnswerLossTrainer(model=model, args=args, pad_id=1)
    kl = AnswerLossTrainer(model=model, args=args, pad_id=1, kl_beta=2.0)
    with torch.no_grad():
        a = plain.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)).item()
        b = kl.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n)).item()
    model.eval()
    assert b - a == pytest.approx(2.0 * _reference_kl(model, rows) / n, rel=1e-4)


def test_a_run_with_kl_trains_and_records_it(prepared):
    from medqa.train import train

    cfg = demo_config(
        prepared, "train.kl_to_base=0.1", "train.max_steps=3", "train.eval_steps=3", "scoring.bootstrap_samples=0"
    )
    result = train(cfg)
    assert result.metrics["config"]["train"]["kl_to_base"] == 0.1 and result.metrics["steps"] == 3
