"""`bganalysis analyze`: exposure bias, kappa and Bridge/Garden labels for a run.

Per document, in order: the teacher and every student read the prompt plus the teacher
response once (teacher-forced losses, and the KV caches the later steps reuse); kappa
is estimated at every response position with the reference student; then every
student writes its own continuations from the prompt (the same uniforms for every
student) and the teacher scores them. Tables and figures are written at the end.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bganalysis.analysis import documents as docs_module
from bganalysis.analysis.documents import AnalysisDocument, generator_for
from bganalysis.analysis.details import first_continuation, top_next_tokens
from bganalysis.analysis.kappa import (KAPPA_COLUMNS, action_weights, kappa_from_q, monte_carlo_kappa,
                                      select_actions, teacher_only_kappa, teacher_proxies)
from bganalysis.analysis.kappa_sampling import KAPPA_SAMPLING, RolloutSpread
from bganalysis.analysis.labels import KAPPA_ESTIMATORS, estimator_column
from bganalysis.analysis.shards import ShardStore, model_signature, process_rank, shard_ranges
from bganalysis.analysis.statistics import StepArrays
from bganalysis.errors import UserError
from bganalysis.losses import kl_from_logprobs
from bganalysis.rollout import ModelRunner, sample_continuation

log = logging.getLogger(__name__)


@dataclass
class AnalyzeConfig:
    """Settings of one analysis; validated at construction."""

    teacher: str
    students: list[str]
    out: str
    prompts: str | None = None  # JSONL; None with the lab teacher samples lab prompts
    student_names: list[str] | None = None
    max_docs: int | None = None
    num_lab_docs: int = 40
    max_new_tokens: int = 64  # teacher responses and the students' own continuations
    max_prompt_tokens: int = 1024
    ro_samples: int = 2  # continuations each student writes per prompt
    sample_temperature: float = 1.0  # sampling temperature of the students' continuations
    response_temperature: float = 1.0  # sampling temperature of missing teacher responses; 0 is greedy
    kappa_k: int = 4  # action set: the teacher's top-K tokens
    kappa_rollouts: int = 4  # R teacher rollouts per forced action
    kappa_horizon: int = 8  # H states scored after each forced action
    kappa_student: str | None = None  # student whose losses kappa accumulates (default: the first)
    kappa_sampling: str = "stratified"  # uniforms of the rollouts: stratified, common or independent (plain)
    windows: list[int] = field(default_factory=list)  # W values for windowed EB; empty skips it
    kappa_include_observed: bool = False  # add the observed token to the action set when it is not in the top K
    kappa_random: int = 0  # random tokens added to the action set of each position
    estimators: list[str] = field(default_factory=lambda: list(KAPPA_ESTIMATORS))  # kappa estimators to run
    bridge_fraction: float = 0.3
    garden_fraction: float = 0.3
    label_scope: str = "document"
    label_ranking: str = "kappa"
    chat_template: bool = True
    bootstrap: int = 1000
    seed: int = 0
    device: str = "cpu"
    heatmap_docs: int = 4
    shard_size: int = 8  # documents per saved shard; a rerun skips finished shards
    force: bool = False  # discard saved shards computed with other settings
    names: list[str] = field(default_factory=list, init=False)

    @property
    def label_estimator(self) -> str:
        """Return the kappa estimator whose ranking labels Bridges and Gardens: monte_carlo when it runs."""
        return next(name for name in KAPPA_ESTIMATORS if name in self.estimators)

    def label_column(self) -> str:
        """Return the column of `positions` the labels rank by."""
        return estimator_column(self.label_estimator, self.label_ranking)

    def __post_init__(self):
        checks = [
            ("kappa_k", self.kappa_k >= 1, "an integer >= 1"),
            ("kappa_rollouts", self.kappa_rollouts >= 2, "an integer >= 2 (the standard error needs two rollouts)"),
            ("kappa_horizon", self.kappa_horizon >= 1, "an integer >= 1"),
            ("ro_samples", self.ro_samples >= 1, "an integer >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, "an integer >= 1"),
            ("max_docs", self.max_docs is None or self.max_docs >= 1, "an integer >= 1"),
            ("num_lab_docs", self.num_lab_docs >= 1, "an integer >= 1"),
            ("heatmap_docs", self.heatmap_docs >= 0, "an integer >= 0"),
            ("bridge_fraction", 0 <= self.bridge_fraction <= 1, "in [0, 1]"),
            ("garden_fraction", 0 <= self.garden_fraction <= 1, "in [0, 1]"),
            ("label_scope", self.label_scope in ("document", "position"), "one of: document, position"),
            ("kappa_sampling", self.kappa_sampling in KAPPA_SAMPLING, "one of: " + ", ".join(KAPPA_SAMPLING)),
            ("label_ranking", self.label_ranking in ("kappa", "kappa_abs", "kappa_spread"), "one of: kappa, kappa_abs, kappa_spread"),
            ("sample_temperature", self.sample_temperature > 0, "> 0"),
            ("response_temperature", self.response_temperature >= 0, ">= 0 (0 is greedy)"),
            ("shard_size", self.shard_size >= 1, "an integer >= 1"),
            ("windows", all(isinstance(w, int) and w >= 1 for w in self.windows), "a list of integers >= 1, e.g. 1,3,5"),
            ("bootstrap", self.bootstrap >= 10, "an integer >= 10"),
            ("kappa_random", self.kappa_random >= 0, "an integer >= 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                flag = {"num_lab_docs": "lab-docs"}.get(name, name.replace("_", "-"))
                raise UserError(f"--{flag} {getattr(self, name)!r} is invalid: it must be {rule}")
        unknown = [name for name in self.estimators if name not in KAPPA_ESTIMATORS]
        if unknown or not self.estimators:
            problem = f"{unknown[0]!r} is not a kappa estimator" if unknown else "the list is empty"
            raise UserError(f"--estimators: {problem}; use a comma-separated list of: {', '.join(KAPPA_ESTIMATORS)}")
        self.estimators = [name for name in KAPPA_ESTIMATORS if name in self.estimators]  # one order, no repeats
        if self.bridge_fraction + self.garden_fraction > 1:
            raise UserError(f"--bridge-fraction {self.bridge_fraction} plus --garden-fraction {self.garden_fraction} "
                            "exceeds 1; lower one of them")
        if not self.students:
            raise UserError("no student given; pass at least one --student DIR")
        names = self.student_names or [_default_name(path) for path in self.students]
        if len(names) != len(self.students):
            raise UserError(f"{len(names)} student names for {len(self.students)} students; give one --name per --student")
        self.names = _unique(names)
        if self.kappa_student is not None and self.kappa_student not in self.names:
            raise UserError(f"--kappa-student {self.kappa_student!r} is not a student name; choose one of: {', '.join(self.names)}")


def _default_name(path: str) -> str:
    return Path(path.rstrip("/")).name or path


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(name if count == 0 else f"{name}-{count + 1}")
    return result


@dataclass
class DocumentResult:
    """Everything measured on one document, before aggregation."""

    doc: AnalysisDocument
    positions: list[dict]  # per response position: proxies and kappa
    tf: dict[str, np.ndarray]  # student -> [L] teacher-forced loss
    ro: dict[str, np.ndarray]  # student -> [R, M] loss on own continuations (NaN where not alive)
    windowed: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # student -> W -> [R, L]
    # For the explorer (analysis/details.py); None in shards saved before they were kept.
    next_tokens: dict | None = None  # {"teacher": (ids, probs), "students": {name: (ids, probs)}}, each [L, K]
    continuations: dict | None = None  # student -> token ids of its first own continuation


def run_analysis(config: AnalyzeConfig) -> dict:
    """Run the whole analysis and write `analysis/` and `figures/` under `config.out`."""
    from bganalysis.analysis import outputs
    from bganalysis.analysis.setup import load_setup

    torch.manual_seed(config.seed)
    setup = load_setup(config)
    if not setup.rows:
        raise UserError("no documents to analyse; check --prompts, --max-docs and --lab-docs")
    rank, world = process_rank()
    settings = {**config_dict(config), "model_files": model_signature([config.teacher, *config.students])}
    store = ShardStore(Path(config.out) / "analysis" / "shards", settings, config.force)
    if config.kappa_k + config.kappa_random > setup.teacher.vocab_size:
        log.warning("--kappa-k %d plus --kappa-random %d exceeds the vocabulary of %d tokens; each action set "
                    "holds every token the teacher can write", config.kappa_k, config.kappa_random,
                    setup.teacher.vocab_size)
    shards = shard_ranges(len(setup.rows), config.shard_size)
    mine = [index for index in range(len(shards)) if index % world == rank and not store.has(index)]
    log.info("analysing %d documents in %d shards (%d to compute in process %d of %d) with %d students "
             "(kappa: K=%d, R=%d, H=%d, student %s)", len(setup.rows), len(shards), len(mine), rank, world,
             len(setup.students), config.kappa_k, config.kappa_rollouts, config.kappa_horizon, setup.kappa_student)

    with tqdm(total=sum(len(shards[i]) for i in mine), desc="analyse", unit="doc") as progress:
        for shard_index in mine:
            results = []
            for index, doc in zip(shards[shard_index], setup.documents(config, shards[shard_index])):
                results.append(analyse_document(config, setup, index, doc))
                progress.update(1)
            store.write(shard_index, results)

    if rank != 0:
        return {}
    store.wait_for(list(range(len(shards))), timeout_s=float(os.environ.get("BGANALYSIS_SHARD_WAIT_S", 24 * 3600)))
    results = [result for index in range(len(shards)) for result in store.read(index)]
    return outputs.write_outputs(config, setup, results)


def analyse_document(config: AnalyzeConfig, setup, index: int, doc: AnalysisDocument) -> DocumentResult:
    """Teacher-forced losses, kappa and the students' own continuations for one document."""
    ids = torch.tensor(doc.ids)
    prompt_length, length = len(doc.prompt_ids), len(doc.response_ids)
    states = slice(prompt_length - 1, prompt_length - 1 + length)

    teacher_logprobs = setup.teacher.encode_document(ids)[states]
    tf, next_tokens = {}, {"teacher": top_next_tokens(teacher_logprobs), "students": {}}
    for name, runner in setup.students.items():
        student_logprobs = runner.encode_document(ids)[states]
        tf[name] = kl_from_logprobs(teacher_logprobs, student_logprobs).double().numpy()
        next_tokens["students"][name] = top_next_tokens(student_logprobs)

    spread = RolloutSpread()  # sd guesses for stratified allocation, from this document's earlier positions
    positions = [position_kappa(config, setup, index, doc, t, teacher_logprobs, spread) for t in range(length)]

    ro, continuations = {}, {}
    uniforms = torch.rand(config.ro_samples, config.max_new_tokens,
                          generator=generator_for(config.seed, index, docs_module.PURPOSE_ROLLOUT))
    for name, runner in setup.students.items():
        ro[name], continuations[name] = own_continuation_losses(setup, runner, prompt_length, uniforms,
                                                                config.sample_temperature)

    windowed = {name: {w: windowed_losses(config, setup, runner, index, doc, w) for w in config.windows}
                for name, runner in setup.students.items()}
    return DocumentResult(doc=doc, positions=positions, tf=tf, ro=ro, windowed=windowed,
                          next_tokens=next_tokens, continuations=continuations)


