"""`bganalysis bench analysis`: the batched KV-cached rollout engine against the plain reference.

Both paths take the same uniforms, so they draw the same tokens and their kappa and
loss values agree up to float rounding, unless rounding flips a draw (see
`measure_continuation`). The benchmark measures

- kappa: `encode_document` plus `rollouts_after_actions` (teacher and student runners)
  against `reference.reference_rollouts` (a full forward per step, one row at a time),
  in seconds per position at K actions, R rollouts and H states;
- the own-continuation part of exposure bias: `sample_continuation` by the student
  plus teacher scoring, against `reference.reference_continuation` plus a full teacher
  forward per step, in seconds per continuation of `eb_new_tokens` tokens;
- the standard error of the variance-reduced (stratified) kappa estimator over the one
  of plain Monte Carlo (independent uniforms, R rollouts per action), at equal model
  calls, measured from independent replicates of each estimator (see `measure_se_ratio`);
- the Spearman rho of Monte-Carlo kappa against the exact kappa on the lab;
- the engine's tokens/s against a FLOP-count bound for this machine.

The reference costs the same for every row because it never stops early, so its time
scales linearly with the rollouts it runs. With `BenchSize.reference_rollouts` below R
it runs only the first rollouts of each action, and its time is scaled up to R. Kappa
is compared on that subset.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bganalysis.analysis.kappa import action_weights, kappa_from_q, monte_carlo_kappa, select_actions
from bganalysis.analysis.kappa_sampling import RolloutSpread, kappa_standard_error
from bganalysis.losses import kl_from_logprobs
from bganalysis.reference import next_logprobs, reference_continuation, reference_rollouts
from bganalysis.rollout import ModelRunner, rollouts_after_actions, sample_continuation

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz"
DEFAULT_TEACHER_CACHE = Path("~/.cache/bganalysis/smollm2").expanduser()


@dataclass(frozen=True)
class BenchSize:
    """Budget of one benchmark run.

    With 1 thread and a core of its own (2-core AMD EPYC), `QUICK` took 4 min 46 s and the
    default budget 16 min 33 s (docs/benchmarks.md).
    """

    prompt_tokens: int = 150  # length of the document the kappa positions lie in
    kappa_k: int = 8
    kappa_rollouts: int = 4
    kappa_horizon: int = 8
    engine_positions: int = 16  # positions the engine runs (also the se-ratio positions)
    reference_positions: int = 2  # positions the reference runs, a centred subset of the engine's
    reference_rollouts: int = 4  # rollouts per action the reference runs (>= 2, <= kappa_rollouts)
    eb_new_tokens: int = 64
    eb_engine_rows: int = 4
    eb_reference_rows: int = 2
    lab_docs: int = 40  # the documented lab validation budget (docs/lab.md)
    lab_train_steps: int = 3000
    lab_k: int = 2
    lab_grid_docs: int = 20  # lab prompts per cell of the R x K grid
    lab_rollouts: int = 4
    lab_horizon: int = 8
    grid: bool = True  # lab validation over lab_validation.GRID_ROLLOUTS x GRID_ACTIONS
    se_replicates: int = 4  # independent replicates per position and estimator for the se ratio (>= 2)

    def __post_init__(self):
        if not 2 <= self.reference_rollouts <= self.kappa_rollouts:
            raise ValueError(f"reference_rollouts {self.reference_rollouts} is invalid: it must be in "
                             f"[2, kappa_rollouts={self.kappa_rollouts}] (the standard error needs two rollouts)")
        if self.se_replicates < 2:
            raise ValueError(f"se_replicates {self.se_replicates} is invalid: it must be >= 2 (a variance needs two)")
        if not 1 <= self.reference_positions <= self.engine_positions:
            raise ValueError(f"reference_positions {self.reference_positions} is invalid: it must be in "
                             f"[1, engine_positions={self.engine_positions}]")


QUICK = BenchSize(engine_positions=6, reference_positions=1, reference_rollouts=2, eb_engine_rows=4,
                  eb_reference_rows=1, grid=False, se_replicates=3, lab_docs=20, lab_train_steps=600)


def matmul_gflops(size: int = 1024, min_seconds: float = 0.5) -> float:
    """Measure fp32 `torch.matmul` of two size x size matrices at the current thread count, GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        torch.matmul(a, b)
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token(model) -> float:
    """Estimate forward FLOPs per token as 2 x (non-embedding parameters + lm_head parameters).

    NOTE: attention over the context (about 4 x context x width FLOPs per layer) is left
    out. By that estimate it adds about 4% for SmolLM2-135M at 150 tokens of context.
    """
    unique = {id(p): p.numel() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_embedding = sum(unique.values()) - embedding.numel() - (head.numel() if id(head) != id(embedding) else 0)
    return 2.0 * (non_embedding + head.numel())


def centred_subset(count: int, total: int) -> list[int]:
    """Indices of `count` items spread evenly over `total`, each in the middle of its share."""
    return [int((i + 0.5) * total / count) for i in range(count)]


def _paired_kappa_se(q: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Kappa and its standard error from per-rollout Q [R, K] under common random numbers."""
    kappa = float(kappa_from_q(q.mean(axis=0), weights)["kappa"])
    return kappa, kappa_standard_error(list(q.T), weights, paired=True)


def _q_per_rollout(losses: torch.Tensor, num_actions: int, rollouts: int) -> np.ndarray:
    """Q per rollout [R, K] from action-major per-state losses [K * R, H]."""
    return losses.sum(dim=1).double().numpy().reshape(num_actions, rollouts).T


def measure_kappa(teacher, student, ids: list[int], size: BenchSize, eos_ids: set[int], vocab_size: int,
                  seed: int = 0) -> dict:
    """Time kappa in the engine and the reference on one document and compare the values.

    Positions are prefix lengths spread over the last quarter of `ids`. Returns seconds
    per position, the speedup, the largest kappa difference in standard errors, the
    standard-error ratio of common against independent uniforms, and the engine's tokens/s.
    """
    k, r, h = size.kappa_k, size.kappa_rollouts, size.kappa_horizon
    prefixes = np.unique(np.linspace(max(1, len(ids) * 3 // 4), len(ids), size.engine_positions).round().astype(int))
    positions, encode_seconds, rollout_seconds = _engine_kappa(teacher, student, ids, prefixes.tolist(), size,
                                                               eos_ids, vocab_size, seed)
    engine_seconds = encode_seconds + rollout_seconds
    # Each runner reads the document once, then feeds H tokens a row (the forced action and H - 1 more):
    # the rows start from the cache of the whole prefix.
    tokens_per_model = len(ids) + len(positions) * k * r * h
    tokens_per_second = 2 * tokens_per_model / engine_seconds

    compared = [positions[i] for i in centred_subset(min(size.reference_positions, len(positions)), len(positions))]
    reference = _reference_kappa(teacher, student, ids, compared, size.reference_rollouts, eos_ids, vocab_size)
    reference_per_position = reference["seconds"] / len(compared) * r / size.reference_rollouts
    engine_per_position = engine_seconds / len(positions)
    return {
        "kappa_engine_positions": len(positions),
        "kappa_reference_positions": len(compared),
        "kappa_reference_rollouts_timed": size.reference_rollouts,
        "kappa_engine_encode_seconds": encode_seconds,
        "kappa_engine_seconds_per_position": engine_per_position,
        "kappa_reference_seconds_per_position": reference_per_position,
        "kappa_speedup_vs_reference": reference_per_position / engine_per_position,
        "kappa_max_abs_diff_vs_reference_in_se": reference["max_diff_in_se"],
        "kappa_identical_rollouts_vs_reference": reference["identical_fraction"],
        **measure_se_ratio(teacher, student, ids, positions, size, eos_ids, vocab_size, seed),
        "tokens_per_second": tokens_per_second,
        **flop_bound(teacher, student, tokens_per_second),
    }


def _engine_kappa(teacher, student, ids: list[int], prefixes: list[int], size: BenchSize, eos_ids: set[int],
                  vocab_size: int, seed: int) -> tuple[list[dict], float, float]:
    """Run the engine at each prefix with uniforms shared across actions (timed), as the reference will.

    Returns per-position records, the encode seconds and the timed rollout seconds.
    """
    k, r, h = size.kappa_k, size.kappa_rollouts, size.kappa_horizon
    teacher_runner, student_runner = ModelRunner(teacher, vocab_size), ModelRunner(student, vocab_size)
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    teacher_logprobs = teacher_runner.encode_document(torch.tensor(ids))
    student_runner.encode_document(torch.tensor(ids))
    encode_seconds = time.perf_counter() - start

    rollout_seconds, positions = 0.0, []
    for prefix in tqdm(prefixes, desc="kappa engine", unit="position"):
        actions = select_actions(teacher_logprobs[prefix - 1], k)
        weights = action_weights(teacher_logprobs[prefix - 1], actions)
        shared = torch.rand(r, h - 1, generator=generator).expand(len(actions), r, h - 1)

        start = time.perf_counter()
        sample = rollouts_after_actions(teacher_runner, {"s": student_runner}, prefix, actions, shared, eos_ids)
        rollout_seconds += time.perf_counter() - start

        positions.append({"prefix": prefix, "actions": actions, "weights": weights, "uniforms": shared,
                          "logprobs": teacher_logprobs[prefix - 1], "tokens": sample.tokens.reshape(len(actions), r, h),
                          "q": _q_per_rollout(sample.losses["s"], len(actions), r)})
    return positions, encode_seconds, rollout_seconds


def measure_se_ratio(teacher, student, ids: list[int], positions: list[dict], size: BenchSize, eos_ids: set[int],
                     vocab_size: int, seed: int = 0) -> dict:
    """Compare the stratified kappa estimator with plain Monte Carlo at K * R rollouts each, by replicates.

    Plain Monte Carlo (independent uniforms, R rollouts per action) has variance
    sum_a c_a^2 var(Q_a) / R exactly, so one batch of `se_replicates` * R rollouts per
    action estimates it. The stratified estimator's rollouts are not independent, so its
    variance is measured as the spread of `se_replicates` independent runs; each run
    carries its own `RolloutSpread` from position to position, as the analysis does in a
    document. The ratio is sqrt(mean variance stratified / mean variance plain) over the
    positions, the RMS standard error ratio. The mean difference of the two estimators,
    in units of its standard error, checks that the stratified one is unbiased.
    """
    k, r, h, g = size.kappa_k, size.kappa_rollouts, size.kappa_horizon, size.se_replicates
    teacher_runner, student_runner = ModelRunner(teacher, vocab_size), ModelRunner(student, vocab_size)
    teacher_runner.encode_document(torch.tensor(ids))
    student_runner.encode_document(torch.tensor(ids))
    spreads = [RolloutSpread() for _ in range(g)]
    plain_variances, stratified_variances, differences = [], [], []
    for index, position in enumerate(tqdm(positions, desc="kappa se ratio", unit="position")):
        prefix, actions, weights = position["prefix"], position["actions"], position["weights"]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 7 + index)
        plain = monte_carlo_kappa(teacher_runner, student_runner, prefix, position["logprobs"], actions, g * r, h,
                                  generator, eos_ids, sampling="independent")
        plain_variances.append(g * plain["kappa_se"] ** 2)  # the variance at R rollouts per action
        runs = [monte_carlo_kappa(teacher_runner, student_runner, prefix, position["logprobs"], actions, r, h,
                                  generator, eos_ids, sampling="stratified", spread=spreads[replicate])["kappa"]
                for replicate in range(g)]
        stratified_variances.append(float(np.var(runs, ddof=1)))
        differences.append((float(np.mean(runs)) - plain["kappa"],
                            plain["kappa_se"] ** 2 + stratified_variances[-1] / g))
    difference = sum(d for d, _ in differences) / len(differences)
    difference_se = math.sqrt(sum(v for _, v in differences)) / len(differences)
    return {"kappa_se_ratio_vs_plain": math.sqrt(np.mean(stratified_variances) / np.mean(plain_variances)),
            "kappa_se_ratio_replicates": g,
            "kappa_stratified_minus_plain_in_se": difference / difference_se if difference_se > 0 else 0.0}


def flop_bound(teacher, student, tokens_per_second: float) -> dict:
    """Compare tokens/s of teacher and student together with the FLOP-count bound of this machine.

    Both models read the same number of tokens, so the bound is the matmul rate times
    2 over the FLOPs per token of teacher and student summed.
    """
    rate = matmul_gflops() * 1e9
    bound = rate * 2 / (flops_per_token(teacher) + flops_per_token(student))
    return {"matmul_gflops": rate / 1e9, "flop_bound_tokens_per_second": bound,
            "fraction_of_flop_bound": tokens_per_second / bound}


def _reference_kappa(teacher, student, ids: list[int], positions: list[dict], rollouts: int,
                     eos_ids: set[int], vocab_size: int) -> dict:
    """Run `reference_rollouts` on the first `rollouts` rollouts of each position; compare kappa."""
    seconds, max_diff_in_se, identical_rows, rows = 0.0, 0.0, 0, 0
    progress = tqdm(total=len(positions) * len(positions[0]["actions"]), desc="kappa reference", unit="action")
    for position in positions:
        prefix, actions = ids[: position["prefix"]], position["actions"]
        q = np.zeros((rollouts, len(actions)))
        for a in range(len(actions)):
            start = time.perf_counter()
            sample = reference_rollouts(teacher, {"s": student}, prefix, actions[a:a + 1],
                                        position["uniforms"][a:a + 1, :rollouts], eos_ids, vocab_size)
            seconds += time.perf_counter() - start
            q[:, a] = sample.losses["s"].sum(dim=1).double().numpy()
            matches = (sample.tokens == position["tokens"][a, :rollouts]).all(dim=1)
            identical_rows, rows = identical_rows + int(matches.sum()), rows + len(matches)
            progress.update(1)

        engine_kappa, engine_se = _paired_kappa_se(position["q"][:rollouts], position["weights"])
        reference_kappa, _ = _paired_kappa_se(q, position["weights"])
        difference = abs(engine_kappa - reference_kappa)
        if engine_se > 0:
            max_diff_in_se = max(max_diff_in_se, difference / engine_se)
        elif difference > 0:
            max_diff_in_se = math.inf  # rollouts agree among themselves but not with the reference
    progress.close()
    return {"seconds": seconds, "max_diff_in_se": max_diff_in_se, "identical_fraction": identical_rows / rows}


def measure_continuation(teacher, student, ids: list[int], size: BenchSize, eos_ids: set[int], vocab_size: int,
                         seed: int = 0) -> dict:
    """Time the student's own continuations after `ids` plus teacher scoring, engine against reference.

    Returns seconds per continuation row (the engine's encode included, shared by its
    rows), the speedup, and the largest per-state loss difference (nats) on the rows both
    ran. Rounding differs between a batch and a single row, and in a flat distribution
    that can flip one inverse-CDF draw, after which the rows write different text. So
    losses are compared only up to the first differing token, and the mean count of
    identical leading tokens is returned too.
    """
    new_tokens = size.eb_new_tokens
    uniforms = torch.rand(size.eb_engine_rows, new_tokens, generator=torch.Generator().manual_seed(seed + 1))
    teacher_runner, student_runner = ModelRunner(teacher, vocab_size), ModelRunner(student, vocab_size)

    start = time.perf_counter()
    teacher_runner.encode_document(torch.tensor(ids))
    student_runner.encode_document(torch.tensor(ids))
    tokens, alive, student_logprobs = sample_continuation(student_runner, len(ids), uniforms, eos_ids)
    rows = teacher_runner.rows_from_prefix(len(ids), tokens.shape[0])
    teacher_logprobs = teacher_runner.extend(rows, tokens, keep=tokens.shape[1] + 1)[:, :-1]
    engine_losses = kl_from_logprobs(teacher_logprobs, student_logprobs) * alive
    engine_seconds = time.perf_counter() - start

    reference_rows = min(size.eb_reference_rows, size.eb_engine_rows)
    start, max_diff, identical = time.perf_counter(), 0.0, []
    for row in tqdm(range(reference_rows), desc="continuation reference", unit="row"):
        row_tokens, row_alive, row_student = reference_continuation(student, ids, uniforms[row:row + 1], eos_ids, vocab_size)
        row_teacher = torch.stack([next_logprobs(teacher, ids + row_tokens[0, :step].tolist(), vocab_size)
                                   for step in range(row_tokens.shape[1])])
        row_losses = kl_from_logprobs(row_teacher, row_student[0]) * row_alive[0]
        width = min(row_losses.shape[0], engine_losses.shape[1])
        differs = (row_tokens[0, :width] != tokens[row, :width]).nonzero()
        same = int(differs[0]) if len(differs) else width
        identical.append(same)
        compared = min(same + 1, width)  # the state before the first differing token still has the same prefix
        max_diff = max(max_diff, float((row_losses[:compared] - engine_losses[row, :compared]).abs().max()))
    reference_seconds = time.perf_counter() - start

    engine_per_row = engine_seconds / size.eb_engine_rows
    reference_per_row = reference_seconds / reference_rows
    return {
        "eb_new_tokens": new_tokens,
        "eb_engine_rows": size.eb_engine_rows,
        "eb_reference_rows": reference_rows,
        "eb_engine_seconds_per_row": engine_per_row,
        "eb_reference_seconds_per_row": reference_per_row,
        "eb_speedup_vs_reference": reference_per_row / engine_per_row,
        "eb_max_abs_diff_vs_reference": max_diff,
        "eb_identical_tokens_vs_reference": float(np.mean(identical)),
        "eb_rollout_loss_mean": float(engine_losses.sum() / alive.sum().clamp(min=1)),
    }


def resolve_teacher(path: str | None) -> Path:
    """Return the SmolLM2 teacher folder: `path`, or a converted copy in DEFAULT_TEACHER_CACHE."""
    from bganalysis.models import import_gguf, smollm2_gguf_path

    if path is not None:
        return Path(path)
    if not (DEFAULT_TEACHER_CACHE / "config.json").is_file():
        log.info("converting SmolLM2-135M-Instruct into %s", DEFAULT_TEACHER_CACHE)
        import_gguf(smollm2_gguf_path(), DEFAULT_TEACHER_CACHE)
    return DEFAULT_TEACHER_CACHE


def code_documents(prompts: Path, tokenizer, length: int, count: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` prompts that have at least that many.

    Plain tokenisation: no chat template and no special tokens.
    """
    from bganalysis.errors import UserError
    from bganalysis.io import read_prompts

    documents = []
    for row in read_prompts(prompts):
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            documents.append(ids[:length])
        if len(documents) == count:
            return documents
    raise UserError(f"{prompts} has fewer than {count} prompts of at least {length} tokens; pass another --prompts file")


def run_bench(teacher: str | None, prompts: str | None, out: str, size: BenchSize, seed: int = 0) -> dict:
    """Run every measurement of the benchmark with SmolLM2 and the lab; return the result keys."""
    from bganalysis.analysis.setup import _eos_ids
    from bganalysis.errors import UserError
    from bganalysis.io import atomic_write_json
    from bganalysis.models import count_parameters, derive_student, load_causal_lm, load_tokenizer

    started = time.perf_counter()
    out_dir = Path(out)
    prompts_path = Path(prompts) if prompts is not None else DEFAULT_PROMPTS
    if not prompts_path.is_file():
        raise UserError(f"prompts file not found: {prompts_path}; pass --prompts with HumanEval.jsonl.gz or another prompt file")
    teacher_dir = resolve_teacher(teacher)
    log.info("settings: %s; teacher %s; prompts %s; torch threads %d", asdict(size), teacher_dir, prompts_path,
             torch.get_num_threads())

    teacher_model = load_causal_lm(str(teacher_dir), dtype=torch.float32)
    student_model = derive_student(teacher_model, 6)
    tokenizer = load_tokenizer(str(teacher_dir))
    eos_ids, vocab_size = _eos_ids(tokenizer, teacher_model), len(tokenizer)
    log.info("teacher %d parameters, student %d (6 of %d layers)", count_parameters(teacher_model),
             count_parameters(student_model), teacher_model.config.num_hidden_layers)
    kappa_document, continuation_prompt = code_documents(prompts_path, tokenizer, size.prompt_tokens, 2)

    result = {"threads": torch.get_num_threads(), "prompt_tokens": size.prompt_tokens, "kappa_k": size.kappa_k,
              "kappa_rollouts": size.kappa_rollouts, "kappa_horizon": size.kappa_horizon}
    result.update(measure_kappa(teacher_model, student_model, kappa_document, size, eos_ids, vocab_size, seed))
    result.update(measure_continuation(teacher_model, student_model, continuation_prompt, size, eos_ids, vocab_size, seed))
    del teacher_model, student_model

    from bganalysis.bench.lab_validation import lab_validation, rho_grid, train_lab_student

    lab_student = train_lab_student(out_dir / "lab", size.lab_train_steps, seed)
    lab = lab_validation(lab_student, out_dir / "lab" / "main", size.lab_docs, size.lab_k, size.lab_rollouts,
                         size.lab_horizon, seed)
    result["kappa_spearman_vs_exact"] = lab.pop("rho")
    result.update({f"lab_{key}": value for key, value in lab.items()})
    result.update({"lab_k": size.lab_k, "lab_rollouts": size.lab_rollouts, "lab_horizon": size.lab_horizon,
                   "lab_docs": size.lab_docs, "lab_train_steps": size.lab_train_steps})
    if size.grid:
        grid = rho_grid(lab_student, out_dir, size, seed)
        result["rho_grid"] = {f"K{row['kappa_k']}_R{row['kappa_rollouts']}": row["rho"] for row in grid}
        result["rho_figure"] = str(out_dir / "rho_vs_budget.png")
    result["total_seconds"] = time.perf_counter() - started
    atomic_write_json(out_dir / "bench_analysis.json", result)
    return result
