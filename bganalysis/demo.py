"""The demo: the whole pipeline on the built-in lab, in a few minutes on a laptop CPU.

It writes the exact lab teacher, trains hard, soft, hybrid and argmax-hard students on the same lab
documents with the same seed and token budget, analyses them on held-out lab prompts,
and writes `report.md`. `DemoSize` is the budget; `QUICK` is for tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bganalysis.io import atomic_directory, atomic_write_text

log = logging.getLogger(__name__)

# Student name -> (method, hard target). Sampled hard labels share forward KL's expected
# gradient, so the argmax student is the one whose hard labels differ in kind from soft ones.
STUDENTS = {
    "hard": ("hard", "sample"),
    "soft": ("soft", "sample"),
    "hybrid": ("hybrid", "sample"),
    "hard_argmax": ("hard", "argmax"),
}


@dataclass(frozen=True)
class DemoSize:
    """Budget of one demo run; the defaults fit in about 5 minutes on 2 CPU cores."""

    train_steps: int = 1000
    train_docs: int = 2000
    batch_size: int = 16
    analysis_docs: int = 120
    ro_samples: int = 4
    kappa_k: int = 4
    kappa_rollouts: int = 4
    kappa_horizon: int = 8
    bootstrap: int = 1000


QUICK = DemoSize(train_steps=20, train_docs=64, batch_size=8, analysis_docs=4, ro_samples=1,
                 kappa_k=3, kappa_rollouts=2, kappa_horizon=3, bootstrap=50)


def run_demo(out: str | Path, size: DemoSize = DemoSize(), seed: int = 0, lam: float = 0.5) -> dict:
    """Run the demo into `out`; return the analysis summary."""
    from bganalysis.analysis.figures import write_training_curves
    from bganalysis.analysis.pipeline import AnalyzeConfig, run_analysis
    from bganalysis.analysis.setup import lab_prompt_rows
    from bganalysis.io import atomic_write_json
    from bganalysis.lab import LabTeacher, lab_tokenizer
    from bganalysis.report import write_report
    from bganalysis.train import TrainConfig, train

    out = Path(out)
    started = time.time()
    with atomic_directory(out / "teacher") as folder:
        LabTeacher().save_pretrained(folder)
        lab_tokenizer().save_pretrained(folder)

    students = []
    for name, (method, hard_target) in STUDENTS.items():
        config = TrainConfig(method=method, lam=lam if method == "hybrid" else None, hard_target=hard_target,
                             teacher="lab", data="lab",
                             num_docs=size.train_docs, steps=size.train_steps, batch_size=size.batch_size,
                             seed=seed, out=str(out), name=name, device="cpu",
                             force=True)  # a demo rebuilds its whole run folder, so older students are replaced
        log.info("training the %s student (%d steps)", name, size.train_steps)
        students.append(str(train(config)))
    train_seconds = time.time() - started

    rows = lab_prompt_rows(size.analysis_docs, seed=10_000 + seed)
    atomic_write_text(out / "prompts.jsonl", "".join(_json_line(row) for row in rows))
    analysis = AnalyzeConfig(teacher=str(out / "teacher"), students=students, out=str(out),
                             prompts=str(out / "prompts.jsonl"), ro_samples=size.ro_samples,
                             kappa_k=size.kappa_k, kappa_rollouts=size.kappa_rollouts,
                             kappa_horizon=size.kappa_horizon, bootstrap=size.bootstrap, seed=seed,
                             force=True)  # the students were just retrained, so older shards are stale
    summary = run_analysis(analysis)
    timings = {"train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - started, 1)}

    write_training_curves(out / "figures", out / "students")
    atomic_write_json(out / "demo.json", {"size": asdict(size), "seed": seed, "lam": lam, **timings})
    write_run_config(out, size, seed, lam)
    write_report(out, summary, timings)
    log.info("demo finished in %.0f s; report: %s", timings["total_seconds"], out / "report.md")
    return summary


def _json_line(row: dict) -> str:
    import json

    return json.dumps({"id": row["id"], "prompt": row["prompt"]}) + "\n"


def write_run_config(out: Path, size: DemoSize, seed: int, lam: float) -> None:
    """config.yaml at the run root: the demo's settings, versions and seed."""
    import yaml

    from bganalysis.provenance import provenance

    settings = {
        "job": "demo",
        "seed": seed,
        "lam_hybrid": lam,
        "size": asdict(size),
        "students": {name: f"students/{name}/train_config.yaml" for name in STUDENTS},
        "analysis": "analysis/summary.json (settings)",
        "provenance": provenance(),
    }
    atomic_write_text(out / "config.yaml", yaml.safe_dump(settings, sort_keys=False))
