"""`bganalysis analyze`: exposure bias per step, kappa per token, Bridge/Garden labels."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="measure exposure bias and per-token risk kappa for one or more students",
        description="Measure TF, RO and EB per decoding step and kappa per response token, label "
                    "Bridges and Gardens, and write analysis/{tokens,steps}.parquet, summary.json and figures/ under --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--teacher", required=True, help="teacher model folder, hub id, or 'lab' for the exact lab teacher")
    parser.add_argument("--student", action="append", required=True, dest="students", help="student model folder (repeat for several)")
    parser.add_argument("--name", action="append", dest="student_names", help="display name of each student, in --student order")
    parser.add_argument("--prompts", help="JSONL of {\"prompt\": ..., \"response\"?: ...} rows (or a benchmark .jsonl[.gz] with a prompt field); optional with --teacher lab")
    parser.add_argument("--out", required=True, help="run directory; results go to OUT/analysis and OUT/figures")
    parser.add_argument("--max-docs", type=int, help="analyse only the first N prompts")
    parser.add_argument("--lab-docs", type=int, default=40, dest="num_lab_docs", help="lab prompts to sample when --prompts is not given")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length cap of teacher responses and of the students' own continuations (tokens)")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts keep their last tokens, with a warning")
    parser.add_argument("--ro-samples", type=int, default=2, help="continuations each student writes per prompt for RO")
    parser.add_argument("--sample-temperature", type=float, default=1.0, help="sampling temperature of the students' own continuations")
    parser.add_argument("--kappa-k", type=int, default=4, help="action set size: the teacher's top-K tokens")
    parser.add_argument("--kappa-rollouts", type=int, default=4, help="teacher rollouts R per forced action")
    parser.add_argument("--kappa-horizon", type=int, default=8, help="states H scored after each forced action")
    parser.add_argument("--kappa-sampling", choices=["stratified", "common", "independent"], default="stratified",
                        help="uniforms of the kappa rollouts: a Latin hypercube shared by the K actions (lowest variance), "
                             "plain uniforms shared by the actions, or independent uniforms per action (plain Monte Carlo)")
    parser.add_argument("--kappa-student", default=argparse.SUPPRESS, help="name of the student whose losses kappa sums (default: the first)")
    parser.add_argument("--windows", type=_windows, default=[], help="comma-separated W values for windowed EB (the student writes W tokens after the teacher prefix up to t - W), e.g. 1,3,5")
    parser.add_argument("--kappa-random", type=int, default=0, metavar="N",
                        help="add N random tokens (drawn per position, outside the set) to the action set")
    parser.add_argument("--estimators", type=_names, default="monte_carlo,teacher_only",
                        help="kappa estimators to run, comma-separated: monte_carlo (student-aware, rollouts; the "
                             "costly one), teacher_only (counterfactual, no student). The teacher proxies always run, "
                             "and the exact kappa on the lab. Labels rank by monte_carlo when it runs, else by "
                             "teacher_only")
    parser.add_argument("--kappa-include-observed", action="store_true", help="add the observed response token to the action set when it is not among the teacher's top K")
    parser.add_argument("--bridge-fraction", type=float, default=0.3, help="share of positions labelled Bridge (highest kappa)")
    parser.add_argument("--garden-fraction", type=float, default=0.3, help="share of positions labelled Garden (lowest kappa)")
    parser.add_argument("--label-scope", choices=["document", "position"], default="document", help="rank within each document or within each aligned position")
    parser.add_argument("--label-ranking", choices=["kappa", "kappa_abs", "kappa_spread"], default="kappa", help="risk score the labels rank by")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="wrap prompts in the tokenizer's chat template when it has one")
    parser.add_argument("--response-temperature", type=float, default=1.0, help="sampling temperature of the teacher responses written for prompts without one; 0 is greedy")
    parser.add_argument("--shard-size", type=int, default=8, help="documents per saved shard; rerunning the same command skips finished shards")
    parser.add_argument("--force", action="store_true", help="discard saved shards computed with other settings instead of stopping")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over documents for the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample, rollout and bootstrap")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--heatmap-docs", type=int, default=4, help="documents shown in figures/kappa_map")
    parser.set_defaults(func=run)


def _windows(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid window list {text!r}; give integers >= 1 separated by commas, e.g. 1,3,5") from None
    return values


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run(args) -> None:
    import json
    import logging

    from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis

    options = {key: value for key, value in vars(args).items() if key not in ("func", "command", "verbose")}
    summary = run_analysis(AnalyzeConfig(**options))
    if not summary:
        return  # a worker process (rank > 0): rank 0 writes the tables
    brief = {name: {key: round(entry[key], 4) if entry[key] is not None else None
                    for key in ("tf_overall", "eb_overall", "eb_bridge", "eb_garden")}
             for name, entry in summary["students"].items()}
    logging.getLogger("bganalysis").info("summary: %s", json.dumps(brief))
    if summary.get("kappa_spearman_vs_exact") is not None:
        logging.getLogger("bganalysis").info("%s kappa Spearman vs exact (lab): %.3f", summary["labels"]["estimator"],
                                             summary["kappa_spearman_vs_exact"])
