"""The benchmark suites of `eval_configs/`: `reasoning`, `code` and `all`.

A suite file names its benchmarks with the engine that runs each, the shot count, the
metrics and a one-line description, and states a version that changes whenever a
prompt or a metric does. `all` includes the other suites.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from bganalysis.errors import UserError
from bganalysis.evaluation.tasks import CONFIG_DIR


@dataclass(frozen=True)
class Benchmark:
    name: str
    engine: str  # "lm_eval" or "evalplus"
    suite: str  # the suite file that defines it
    suite_version: int
    shots: int
    metrics: tuple[str, ...]
    about: str
    task: Path | None = None  # lm-eval task template
    dataset: str | None = None  # evalplus dataset name

    def definition_hash(self) -> str:
        """A hash of what defines the benchmark's numbers: its template file and suite entry."""
        text = repr((self.name, self.engine, self.suite, self.suite_version, self.shots, self.metrics, self.dataset))
        if self.task is not None:
            text += self.task.read_text(encoding="utf-8")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def suite_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(path.stem for path in config_dir.glob("*.yaml"))


def load_suite(name: str, config_dir: Path = CONFIG_DIR) -> tuple[int, list[Benchmark]]:
    """(version, benchmarks) of suite `name`; UserError for an unknown suite."""
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--suite {name!r} is unknown; use one of {', '.join(suite_names(config_dir))} "
                        "(bganalysis eval --list-suites)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    benchmarks = []
    for included in spec.get("includes", []):
        benchmarks += load_suite(included, config_dir)[1]
    for entry in spec.get("benchmarks", []):
        benchmarks.append(Benchmark(
            name=entry["name"], engine=entry["engine"], suite=spec["suite"], suite_version=int(spec["version"]),
            shots=int(entry["shots"]), metrics=tuple(entry["metrics"]), about=entry["about"],
            task=config_dir / entry["task"] if "task" in entry else None, dataset=entry.get("dataset")))
    return int(spec["version"]), benchmarks


def select_benchmarks(suite: str, benchmarks: list[Benchmark], names: tuple[str, ...]) -> list[Benchmark]:
    """Return the benchmarks of `suite` named in `names`, in suite order (all when `names` is empty)."""
    known = [benchmark.name for benchmark in benchmarks]
    for name in names:
        if name not in known:
            homes = [other for other in suite_names() if other not in (suite, "all")
                     and name in {benchmark.name for benchmark in load_suite(other)[1]}]
            elsewhere = f"pass --suite {homes[0]} for it, or " if homes else ""
            raise UserError(f"--benchmark {name!r} is not in suite {suite}; {elsewhere}use one of {', '.join(known)} "
                            "(bganalysis eval --list-suites)")
    return [benchmark for benchmark in benchmarks if not names or benchmark.name in names]


def describe_suites(config_dir: Path = CONFIG_DIR) -> str:
    """The text of `bganalysis eval --list-suites`."""
    lines = []
    for name in suite_names(config_dir):
        version, benchmarks = load_suite(name, config_dir)
        lines.append(f"{name} (version {version}): {', '.join(b.name for b in benchmarks)}")
        for benchmark in benchmarks:
            lines.append(f"  {benchmark.name:<14} {benchmark.engine:<8} {benchmark.shots}-shot  "
                         f"{', '.join(benchmark.metrics):<26} {benchmark.about}")
    return "\n".join(lines)
