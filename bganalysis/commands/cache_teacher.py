"""`bganalysis cache-teacher`: write the teacher's top-k log-probabilities once, for training without the teacher."""

from __future__ import annotations

import argparse
import logging

from bganalysis.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache-teacher",
        help="cache the teacher's top-k log-probabilities per response token, for training without the teacher",
        description="Run the teacher once over the training examples and write, per response token, its k most "
                    "likely tokens with their log-probabilities at --loss-temperature and the log of the remaining "
                    "mass, in safetensors shards with a manifest.json (k·8 + 4 bytes a token). The data options "
                    "match bganalysis train, so the same settings give the same examples. Rerunning the same "
                    "command skips the shards already written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--teacher", default="lab", help="teacher model folder or hub id, or lab for the exact lab teacher")
    parser.add_argument("--data", default="lab", help="lab (documents sampled from the lab teacher) or a JSONL file with prompt and response fields")
    parser.add_argument("--k", type=int, default=64, help="tokens kept per position; the vocabulary size makes the cached loss exact")
    parser.add_argument("--loss-temperature", type=float, default=1.0, help="temperature T of the soft loss the cache is for (softmax(logits / T)); training must use the same")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--max-len", type=int, default=512, help="max tokens per sequence, as in train")
    parser.add_argument("--num-docs", type=int, default=2000, help="number of lab documents (data=lab only), as in train")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lab documents, as in train")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="wrap JSONL prompts in the tokenizer's chat template when it has one, as in train")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward pass")
    parser.add_argument("--shard-tokens", type=int, default=65536, help="response tokens per shard, the unit of resumption")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--force", action="store_true", help="rebuild a cache in --out that was written with other settings")
    parser.set_defaults(func=run)


def run(args) -> None:
    from bganalysis.teacher_cache import build_teacher_cache
    from bganalysis.train_data import jsonl_examples, lab_examples

    if args.max_len < 2:
        raise UserError(f"invalid --max-len {args.max_len}: must be >= 2 (one prompt token and one response token)")
    if args.num_docs < 1:
        raise UserError(f"invalid --num-docs {args.num_docs}: must be a whole number >= 1")
    _check_output(args)
    device = _device(args.device)
    tokenizer, teacher = _load_teacher(args.teacher, args.data)
    if args.data == "lab":
        examples = lab_examples(args.num_docs, args.seed, args.max_len)
    else:
        examples = jsonl_examples(args.data, tokenizer, args.max_len, args.chat_template)
    logger.info("teacher %s on %s, %d examples, k=%d, loss temperature %g", args.teacher, device, len(examples), args.k,
                args.loss_temperature)
    print(build_teacher_cache(teacher, tokenizer, examples, args.out, args.k, args.loss_temperature, args.batch_size,
                              args.shard_tokens, device, teacher_name=args.teacher))


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name.startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"invalid --device {name}: use auto, cpu, or cuda[:N] where CUDA is available")
    return torch.device(name)


def _load_teacher(name: str, data: str):
    """Return (tokenizer, teacher) as bganalysis train loads them."""
    from bganalysis.lab import LabTeacher, lab_tokenizer

    if name == "lab":
        return lab_tokenizer(), LabTeacher()
    from bganalysis.models import load_causal_lm, load_tokenizer

    tokenizer, teacher = load_tokenizer(name), load_causal_lm(name)
    if data == "lab" and tokenizer.get_vocab() != lab_tokenizer().get_vocab():
        raise UserError(f"invalid --data lab with --teacher {name}: lab documents use the lab vocabulary, which this "
                        "teacher's tokenizer does not have; use --teacher lab or pass --data FILE.jsonl")
    return tokenizer, teacher


def _check_output(args) -> None:
    """Raise UserError when --out holds other files or a cache built with other settings, unless --force."""
    import json
    from pathlib import Path

    from bganalysis.teacher_cache import MANIFEST

    out = Path(args.out)
    if args.force or not out.is_dir() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    if not manifest.is_file():
        if not any(out.glob("shard-*.safetensors")):
            raise UserError(f"--out {out} is a non-empty folder that is not a teacher cache; choose a new folder or delete it")
        return  # an unfinished cache: shards with the same settings are kept, others are rewritten
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = {}
    wanted = {"k": args.k, "loss_temperature": float(args.loss_temperature), "teacher": args.teacher}
    changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in wanted.items() if saved.get(key) != value]
    if changed:
        raise UserError(f"--out {out} holds a teacher cache built with other settings ({', '.join(changed)}); "
                        "pass --force to rebuild it, or choose another --out")
