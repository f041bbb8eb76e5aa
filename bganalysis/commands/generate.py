"""`bganalysis generate`: sample teacher responses to a prompt set, as hard labels for `train --data`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample teacher responses to a prompt set, as training data with hard labels",
        description="Sample teacher responses and write JSONL rows {id, prompt, response, sample, finish_reason, "
                    "response_tokens} to --out, with the settings in OUT.meta.json. Rerunning the same command "
                    "resumes: rows already in the file are kept. Each response depends on --seed, the prompt's "
                    "position and the sample number, not on --batch-size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--teacher", required=True, help="teacher model folder, hub id, or 'lab' for the exact lab teacher")
    parser.add_argument("--prompts", help="JSONL of {\"prompt\": ...} rows (or a benchmark .jsonl[.gz] with a prompt field); optional with --teacher lab")
    parser.add_argument("--out", required=True, help="output JSONL file; the settings go to OUT.meta.json")
    parser.add_argument("--lab-prompts", type=int, default=100, help="lab prompts to sample when --prompts is not given")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="length cap of each response (tokens)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the teacher; 0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest token set with this total probability; 1 keeps all")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="responses sampled for each prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample (and of the lab prompts)")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="wrap prompts in the tokenizer's chat template when it has one")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts keep their last tokens, with a warning")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--limit", type=int, help="generate for the first N prompts only; a later run without it continues the file")
    parser.add_argument("--force", action="store_true", help="delete an existing --out and its meta file and start over")
    parser.set_defaults(func=run)


def run(args) -> None:
    from bganalysis.generate import GenerateConfig, run_generate

    options = {key: value for key, value in vars(args).items() if key not in ("func", "command", "verbose")}
    print(run_generate(GenerateConfig(**options)))
