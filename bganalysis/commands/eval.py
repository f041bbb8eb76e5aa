"""`bganalysis eval`: benchmark suites on lm-evaluation-harness and evalplus."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="run the reasoning and code benchmark suites (lm-eval, evalplus) on models",
        description="Evaluate one or more models on a suite (reasoning, code, all). Results go to "
                    "OUT/results.parquet and OUT/results.md, per-sample outputs to OUT/samples/; finished "
                    "benchmarks are cached by (model hash, benchmark, settings), so a rerun skips them and an "
                    "interrupted run resumes. Generated code runs only in a sandbox (docs/eval.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--suite", default="reasoning", help="suite name from eval_configs/ (reasoning, code, all)")
    parser.add_argument("--benchmark", action="append", metavar="NAME", default=argparse.SUPPRESS,
                        help="run only this benchmark of the suite, e.g. humanevalplus; repeatable; without it, "
                             "every benchmark of the suite runs")
    parser.add_argument("--list-suites", action="store_true", help="list the suites with their settings and exit")
    parser.add_argument("--model", action="append", metavar="MODEL",
                        help="model folder, hub id, run folder (all its students) or .gguf file; repeatable")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="read every benchmark from local files in the layout of docs/eval.md "
                             "(no network); default: the tools' own online datasets")
    parser.add_argument("--limit", type=int, help="evaluate the first N items of each benchmark")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder; default: eval/ of the run folder the models belong to, else runs/eval")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load weights in this dtype "
                        "(default: as stored)")
    parser.add_argument("--batch-size", default="8", help="lm-eval batch size: an integer, or auto to let lm-eval probe the largest that fits (meant for GPUs: its probe runs full-length batches, which can exhaust CPU memory)")
    chat = parser.add_mutually_exclusive_group()
    # Neither flag: the template is used when the tokenizer has one (args.chat_template is then absent).
    chat.add_argument("--apply-chat-template", dest="chat_template", action="store_true", default=argparse.SUPPRESS,
                      help="wrap prompts in the tokenizer's chat template; without either flag it is used when the "
                           "tokenizer has one")
    chat.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=argparse.SUPPRESS,
                      help="plain prompts, even when the tokenizer has a chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="generation cap for chain-of-thought and code answers (lm-eval's BBH uses 1024, "
                             "evalplus 768; lower is faster on a CPU)")
    parser.add_argument("--force", action="store_true", help="rerun benchmarks that are in the cache")
    parser.set_defaults(func=run)


def run(args) -> None:
    from pathlib import Path

    from bganalysis.errors import UserError
    from bganalysis.evaluation.results import ResultStore, markdown_table
    from bganalysis.evaluation.local_data import check_data_dir
    from bganalysis.evaluation.runner import (EvalSettings, default_out, evaluate_sources, selected_benchmarks,
                                              settings_dict)
    from bganalysis.evaluation.sources import resolve_models
    from bganalysis.evaluation.suites import describe_suites

    if args.list_suites:
        print(describe_suites())
        return
    if not args.model:
        raise UserError("no --model given; pass a model folder, hub id, run folder or .gguf file (repeatable)")
    settings = EvalSettings(
        suite=args.suite, benchmarks=tuple(getattr(args, "benchmark", ())), limit=args.limit,
        data_dir=Path(args.data_dir) if args.data_dir else None, max_new_tokens=args.max_new_tokens,
        chat_template=getattr(args, "chat_template", None), batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        force=args.force)
    # An unknown suite or benchmark, or a missing data file, fails before any model is loaded.
    check_data_dir([benchmark.name for benchmark in selected_benchmarks(settings)], settings.data_dir)
    sources = resolve_models(args.model)
    _check_models(sources)
    out = Path(args.out) if args.out else default_out(sources)
    log.info("eval settings: %s; models: %s; out: %s", settings_dict(settings),
             ", ".join(f"{s.name}={s.path}" for s in sources), out)

    entries = evaluate_sources(sources, settings, out)
    table = ResultStore(out).write_tables(entries)
    log.info("wrote %s and %s", out / "results.parquet", out / "results.md")
    print(markdown_table(table))


def _check_models(sources) -> None:
    """Check every model's files and load its tokenizer, so a bad --model fails before anything is evaluated."""
    from bganalysis.models import check_model_files, load_tokenizer

    for source in sources:
        check_model_files(source.path)
        load_tokenizer(source.path)
