"""The files each benchmark reads from `--data-dir`, checked before any model loads.

A suite that runs for an hour must not stop at its fourth benchmark for a file that
was missing from the start, so `check_data_dir` looks for every file of every selected
benchmark first. `bganalysis eval` calls it before it loads a model, and
`evaluate_model` before its first benchmark. The layout is the one `docs/eval.md` shows.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bganalysis.errors import UserError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
# Subtask files of the full BBH (27 tasks) and MMLU (57 subjects) releases.
RELEASE_SUBTASKS = {"bbh": ("bbh/bbh/*.json", 27), "mmlu": ("mmlu/test/*_test.csv", 57)}
# Benchmark name -> files it reads, relative to --data-dir. A `*` pattern must match one file at least.
LOCAL_FILES = {
    "bbh": ("bbh/bbh/*.json",),
    "mmlu": ("mmlu/test/*_test.csv",),
    "arc_challenge": tuple(f"arc_challenge/ARC-Challenge-{split}.jsonl" for split in ("Train", "Dev", "Test")),
    "theoremqa": ("theoremqa/theoremqa_test.json",),
    "humanevalplus": ("humanevalplus/HumanEvalPlus.jsonl.gz",),
    "mbppplus": ("mbppplus/MbppPlus-767efcc.jsonl.gz",),
}


def _problem(path: Path) -> str | None:
    """Return why `path` cannot be read as a data file (missing, empty, not gzip), or None."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    if path.suffix == ".gz":
        with path.open("rb") as handle:
            if handle.read(2) != GZIP_MAGIC:
                return "not a gzip file"
    return None


def file_problems(benchmark: str, data_dir: Path) -> list[tuple[Path, str]]:
    """Return (path, problem) for each file `benchmark` needs under `data_dir` and cannot read, in a stable order."""
    data_dir = Path(data_dir)
    needed = []
    for pattern in LOCAL_FILES.get(benchmark, ()):
        paths = sorted(data_dir.glob(pattern)) if "*" in pattern else [data_dir / pattern]
        needed += paths or [data_dir / pattern]  # a pattern that matches nothing is itself missing
    # Subtasks are read in pairs: every BBH task needs its CoT prompt, every MMLU subject its dev shots.
    if benchmark == "bbh":
        needed += [data_dir / "bbh" / "cot-prompts" / f"{path.stem}.txt"
                   for path in sorted(data_dir.glob("bbh/bbh/*.json"))]
    if benchmark == "mmlu":
        needed += [data_dir / "mmlu" / "dev" / path.name.replace("_test.csv", "_dev.csv")
                   for path in sorted(data_dir.glob("mmlu/test/*_test.csv"))]
    return [(path, problem) for path in needed if (problem := _problem(path))]


def check_data_dir(benchmarks: list[str], data_dir: Path | None) -> None:
    """Raise UserError naming the first unreadable file of any of `benchmarks` under `data_dir`."""
    if data_dir is None:
        return
    for benchmark in benchmarks:
        problems = file_problems(benchmark, data_dir)
        if problems:
            (path, problem), more = problems[0], f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
            raise UserError(f"--data-dir {data_dir}: {benchmark} needs {path}, which is {problem}{more}; add the files "
                            "in the layout of docs/eval.md, or select the other benchmarks with --benchmark")


def warn_if_partial(benchmark: str, data_dir: Path) -> None:
    """Log a warning when `data_dir` has fewer BBH tasks or MMLU subjects than their release.

    Such a subset is allowed (it may be on purpose), but the score then covers only those subtasks.
    """
    if benchmark in RELEASE_SUBTASKS:
        pattern, total = RELEASE_SUBTASKS[benchmark]
        found = len(list(Path(data_dir).glob(pattern)))
        if found < total:
            log.warning("--data-dir %s: %s has %d of the %d subtasks of its release; its score covers only those",
                        data_dir, benchmark, found, total)
