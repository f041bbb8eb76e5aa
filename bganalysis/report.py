"""report.md: what an analysis measured, stated in the terms of exposure bias and kappa.

Every sentence is computed from `analysis/summary.json`; nothing is templated as a claim.
Two students are called different only where their 95% bootstrap intervals do not
overlap, which is conservative for paired comparisons on the same prompts.
"""

from __future__ import annotations

from pathlib import Path

from bganalysis.analysis.labels import KAPPA_ESTIMATORS
from bganalysis.io import atomic_write_text


# Display name of each kappa estimator that `analyze --estimators` can label by, with the κ symbol.
ESTIMATOR_NAMES = {estimator: name.replace("kappa", "κ") for estimator, (_, name) in KAPPA_ESTIMATORS.items()}


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value, interval) -> str:
    if value is None:
        return "n/a"
    if not interval or interval[0] is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _separated(a: list, b: list) -> bool:
    return None not in (a[0], a[1], b[0], b[1]) and (a[1] < b[0] or b[1] < a[0])


def lowest_statement(students: dict, key: str, label: str) -> str:
    """Return one sentence naming the student with the lowest `key`, and whether it is clearly lowest."""
    ranked = sorted((entry[key], name) for name, entry in students.items() if entry.get(key) is not None)
    if not ranked:
        return f"- {label}: not measured (no positions in this region)."
    best_value, best = ranked[0]
    sentence = f"- Lowest {label}: **{best}** ({_with_ci(best_value, students[best][key + '_ci'])} nats/token)"
    if len(ranked) == 1:
        return sentence + "."
    runner_value, runner = ranked[1]
    if _separated(students[best][key + "_ci"], students[runner][key + "_ci"]):
        return sentence + f", clearly below the next, {runner} ({_fmt(runner_value)}): the intervals do not overlap."
    return sentence + f"; the next, {runner} ({_fmt(runner_value)}), is within the intervals, so this ranking is not settled at this sample size."


def tf_versus_eb(students: dict) -> list[str]:
    """Sentences on how TF and EB move between students (the trade the method studies)."""
    lowest_tf = min(students, key=lambda name: students[name]["tf_overall"])
    lowest_eb = min(students, key=lambda name: students[name]["eb_overall"])
    lines = [f"- Lowest TF (best match to the teacher on teacher-written prefixes): **{lowest_tf}** "
             f"({_fmt(students[lowest_tf]['tf_overall'])} nats/token)."]
    if lowest_tf == lowest_eb:
        lines.append(f"- The same student also has the lowest EB, so here a better teacher-forced fit did not cost exposure bias.")
    else:
        delta_tf = students[lowest_eb]["tf_overall"] - students[lowest_tf]["tf_overall"]
        delta_eb = students[lowest_tf]["eb_overall"] - students[lowest_eb]["eb_overall"]
        lines.append(f"- **{lowest_eb}** has a higher TF than {lowest_tf} by {_fmt(delta_tf)} nats/token but a lower EB "
                     f"by {_fmt(delta_eb)}: {'the EB gain is larger than the TF cost' if delta_eb > delta_tf else 'the TF cost is larger than the EB gain'}.")
    if "soft" in students and "hybrid" in students:
        soft, hybrid = students["soft"], students["hybrid"]
        lines.append(f"- Adding hard labels to soft ones (soft → hybrid) moved TF by {soft_delta(hybrid, soft, 'tf_overall')} "
                     f"and EB by {soft_delta(hybrid, soft, 'eb_overall')} nats/token.")
    return lines


def soft_delta(a: dict, b: dict, key: str) -> str:
    return f"{a[key] - b[key]:+.3f}"


def kappa_lines(summary: dict) -> list[str]:
    kappa = summary["kappa"]
    settings = summary["settings"]
    labels = summary["labels"]
    estimator = labels.get("estimator", "monte_carlo")
    actions = f"K = {settings['kappa_k']} teacher top tokens"
    if settings.get("kappa_include_observed"):
        actions += " plus the observed token"
    if settings.get("kappa_random"):
        actions += f" plus {settings['kappa_random']} random tokens"
    if estimator == "monte_carlo":
        method = (f"κ: Monte-Carlo, student-aware (student **{summary['kappa_student']}**), {actions}, "
                  f"R = {settings['kappa_rollouts']} rollouts, H = {settings['kappa_horizon']} states; "
                  f"mean standard error {_fmt(kappa['mean_se'])} nats.")
    else:
        method = (f"κ: teacher-only counterfactual (no student, no sampling; the Monte-Carlo estimator did not run), "
                  f"{actions}, H = {settings['kappa_horizon']} states.")
    lines = [f"{method} Labels: per {labels['scope']}, top {labels['bridge_fraction']:.0%} by {labels['ranking']} "
             f"= Bridge, bottom {labels['garden_fraction']:.0%} = Garden."]
    if "spearman_vs_exact" in kappa:
        lines.append("")
        name = ESTIMATOR_NAMES[estimator]
        lines.append(f"{name[0].upper()}{name[1:]} against the exact κ of the lab (dynamic programming): "
                     f"Spearman ρ = **{_fmt(kappa['spearman_vs_exact'])}**.")
        lines.append("")
        lines.append("| label set | precision vs exact labels | recall vs exact labels | precision vs true roles | recall vs true roles |")
        lines.append("|---|---|---|---|---|")
        for label in ("bridge", "garden"):
            exact, truth = kappa[f"{label}_vs_exact"], kappa[f"{label}_vs_true_role"]
            lines.append(f"| {label} | {_fmt(exact['precision'])} | {_fmt(exact['recall'])} | {_fmt(truth['precision'])} | {_fmt(truth['recall'])} |")
    teacher_only = kappa.get("teacher_only", {})
    if "spearman_vs_exact" in teacher_only:
        lines.append("")
        lines.append(f"Teacher-only counterfactual κ (no student): Spearman ρ = {_fmt(teacher_only['spearman_vs_exact'])} "
                     f"against exact κ, {_fmt(teacher_only['spearman_vs_kappa'])} against the Monte-Carlo estimate.")
    lines.append("")
    lines.append("Proxies, oriented as risk (Spearman ρ): " + ", ".join(
        f"{name}: {_fmt(entry.get('spearman_vs_exact', entry['spearman_vs_kappa']))}"
        for name, entry in kappa["proxies"].items())
        + (" against exact κ." if "spearman_vs_exact" in kappa else " against Monte-Carlo κ."))
    return lines


