"""The files each benchmark reads from `--data-dir`, checked before any model loads.

A suite that runs for an hour must not stop at its fourth benchmark for a file that
was missing from the start, so `check_data_dir` looks for every file of every selected
benchmark first. The layout is the one `docs/eval.md` shows.
"""

from __future__ import annotations

from pathlib import Path

from bganalysis.errors import UserError

# Benchmark name -> files it reads, relative to --data-dir. A `*` pattern must match one file at least.
LOCAL_FILES = {
    "bbh": ("bbh/bbh/*.json",),
    "mmlu": ("mmlu/test/*_test.csv",),
    "arc_challenge": tuple(f"arc_challenge/ARC-Challenge-{split}.jsonl" for split in ("Train", "Dev", "Test")),
    "theoremqa": ("theoremqa/theoremqa_test.json",),
    "humanevalplus": ("humanevalplus/HumanEvalPlus.jsonl.gz",),
    "mbppplus": ("mbppplus/MbppPlus-767efcc.jsonl.gz",),
}


def missing_files(benchmark: str, data_dir: Path) -> list[Path]:
    """Return the files `benchmark` needs under `data_dir` that are missing, in a stable order."""
    data_dir = Path(data_dir)
    missing = []
    for pattern in LOCAL_FILES.get(benchmark, ()):
        if "*" in pattern:
            if not any(path.is_file() for path in data_dir.glob(pattern)):
                missing.append(data_dir / pattern)
        elif not (data_dir / pattern).is_file():
            missing.append(data_dir / pattern)
    # Subtasks are read in pairs: every BBH task needs its CoT prompt, every MMLU subject its dev shots.
    if benchmark == "bbh":
        missing += [data_dir / "bbh" / "cot-prompts" / f"{path.stem}.txt"
                    for path in sorted(data_dir.glob("bbh/bbh/*.json"))
                    if not (data_dir / "bbh" / "cot-prompts" / f"{path.stem}.txt").is_file()]
    if benchmark == "mmlu":
        for path in sorted(data_dir.glob("mmlu/test/*_test.csv")):
            subject = path.name.removesuffix("_test.csv")
            if not (data_dir / "mmlu" / "dev" / f"{subject}_dev.csv").is_file():
                missing.append(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv")
    return missing


def check_data_dir(benchmarks: list[str], data_dir: Path | None) -> None:
    """Raise UserError naming the first missing file of any of `benchmarks` under `data_dir`."""
    if data_dir is None:
        return
    for benchmark in benchmarks:
        missing = missing_files(benchmark, data_dir)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"--data-dir {data_dir}: {benchmark} needs {missing[0]}, which is missing{more}; "
                            "add the files in the layout of docs/eval.md, or leave the benchmark out with --benchmark")