def windowed_losses(config: AnalyzeConfig, setup, runner: ModelRunner, index: int, doc: AnalysisDocument,
                    window: int) -> np.ndarray:
    """Loss at step t after the student wrote steps t - W .. t - 1 itself, [R, L], NaN where undefined.

    The prefix is the teacher's up to step t - W; R continuations of W tokens are drawn
    (the same uniforms for every student), and the loss is measured at the state they
    reach. Rows that wrote an EOS inside the window, and steps t < W, are NaN.
    """
    prompt_length, length = len(doc.prompt_ids), len(doc.response_ids)
    result = np.full((config.ro_samples, length), math.nan)
    for t in range(window, length):
        generator = generator_for(config.seed, index, docs_module.PURPOSE_WINDOW * 100_003 + window * 1_009 + t)
        uniforms = torch.rand(config.ro_samples, window + 1, generator=generator)
        prefix = prompt_length + t - window
        tokens, _, student_logprobs = sample_continuation(runner, prefix, uniforms, setup.eos_ids, config.sample_temperature)
        if tokens.shape[1] <= window:
            continue  # every row ended inside the window
        rows = setup.teacher.rows_from_prefix(prefix, tokens.shape[0])
        teacher_logprobs = setup.teacher.extend(rows, tokens[:, :window], keep=1)[:, 0]
        losses = kl_from_logprobs(teacher_logprobs, student_logprobs[:, window]).double()
        ended = torch.isin(tokens[:, :window], torch.tensor(sorted(setup.eos_ids))).any(dim=1)
        result[:, t] = torch.where(ended, torch.full_like(losses, math.nan), losses).numpy()
    return result