def write_report(run_dir: Path, summary: dict, timings: dict | None = None) -> Path:
    """Write `run_dir/report.md` from an analysis summary; return its path."""
    students = summary["students"]
    estimator = summary.get("labels", {}).get("estimator", "monte_carlo")
    lines = [
        f"# bganalysis report: {run_dir.name}",
        "",
        f"{summary['documents']} documents, {summary['positions']} response positions, students: {', '.join(students)}.",
        "TF: mean forward KL(teacher ‖ student) over teacher-written prefixes. RO: the same over prefixes the "
        "student wrote itself from the same prompts. **EB = RO − TF** (nats/token). Intervals: 95% bootstrap over documents.",
        "",
        "## Exposure bias",
        "",
        "| student | TF overall | RO overall | EB overall | EB Bridge | EB Garden | TF Bridge | TF Garden |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in students.items():
        lines.append(f"| {name} | {_with_ci(entry['tf_overall'], entry['tf_overall_ci'])} | {_with_ci(entry['ro_overall'], entry['ro_overall_ci'])} | "
                     f"{_with_ci(entry['eb_overall'], entry['eb_overall_ci'])} | {_with_ci(entry['eb_bridge'], entry['eb_bridge_ci'])} | "
                     f"{_with_ci(entry['eb_garden'], entry['eb_garden_ci'])} | {_fmt(entry['tf_bridge'])} | {_fmt(entry['tf_garden'])} |")
    lines += ["", "TF by region, with 95% intervals:", ""]
    for name, entry in students.items():
        lines.append(f"- {name}: Bridge {_with_ci(entry['tf_bridge'], entry['tf_bridge_ci'])}, "
                     f"Garden {_with_ci(entry['tf_garden'], entry['tf_garden_ci'])}")
    lines += ["", "What this run shows:", ""]
    lines.append(lowest_statement(students, "eb_bridge", "EB on Bridges"))
    lines.append(lowest_statement(students, "eb_garden", "EB on Gardens"))
    lines.append(lowest_statement(students, "eb_overall", "EB overall"))
    lines += tf_versus_eb(students)
    lines += ["", "## Risk κ and labels", ""] + kappa_lines(summary)
    lines += ["", "How to read these numbers:", "",
              "- κ(s) sums, over the action set, how much more loss-to-go forcing each token causes than following "
              "the teacher (nats, summed over H states and K actions), so it is on a larger scale than per-token EB. "
              "It can be negative, for example with an undertrained student.",
              "- Positions between the Bridge and Garden fractions stay unlabelled; the overall columns include them, "
              "so an overall value can lie outside both region values.",
              "- Bridge and Garden sets of equal size on both sides make precision equal recall against exact-κ labels.",
              "- The exact κ of the lab uses an idealised student (the teacher on clean prefixes, `docs/lab.md`); "
              "the teacher-only estimate needs no student, and the Monte-Carlo estimate uses the real one.",
              "- Hard labels sampled from the teacher (the default) have the same expected gradient as forward KL, "
              "so on the lab hard and soft students mainly differ in gradient noise; `--hard-target argmax` "
              "makes the hard labels differ in kind."]
    lines += ["", "## Figures", ""]
    for name, caption in (("training_curves", "loss parts during training"),
                          ("eb_per_step", "EB, TF and RO per decoding step"),
                          ("eb_regions", "EB and TF by region"),
                          ("kappa_map", "κ per token with Bridge/Garden marks"),
                          ("kappa_vs_exact", f"{ESTIMATOR_NAMES[estimator]} against exact κ (lab)"),
                          *((path.stem, f"windowed EB, W = {path.stem.rpartition('_w')[2]}")
                            for path in sorted((run_dir / "figures").glob("eb_per_step_w*.png"))),
                          ("eb_region_steps", "EB per step on Bridge and Garden positions"),
                          ("kappa_vs_proxies", "κ against each teacher proxy, with Spearman ρ"),
                          ("kappa_by_region", "κ distribution per region"),
                          ("estimator_agreement", "rank agreement of the κ estimators and proxies"),
                          ("benchmark_decomposition", "benchmark deltas next to Bridge and Garden EB")):
        if (run_dir / "figures" / f"{name}.png").exists():
            lines.append(f"![{caption}](figures/{name}.png)")
            lines.append("")
    if timings:
        lines.append(f"Wall time: {timings.get('total_seconds')} s in all, {timings.get('train_seconds')} s of it training.")
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
