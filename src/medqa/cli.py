"""`medqa <stage> --config FILE [key=value ...]`: the command line over the stage entry functions.

Each subcommand is one entry in `COMMANDS`, mapping to the same function the notebook calls. Dotted overrides
change any config field: `medqa prepare --config configs/demo.yaml data.source=x.json workdir=/tmp/run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
from collections.abc import Callable

from medqa.ask import ask, read_questions
from medqa.baseline import baseline
from medqa.benchmark import benchmark
from medqa.chat import launch
from medqa.config import describe_fields, load_config, resolved_yaml
from medqa.distributed import is_main
from medqa.errors import ConfigError, Interrupted, MedqaError
from medqa.evaluate import evaluate
from medqa.export import check_push, export, push_to_hub
from medqa.faults import Terminated, os_errno, sigterm_as_ctrl_c, write_paragraph
from medqa.feedback import feedback
from medqa.prepare import make_tiny_model, prepare
from medqa.records import describe_counts
from medqa.report_markdown import render_summary
from medqa.schema import Config
from medqa.train import train
from medqa.tune import tune
from medqa.workdir import paths

log = logging.getLogger("medqa")
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _prepare(cfg: Config, args: argparse.Namespace) -> None:
    result = prepare(cfg)
    r = result.report
    print(
        f"read {r['read']}  kept {r['kept']}  rejected {sum(r['rejected'].values())} "
        f"({describe_counts(r['rejected'])})  truncated {r['truncated']}"
    )
    print(
        f"wrote {result.data_dir}/{{train,val,test}}_data.json, rejected.jsonl, prepare_report.json and "
        f"{result.tokenized_dir}/tokenized_{{train,val,test}}"
    )


def _baseline(cfg: Config, args: argparse.Namespace) -> None:
    result = baseline(cfg)
    print(result.table())
    print(f"wrote {result.out_dir}/metrics.json")


def _train(cfg: Config, args: argparse.Namespace) -> None:
    result = train(cfg)
    if is_main():  # torchrun / accelerate launch: one table, from the process that wrote the run
        print(result.table())
        print(f"wrote {result.out_dir}")


def _tune(cfg: Config, args: argparse.Namespace) -> None:
    result = tune(cfg)
    cols = [c for c in result.results.columns if c not in ("path",)]
    print(result.results[cols].to_string(index=False))
    print(f"wrote {result.experiment_dir}/results.csv; best adapter in {result.best_dir}")


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    result = evaluate(cfg)
    print(render_summary(result.report) + "\n")  # report.md up to its samples
    print(f"wrote {result.report_md} and report.json")


def _benchmark(cfg: Config, args: argparse.Namespace) -> None:
    result = benchmark(cfg)
    print(result.table())
    print(f"wrote {result.out_dir}/summary.json and per-question logs in {result.out_dir}/<model>/")


def _ask(cfg: Config, args: argparse.Namespace) -> None:
    questions = list(args.questions) + (read_questions(args.file) if args.file else [])
    if not questions:
        raise ConfigError('Give a question: medqa ask "question" [--adapter DIR], or --file questions.txt.')
    for q, a in zip(questions, ask(cfg, questions, args.adapter)):
        print(f"Q: {q}\nA: {a}\n")


def _chat(cfg: Config, args: argparse.Namespace) -> None:
    launch(cfg, args.adapter, host=args.host, port=args.port, share=args.share, show_names=args.show_names)


def _feedback(cfg: Config, args: argparse.Namespace) -> None:
    result = feedback(cfg, args.export_preferences)
    print(result.table())
    if result.out:
        print(f"wrote {result.out}")
    if result.preferences:
        print(
            f"wrote {result.summary['exported_pairs']} preference pairs (prompt, chosen, rejected) to "
            f"{result.preferences}"
        )


def _export(cfg: Config, args: argparse.Namespace) -> None:
    if args.push_to_hub and not args.merged:  # the adapter as trained, with a model card
        print(f"pushed {push_to_hub(cfg, args.push_to_hub, paths(cfg).finetune)}")
        return
    if args.push_to_hub:
        check_push(paths(cfg).merged)  # token and network before a long merge
    merged = export(cfg)
    print(f"wrote the merged model to {merged}")
    if args.push_to_hub:
        print(f"pushed {push_to_hub(cfg, args.push_to_hub, merged, merged=True)}")


def _make_tiny_model(cfg: Config, args: argparse.Namespace) -> None:
    out = make_tiny_model(cfg)  # as prepare builds it
    print(f"built the tiny model at {out}")


# name -> (entry, one-line description): the subcommands `main` parses, in the order `medqa --help` lists them.
COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    "prepare": (_prepare, "load, clean, deduplicate, split and tokenize the data"),
    "baseline": (_baseline, "score the untuned model: answer perplexity on val and test"),
    "train": (_train, "LoRA fine-tuning with logged metrics; writes outputs/finetune/"),
    "tune": (_tune, "Ray Tune search over the training function; best adapter to outputs/best/"),
    "evaluate": (_evaluate, "final test comparison (perplexity, ROUGE, BLEU); writes outputs/report.md"),
    "benchmark": (
        _benchmark,
        "lm-evaluation-harness tasks (evaluate.benchmarks, e.g. pubmedqa_local, offline) on the "
        "base, fine-tuned and best models; writes outputs/benchmarks/",
    ),
    "ask": (_ask, 'answer questions: medqa ask "question" [--adapter DIR] or --file questions.txt'),
    "chat": (
        _chat,
        "a web page (Gradio, on 127.0.0.1) answering your questions with the base and fine-tuned models "
        "side by side, streamed, blind (A and B) unless --show-names; ratings go to outputs/chat/feedback.jsonl",
    ),
    "feedback": (
        _feedback,
        "summarise the chat page's ratings (outputs/chat/feedback.jsonl): wins, losses, ties, both bad and the "
        "fine-tuned win rate with its 95-percent Wilson interval per model pair and settings; writes "
        "outputs/chat/feedback_summary.json; --export-preferences FILE writes DPO pairs (prompt, chosen, rejected)",
    ),
    "export": (
        _export,
        "merge outputs/finetune into the base model; save outputs/merged/; --push-to-hub REPO_ID "
        "uploads the adapter (or with --merged the merged model) with a model card (token: HF_TOKEN)",
    ),
    "make-tiny-model": (
        _make_tiny_model,
        "build the tiny offline BioGPT (tokenizer learned from the train split) at model.name_or_path",
    ),
}


def _fields_help() -> str:
    lines = ["config fields (override any with key=value):"]
    for key, default, help_text in describe_fields(Config()):
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(help_text, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `medqa` parser: one subcommand per entry of `COMMANDS`, each with the common options, its own options
    (`STAGE_OPTIONS`) and the key=value overrides, in that order (the order `--help` lists them in)."""
    parser = argparse.ArgumentParser(
        prog="medqa",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune BioGPT (or any causal LM) with LoRA on patient questions and doctor answers.",
        epilog=_fields_help(),
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (_, description) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=description,
            description=description,
            epilog=_fields_help(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_options(p)
        if name in STAGE_OPTIONS:
            STAGE_OPTIONS[name](p)
        _add_overrides(p, name)
    return parser


def _add_common_options(p: argparse.ArgumentParser) -> None:
    """--config, --print-config and --verbose: every subcommand takes them."""
    p.add_argument("--config", help="YAML config file, e.g. configs/demo.yaml (default: built-in defaults)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (every field, as YAML) and exit"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_export_options(p: argparse.ArgumentParser) -> None:
    """`medqa export`: where on the Hub to upload, and whether the merged model or the adapter."""
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hub repository (e.g. user/medqa-biogpt)")
    p.add_argument("--merged", action="store_true", help="with --push-to-hub: upload the merged model, not the adapter")


def _add_chat_options(p: argparse.ArgumentParser) -> None:
    """`medqa chat`: the adapter to compare with the base model, where the app listens, and blind or named answers."""
    p.add_argument(
        "--adapter",
        help="LoRA adapter folder to compare with the base model (default: outputs/finetune, else outputs/best)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    p.add_argument(
        "--share",
        action="store_true",
        help="also make a public gradio.live link (off; questions and answers then leave this machine)",
    )
    p.add_argument(
        "--show-names",
        action="store_true",
        help="label the answers base / fine-tuned (default: blind, as A and B in an order drawn per "
        "question, the names shown after the rating)",
    )


def _add_feedback_options(p: argparse.ArgumentParser) -> None:
    """`medqa feedback`: optionally also write the ratings as preference pairs."""
    p.add_argument(
        "--export-preferences",
        metavar="FILE",
        help="also write the decided ratings as JSON lines {prompt, chosen, rejected} (TRL's DPOTrainer "
        "format; ties and both bad skipped)",
    )


def _add_ask_options(p: argparse.ArgumentParser) -> None:
    """`medqa ask`: the adapter to answer with, and a file of questions."""
    p.add_argument("--adapter", help="LoRA adapter folder, e.g. outputs/finetune or outputs/best")
    p.add_argument("--file", help="text file with one question per line")


# The subcommands with options of their own, beside the common ones
STAGE_OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "export": _add_export_options,
    "chat": _add_chat_options,
    "feedback": _add_feedback_options,
    "ask": _add_ask_options,
}


def _add_overrides(p: argparse.ArgumentParser, name: str) -> None:
    """The trailing key=value config overrides (for `ask`, also the questions)."""
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides"
        + (" and the questions (any argument that is not key=value)" if name == "ask" else ""),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: key=value arguments may also come after options such as --adapter.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # For `ask`, arguments that are not `key=value` are the questions.
    positional = list(getattr(args, "overrides", [])) + extra
    overrides = [o for o in positional if OVERRIDE.match(o)]
    args.questions = [o for o in positional if not OVERRIDE.match(o)]
    if args.questions and args.command != "ask":
        parser.error(f"not a key=value override: {args.questions[0]!r}")
    # SIGTERM (kill, systemd, SLURM, Kubernetes) takes the Ctrl-C path in every stage (medqa.faults).
    with sigterm_as_ctrl_c():
        return _run(args, overrides)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run the subcommand; a MedqaError, an interruption or a write the OS refused ends in one paragraph, and the
    exit code says which (2: an error to fix; 130: Ctrl-C; 143: SIGTERM)."""
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(resolved_yaml(cfg), end="")
            return 0
        log.info("config: %s", json.dumps(cfg.to_dict()))
        COMMANDS[args.command][0](cfg, args)
    except Interrupted as exc:
        print(f"medqa {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except MedqaError as exc:
        print(f"medqa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(
            f"medqa {args.command}: stopped by SIGTERM. Nothing half-written was kept: each artifact is renamed into "
            "place only once complete, so the previous outputs are intact. Run the same command again to finish.",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print(f"medqa {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a write refused outside a stage's own guard (chat, make-tiny-model)
        if os_errno(exc) is None:
            raise
        print(f"medqa {args.command}: error: {write_paragraph(args.command, exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