def position_kappa(config: AnalyzeConfig, setup, index: int, doc: AnalysisDocument, t: int,
                   doc_teacher_logprobs: torch.Tensor, spread: RolloutSpread | None = None) -> dict:
    """Proxies and every kappa estimate at response position t (exact kappa on the lab).

    `doc_teacher_logprobs` [L, vocab] is the teacher's distribution before each response token.
    """
    teacher_logprobs = doc_teacher_logprobs[t]
    observed = doc.response_ids[t] if config.kappa_include_observed else None
    action_generator = generator_for(config.seed, index, docs_module.PURPOSE_ACTIONS * 100_003 + t)
    special = tuple(setup.tokenizer.all_special_ids) if config.kappa_random else ()  # read only when drawing
    actions = select_actions(teacher_logprobs, config.kappa_k, observed, config.kappa_random, action_generator,
                             exclude=special)
    weights = action_weights(teacher_logprobs, actions)
    row = {"position": t, "token_id": doc.response_ids[t], "action_set_size": len(actions)}
    row.update(teacher_proxies(teacher_logprobs))

    row.update({key: math.nan for key in KAPPA_COLUMNS})  # an estimator that does not run leaves NaN
    row.update({"action_ids": actions.tolist(), "action_q": [math.nan] * len(actions)})  # Q per forced action
    if "monte_carlo" in config.estimators:
        generator = generator_for(config.seed, index, docs_module.PURPOSE_KAPPA * 100_003 + t)
        estimate = monte_carlo_kappa(
            setup.teacher, setup.students[setup.kappa_student], len(doc.prompt_ids) + t, teacher_logprobs,
            actions, config.kappa_rollouts, config.kappa_horizon, generator, setup.eos_ids, config.kappa_sampling,
            spread,
        )
        row.update({key: estimate[key] for key in ("kappa", "kappa_se", "kappa_abs", "kappa_spread")})
        row["action_q"] = estimate["q"]  # loss-to-go per forced action, in the order of action_ids

    if "teacher_only" in config.estimators:
        horizon = min(config.kappa_horizon, len(doc.response_ids) - 1 - t)
        counterfactual = teacher_only_kappa(
            setup.teacher, len(doc.prompt_ids) + t, actions, weights, doc.response_ids[t + 1:t + horizon],
            doc_teacher_logprobs[t + 1:t + 1 + horizon], setup.eos_ids,
        )
        row.update({f"teacher_only_{key}": value for key, value in counterfactual.items()})

    if setup.exact is not None:
        q = setup.exact.q_values(doc.states[t], actions.tolist(), config.kappa_horizon)
        exact = kappa_from_q(q, weights)
        row["exact_action_q"] = [float(value) for value in q]
        row.update({"exact_kappa": float(exact["kappa"]), "exact_kappa_abs": float(exact["kappa_abs"]),
                    "exact_kappa_spread": float(exact["kappa_spread"]), "true_role": doc.roles[t]})
    return row


