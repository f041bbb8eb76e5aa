"""`bganalysis derive-student TEACHER_DIR --layers N --out DIR`: a shallower student from a teacher."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from bganalysis.errors import UserError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "derive-student",
        help="build a student by keeping N of the teacher's layers",
        description=(
            "Copy a teacher with fewer decoder layers: same width, embeddings, final norm and lm_head, "
            "weights of the kept layers copied, and the teacher's tokenizer saved beside it."
        ),
    )
    parser.add_argument("teacher", metavar="TEACHER_DIR", help="teacher model folder (or hub id)")
    parser.add_argument("--layers", type=int, required=True, metavar="N", help="number of decoder layers to keep")
    parser.add_argument(
        "--selection",
        choices=["spread", "first"],
        default="spread",
        help="which layers to keep: evenly spaced including the first and last (spread, default) or the first N",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model folder (replaced if it is a model folder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from bganalysis.io import atomic_directory
    from bganalysis.models import (
        check_model_output_folder,
        count_parameters,
        derive_student,
        load_causal_lm,
        load_tokenizer,
    )

    out_dir = check_model_output_folder(args.out)
    if out_dir == Path(args.teacher).expanduser().resolve():
        raise UserError(f"--out {out_dir} is the teacher folder; pass a different folder for the student")
    teacher = load_causal_lm(args.teacher)
    tokenizer = load_tokenizer(args.teacher)
    student = derive_student(teacher, args.layers, args.selection)

    with atomic_directory(out_dir) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info(
        "teacher %s: %d layers, %d parameters; student %s: %d layers %s, %d parameters",
        args.teacher,
        teacher.config.num_hidden_layers,
        count_parameters(teacher),
        out_dir,
        student.config.num_hidden_layers,
        student.config.bganalysis_derived_from_layers,
        count_parameters(student),
    )
