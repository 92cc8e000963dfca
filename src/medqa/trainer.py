"""The Trainer medqa trains with, and its callbacks: answer-loss evaluation (training losses from the fast step,
`medqa.faststep`, where the model allows it), step timing and metrics.jsonl, a graceful stop on a signal, and the
report of each evaluation to Ray Tune.
"""

from __future__ import annotations

import json
import logging
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from medqa import distributed as dist
from medqa.batching import eval_tokens_per_batch
from medqa.faststep import FastStep, kl_to_base_sum
from medqa.knowledge import Probe
from medqa.metrics import evaluate_answer_loss
from medqa.modeling import scoring_autocast
from medqa.prompts import IGNORE_INDEX
from medqa.selection import Rule

log = logging.getLogger(__name__)


class AnswerLossTrainer(Trainer):
    """Trainer whose evaluation is our `answer_loss` (summed over all answer tokens of the split, then divided by
    their count). Trainer's own eval loss is a mean of per-batch means, which depends on how the examples fall
    into batches, so it would not be comparable with the baseline. With `fast_step`, training losses come from
    `FastStep` (same value, compiled and static-shaped).

    With `knowledge` (a `medqa.knowledge.Probe` over PubMedQA dev questions, scoring.knowledge_questions) each
    evaluation also answers them (`medqa.pubmedqa.score_knowledge`: one forward per question, the abstract loss from
    the same forward) beside the base model's scores (the adapter disabled, same precision path; computed once per
    workdir and cached), so `eval_knowledge_change` is the accuracy lost or won and `eval_abstract_change` the
    abstract loss's relative rise. Every evaluation reports `eval_objective` (`medqa.selection`), the metric the best
    checkpoint is chosen by."""

    def __init__(
        self,
        *args,
        fast_step: FastStep | None = None,
        eval_tokens_per_batch: int = 0,
        pad_id: int | None = None,
        score_dtype=None,
        knowledge: Probe | None = None,
        rule: Rule | None = None,
        kl_beta: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.kl_beta = kl_beta
        self.knowledge = knowledge if knowledge is not None and knowledge.items else None
        self.rule = rule or Rule()
        if self.rule.uses_knowledge and self.knowledge is None:
            raise ValueError(f"tune.objective={self.rule.objective} needs PubMedQA dev questions to score")
        self.score_dtype = score_dtype  # `modeling.pick_device_dtype`: evaluation scores in it, as baseline does
        self.pad_id = pad_id if pad_id is not None else self.processing_class.pad_token_id
        if fast_step is not None and self.accelerator.num_processes > 1:
            log.warning(
                "%d processes: training through the model's own forward (the fast step is single-process).",
                self.accelerator.num_processes,
            )
            fast_step = None
        self.fast_step = fast_step
        self.eval_tokens = eval_tokens_per_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The fast step talks to the unwrapped model's modules; with several processes (DDP, FSDP) the wrapper's
        # own forward and the Trainer's loss scaling must run, so it is used only by one process that holds the
        # model itself.
        if (
            self.fast_step is None
            or return_outputs
            or not model.training
            or model is not self.model
            or self.accelerator.num_processes > 1
        ):
            if self.kl_beta and model.training and not return_outputs:
                return self._loss_with_kl(model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # accelerate applies mixed precision around the model's own forward, which the fast step does not call:
        # the same autocast, here.
        with self.accelerator.autocast():
            return self.fast_step(inputs, num_items_in_batch)

    def _loss_with_kl(self, model, inputs, num_items_in_batch=None):
        """The model's own loss plus train.kl_to_base x KL(base || tuned) per labelled token (the same divisor:
        the accumulated batch's labelled tokens, or this micro-batch's)."""
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        peft = self.accelerator.unwrap_model(model)
        with torch.no_grad(), peft.disable_adapter():
            base_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        labels = inputs["labels"]
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
        kl = self.kl_beta * kl_to_base_sum(outputs.logits, base_logits, labels) / count
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            # `num_items_in_batch` counts every process's tokens, and transformers scales the CE loss back up by the
            # processes (Trainer.compute_loss); the KL per token must get the same factor, or beta acts as beta / P.
            kl = kl * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        return loss + kl

    def training_step(self, model, inputs, num_items_in_batch=None):
        fs = self.fast_step
        if fs is None or fs.proven:
            return super().training_step(model, inputs, num_items_in_batch)
        # The first micro-batch on the optimised path (compiled, CUDA graphs, flex): torch compiles the forward
        # here and the backward lazily in it, so a compiler failure shows now, before any gradient was
        # accumulated. Run it again on the plain path; an error there is a real one and is raised.
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except Exception as exc:  # noqa: BLE001 - recorded and warned once by use_plain; the retry re-raises
            fs.use_plain(exc)
        else:
            fs.proven = True
            return loss
        # Outside the except block: the failed attempt's traceback (and the activations it holds) is gone.
        model.zero_grad(set_to_none=True)  # the run's first micro-batch: no gradient of another to keep
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        flex = self.fast_step is not None and self.fast_step.attention == "flex"
        if flex:  # scoring pads by length with 2D masks: the SDPA path, never a recompiled flex kernel
            self.fast_step.base.set_attn_implementation("sdpa")
        try:
            # the same budget on every rank: under FSDP each forward is collective, so all must batch alike
            tokens = dist.min_over_ranks(eval_tokens_per_batch(self.eval_tokens, self.model))
            # The training model (base in the compute dtype, LoRA fp32) scored in the scoring dtype, as baseline
            # and evaluate score theirs: the validation number here is the final one's quantity.
            with scoring_autocast(next(self.model.parameters()).device, self.score_dtype):
                if dist.world_size() > 1 and not self.is_fsdp_enabled:  # each process a shard, put back together
                    m = dist.answer_loss(self.model, ds, self.pad_id, self.args.per_device_eval_batch_size, tokens)
                else:  # one process; or FSDP, whose every forward is collective: each scores the whole split
                    m, _ = evaluate_answer_loss(
                        self.model,
                        ds,
                        self.pad_id,
                        self.args.per_device_eval_batch_size,
                        bootstrap_samples=0,
                        tokens_per_batch=tokens,
                    )
                knowledge = self._knowledge() if self.knowledge is not None else {}
        finally:
            if flex:
                self.fast_step.base.set_attn_implementation("flex_attention")
        metrics = {
            f"{metric_key_prefix}_answer_loss": m["answer_loss"],
            f"{metric_key_prefix}_answer_perplexity": m["answer_perplexity"],
            **{f"{metric_key_prefix}_{k}": v for k, v in knowledge.items()},
        }
        metrics[f"{metric_key_prefix}_objective"] = self.rule.value({"answer_loss": m["answer_loss"], **knowledge})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _knowledge(self) -> dict:
        """The knowledge fields (`medqa.knowledge.compare`) of the model now against the base model's (scored once
        per workdir: with LoRA disabled the model is the base, in the same dtypes and under the same autocast)."""
        # Every process scores all the questions (one forward each): the same numbers on every rank.
        self.knowledge.batch_size = self.args.per_device_eval_batch_size
        return self.knowledge.measure(self.model, self.processing_class)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: from the end of the previous step (or of the evaluation or checkpoint
    saving that followed it) to the end of this one. So waiting for the data loader counts, and evaluation and
    saving never do. The first step of a compiled run includes the compilation: `compile_seconds` = first step
    minus the median of the others."""

    def __init__(self):
        self.durations: list[float] = []
        self._last = None

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # one sync per optimizer step: honest timings for a few microseconds
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kw):
        now = self._now()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now

    def on_evaluate(self, args, state, control, **kw):
        self._last = self._now()  # the evaluation just ended: the next step's time starts here

    def on_save(self, args, state, control, **kw):
        self._last = self._now()

    def summary(self, compiled: bool) -> dict:
        d = self.durations
        if not d:
            return {"steps_timed": 0}
        steady = statistics.median(d[1:]) if len(d) > 1 else d[0]
        return {
            "steps_timed": len(d),
            "first_step_seconds": round(d[0], 4),
            "median_step_seconds": round(steady, 5),
            "train_seconds": round(sum(d), 3),
            "compile_seconds": round(max(d[0] - steady, 0.0), 3) if compiled else 0.0,
        }


class History(TrainerCallback):
    """Appends one JSON line per logging step (train) and per evaluation to metrics.jsonl.

    Throughput is the whole job's (every process's rows; with several processes `tokens_per_s_per_process` is one
    process's share). It counts only the time inside optimizer steps (from `StepTimer`: evaluation and checkpoint
    saving are left out) and real tokens and examples: a packed row holds `examples_per_row` examples and
    `tokens_per_row` real tokens on average (padding is not counted)."""

    def __init__(self, path: Path, tokens_per_row: float, examples_per_row: float, timer: StepTimer):
        self.path = path
        self.tokens_per_row = tokens_per_row
        self.examples_per_row = examples_per_row
        self.timer = timer
        self.last_step, self.last_timed = 0, 0

    def on_train_begin(self, args, state, control, **kw):
        # On resume, drop lines logged after the checkpoint we restart from, so no step appears twice.
        if self.path.exists() and state.is_world_process_zero:  # several processes: rank 0 writes the file
            keep = [x for x in self.path.read_text().splitlines() if json.loads(x)["step"] <= state.global_step]
            self.path.write_text("".join(x + "\n" for x in keep))
        self.last_step, self.last_timed = state.global_step, len(self.timer.durations)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            steps = max(state.global_step - self.last_step, 1)
            secs = max(sum(self.timer.durations[self.last_timed :]), 1e-9)
            # The whole job's rows: train_batch_size is one process's micro-batch (x its GPUs under DataParallel),
            # and each of world_size processes takes one per accumulation step.
            per_process = steps * args.train_batch_size * args.gradient_accumulation_steps
            rows = per_process * args.world_size
            row.update(
                train_loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                examples_per_s=rows * self.examples_per_row / secs,
                tokens_per_s=rows * self.tokens_per_row / secs,
                step_seconds=secs / steps,
            )
            if args.world_size > 1:
                row.update(processes=args.world_size, tokens_per_s_per_process=per_process * self.tokens_per_row / secs)
            self.last_step, self.last_timed = state.global_step, len(self.timer.durations)
        elif "eval_answer_loss" in logs:
            row.update({k: v for k, v in logs.items() if k.startswith("eval_")})
        else:
            return
        if not state.is_world_process_zero:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class GracefulStop:
    """Ctrl-C (SIGINT), SIGTERM (kill, systemd, SLURM preemption, Kubernetes: usually with a grace period) or a
    notebook's stop button: finish the current step, save a checkpoint, then stop. A second signal interrupts at
    once. `signum`: the first signal received (the CLI exits with 128 + it). Under torchrun the launcher passes
    SIGTERM on to every rank, and StopOnRequest makes them all stop at the same step."""

    def __init__(self, sigterm: bool = True):
        self.requested = False
        self.signum = signal.SIGINT
        self.previous = {}
        # A Ray Tune trial leaves SIGTERM to Ray's worker: Ray stops trials itself, and the search handles SIGTERM.
        self.signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning(
            "%s: stopping after this step and saving a checkpoint (a second signal aborts at once).",
            signal.Signals(signum).name,
        )

    def callback(self) -> StopOnRequest:
        return StopOnRequest(self)


class StopOnRequest(TrainerCallback):
    """Save a checkpoint and stop after the current step once a `GracefulStop` was requested."""

    def __init__(self, stop: GracefulStop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kw):
        if dist.any_rank(self.stop.requested):  # several processes: all stop at this step, or none
            self.stop.requested = True  # so every rank reports the stop (Interrupted), not only the signalled one
            control.should_save = True
            control.should_training_stop = True


class ReportToTune(TrainerCallback):
    """In a Ray Tune trial, after each evaluation: report the evaluation to Tune as val_* (val_objective, which
    ASHA prunes on and Ray keeps the best checkpoint by; val_answer_loss; the PubMedQA dev scores when measured),
    with the adapter as the checkpoint."""

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        from ray import tune

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)  # the adapter only, in safetensors
            tune.report(
                tune_report(metrics, state.global_step, state.max_steps), checkpoint=tune.Checkpoint.from_directory(d)
            )


def tune_report(metrics: dict, step: int, max_steps: int) -> dict:
    """What a trial reports to Tune after an evaluation: every eval_* metric as val_*, and the step."""
    out = {"val_" + k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_")}
    return {**out, "step": step, "max_steps": max_steps}