def own_continuation_losses(setup, runner: ModelRunner, prompt_length: int, uniforms: torch.Tensor,
                            temperature: float) -> tuple[np.ndarray, list[int]]:
    """Per-step loss of the student on the continuations it writes itself, [R, M], NaN when ended,
    and the token ids of the first continuation (up to its EOS), which the explorer shows."""
    tokens, alive, student_logprobs = sample_continuation(runner, prompt_length, uniforms, setup.eos_ids, temperature)
    rows = setup.teacher.rows_from_prefix(prompt_length, tokens.shape[0])
    teacher_logprobs = setup.teacher.extend(rows, tokens, keep=tokens.shape[1] + 1)[:, :-1]
    losses = kl_from_logprobs(teacher_logprobs, student_logprobs).double()
    result = np.full((tokens.shape[0], uniforms.shape[1]), math.nan)
    result[:, : tokens.shape[1]] = torch.where(alive, losses, torch.full_like(losses, math.nan)).numpy()
    return result, first_continuation(tokens, alive)


def step_arrays(results: list[DocumentResult], name: str, max_steps: int, window: int | None = None) -> StepArrays:
    """Lay out one student's losses as [documents, steps] sums and counts.

    With `window`, the RO arrays hold the windowed losses for that W instead.
    """
    shape = (len(results), max_steps)
    arrays = StepArrays(np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape))
    for d, result in enumerate(results):
        tf = result.tf[name]
        arrays.tf_sum[d, : len(tf)] = tf
        arrays.tf_count[d, : len(tf)] = 1
        ro = result.ro[name] if window is None else result.windowed[name][window]
        alive = ~np.isnan(ro)
        arrays.ro_sum[d, : ro.shape[1]] = np.where(alive, ro, 0).sum(0)
        arrays.ro_count[d, : ro.shape[1]] = alive.sum(0)
    return arrays


def config_dict(config: AnalyzeConfig) -> dict:
    values = asdict(config)
    values["student_names"] = config.names
    values.pop("names")
    return values
