"""Settings of one training run (`TrainConfig`), validated when built.

Every field is a flag of `bganalysis train` (`loss_temperature` is `--loss-temperature`)
and a key of a recipe YAML in `training/`. A bad value raises `UserError` naming the
field, the rule and the flag that fixes it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bganalysis.errors import UserError

METHODS = ("hard", "soft", "hybrid")
HARD_TARGETS = ("sample", "argmax")
METHOD_LAMBDA = {"hard": 0.0, "soft": 1.0, "hybrid": 0.5}
_DEVICE = re.compile(r"auto|cpu|mps|cuda")
DTYPES = ("float32", "bfloat16")
REPORTERS = ("none", "tensorboard", "wandb")
_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one training run, validated at construction (UserError names the field).

    Every field is also a CLI flag of `bganalysis train` (`loss_temperature` is
    `--loss-temperature`) and a key of a recipe YAML. Numbers given as strings (from
    flags, or YAML such as `1e-3`, which YAML 1.1 reads as a string) are converted.
    """

    method: str = _option("hybrid", "supervision: hard (cross-entropy on teacher tokens), soft (KL to the teacher distribution) or hybrid (a mix of both)")
    lam: float | None = _option(None, "weight of the soft loss, in [0, 1], for the static and risk_guided schemes; method hard forces 0, soft forces 1, hybrid defaults to 0.5")
    loss_temperature: float = _option(1.0, "temperature T of the soft loss: both distributions at softmax(logits / T), loss scaled by T²; not a sampling temperature")
    hard_target: str = _option("sample", "hard label: sample (the token of the teacher-written response) or argmax (the teacher's most likely token)")
    divergence: str = _option("forward_kl", "divergence D of the soft loss D(teacher || student): forward_kl, reverse_kl, jsd, total_variation, skew_forward_kl, skew_reverse_kl or ab")
    divergence_beta: float | None = _option(None, "beta of the divergence: jsd (in [0, 1], default 0.5) and ab (required); unset for the others")
    divergence_alpha: float | None = _option(None, "alpha of the divergence: skew_forward_kl and skew_reverse_kl (in [0, 1], default 0.1) and ab (required); unset for the others")
    weight_scheme: str = _option("static", "per-token soft weight: static (lam), confidence, entropy, curriculum, reverse_curriculum, bridge_garden or risk_guided (lam plus a risk penalty on the hard loss)")
    tsallis_order: float = _option(1.0, "entropy scheme: Tsallis order of the teacher entropy, > 0; 1 is Shannon entropy")
    lam_max: float = _option(1.0, "curriculum schemes: the soft weight at the end (curriculum) or start (reverse_curriculum) of the ramp, in [0, 1]")
    ramp_fraction: float = _option(0.5, "curriculum schemes: fraction of the steps the linear ramp takes, in (0, 1]")
    lam_bridge: float = _option(0.1, "bridge_garden scheme: soft weight at Bridges (the riskiest positions), in [0, 1]")
    lam_garden: float = _option(0.9, "bridge_garden scheme: soft weight at Gardens (the safest positions), in [0, 1]")
    lam_middle: float = _option(0.5, "bridge_garden scheme with a map: soft weight at unlabelled positions, in [0, 1]")
    bridge_garden_map: str | None = _option(None, "bridge_garden scheme: analysis/tokens.parquet from bganalysis analyze, read by token and context; unset uses bridge_garden_proxy")
    bridge_garden_proxy: str = _option("teacher_entropy", "bridge_garden scheme without a map: teacher_entropy, teacher_pmax or teacher_margin, ranked within each micro-batch")
    risk_alpha: float = _option(0.1, "risk_guided scheme: weight alpha of the penalty (alpha/4)·delta² added to the hard loss, >= 0")
    teacher: str = _option("lab", "teacher: a model folder or hub id, or lab for the exact lab teacher")
    student: str = _option("tiny", "student: tiny (a random-init Llama built for the tokenizer from the student_* sizes), derived (the teacher cut to student_layers layers, width kept), a config.json file (random init from that config), or a model folder or hub id sharing the teacher's tokenizer")
    student_hidden: int = _option(128, "hidden size of the tiny student")
    student_layers: int = _option(2, "number of layers of the tiny student, or of the teacher's layers a derived student keeps (evenly spaced, first and last included)")
    student_heads: int = _option(4, "attention heads of the tiny student")
    student_kv_heads: int = _option(2, "key/value heads of the tiny student (grouped-query attention)")
    student_intermediate: int = _option(384, "MLP width of the tiny student")
    data: str = _option("lab", "training data: lab (documents sampled from the lab teacher) or a JSONL file with prompt and response fields")
    num_docs: int = _option(2000, "number of lab documents to sample (data=lab only)")
    chat_template: bool = _option(True, "wrap JSONL prompts in the tokenizer's chat template when it has one")
    steps: int = _option(300, "optimiser steps")
    batch_size: int = _option(16, "sequences per micro-batch")
    grad_accum: int = _option(1, "micro-batches per optimiser step; the effective batch is batch_size × grad_accum")
    lr: float = _option(1e-3, "peak learning rate of AdamW")
    warmup_steps: int = _option(20, "steps of linear learning-rate warmup before the cosine decay")
    weight_decay: float = _option(0.01, "AdamW weight decay, applied to weight matrices and embeddings only")
    max_grad_norm: float = _option(1.0, "clip the global gradient norm to this value; 0 turns clipping off")
    max_len: int = _option(512, "max tokens per sequence; longer prompts are cut from the left")
    seed: int = _option(0, "seed of the student's initialisation, the lab documents and the batch order")
    out: str = _option("runs/lab", "run folder; the student is written to OUT/students/NAME")
    name: str | None = _option(None, "student name, its folder under OUT/students (default: the method)")
    log_every: int = _option(10, "optimiser steps between log lines")
    device: str = _option("auto", "auto (cuda when available, else cpu), cpu, cuda or mps; pick GPUs with CUDA_VISIBLE_DEVICES, or launch several processes with accelerate launch or torchrun")
    loss_chunk_tokens: int = _option(1024, "tokens per chunk of the loss; its float32 scratch memory is chunk × vocabulary × 4 bytes")
    fused_loss: bool = _option(True, "compute the output layer and the forward KL + cross-entropy loss chunk by chunk, so the student's [tokens, vocabulary] logits never exist (forward_kl without risk_guided, online teacher); false computes the loss on full logits")
    dtype: str = _option("float32", "training precision: float32, or bfloat16 (mixed precision: float32 weights, bfloat16 matmuls; losses stay float32)")
    teacher_cache: str | None = _option(None, "folder written by bganalysis cache-teacher (top-k teacher log-probabilities per response token); training then runs without the teacher in memory")
    onpolicy_fraction: float = _option(0.0, "share of sequences whose response the student writes itself (sampled, then scored by the teacher with the soft loss only), as in on-policy KD (GKD); 0 is off-policy, 1 fully on-policy")
    onpolicy_max_new_tokens: int = _option(64, "on-policy sequences: most tokens the student writes per response")
    onpolicy_temperature: float = _option(1.0, "on-policy sequences: sampling temperature of the student (not the loss temperature); 0 is greedy")
    lora: bool = _option(False, "train LoRA adapters (peft) instead of all weights; the saved student has them merged")
    lora_rank: int = _option(16, "LoRA rank r")
    lora_alpha: float = _option(32.0, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _option(0.0, "LoRA dropout, in [0, 1)")
    lora_target_modules: str = _option("all-linear", "LoRA target modules: all-linear, or comma-separated module names such as q_proj,v_proj")
    save_every: int = _option(100, "optimiser steps between checkpoints in OUT/checkpoints/NAME (the last two are kept); 0 saves only when interrupted")
    resume: bool = _option(False, "continue from the latest checkpoint in OUT/checkpoints/NAME, with the same data order and loss curve")
    force: bool = _option(False, "replace a finished student in OUT/students/NAME that was trained with other settings")
    report_to: str = _option("none", "where the Trainer also logs: none, tensorboard or wandb (comma-separated for several)")

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _coerce(spec.name, getattr(self, spec.name), hints[spec.name]))
        self._check_choices()
        self._check_ranges()
        self._check_divergence()
        self._check_weight_scheme()
        if self.student in ("tiny", "derived"):
            _require(self.student_layers >= 1, "student_layers", self.student_layers, "must be a whole number >= 1")
        if self.student == "tiny":
            self._check_tiny_student()
        if self.student == "derived":
            _require(self.teacher != "lab", "student", self.student,
                     "the lab teacher is exact, not a network, so no student can be cut from it; use student tiny")
        elif self.student.endswith(".json"):
            _require(Path(self.student).is_file(), "student", self.student, "is not a file; pass a model config.json")

    def _check_choices(self) -> None:
        _require(self.method in METHODS, "method", self.method, f"must be one of {', '.join(METHODS)}")
        _require(self.hard_target in HARD_TARGETS, "hard_target", self.hard_target, f"must be one of {', '.join(HARD_TARGETS)}")
        if self.lam is None:
            self.lam = METHOD_LAMBDA[self.method]
        elif self.method != "hybrid":
            forced = METHOD_LAMBDA[self.method]
            _require(self.lam == forced, "lam", self.lam, f"method {self.method} fixes lam (the soft weight) to {forced:g}; use method hybrid to mix the losses")
        _require(0.0 <= self.lam <= 1.0, "lam", self.lam, "lam is the weight of the soft loss and must be in [0, 1]")
        _require(_DEVICE.fullmatch(self.device) is not None, "device", self.device, "must be auto, cpu, cuda or mps (choose the GPU with CUDA_VISIBLE_DEVICES=N)")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if self.name is None:
            self.name = self.method if self.weight_scheme == "static" else self.weight_scheme
            if self.onpolicy_fraction > 0:
                self.name += "-onpolicy"
        _require(_NAME.fullmatch(self.name) is not None, "name", self.name, "must be a folder name of letters, digits and . _ + - (no slash, not starting with a dot)")
        for key in ("teacher", "student", "data", "out"):
            _require(getattr(self, key) != "", key, "", "must not be empty")
        if self.data != "lab":
            _require(Path(self.data).is_file(), "data", self.data, "is not a file; pass lab or a JSONL file with prompt and response fields")

    def _check_ranges(self) -> None:
        _require(math.isfinite(self.loss_temperature) and self.loss_temperature > 0, "loss_temperature", self.loss_temperature, "must be a number > 0")
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a number > 0")
        for key in ("steps", "batch_size", "grad_accum", "num_docs", "log_every", "loss_chunk_tokens"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be a whole number >= 1")
        _require(self.max_len >= 2, "max_len", self.max_len, "must be >= 2 (one prompt token and one response token)")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be a whole number >= 0")
        for key in ("weight_decay", "max_grad_norm"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, key, value, "must be a number >= 0")
        _require(self.seed >= 0, "seed", self.seed, "must be a whole number >= 0")
        _require(self.save_every >= 0, "save_every", self.save_every, "must be a whole number >= 0 (0 saves only when interrupted)")
        _require(0.0 <= self.onpolicy_fraction <= 1.0, "onpolicy_fraction", self.onpolicy_fraction, "is a share of sequences and must be in [0, 1]")
        _require(self.onpolicy_max_new_tokens >= 1, "onpolicy_max_new_tokens", self.onpolicy_max_new_tokens, "must be a whole number >= 1")
        _require(math.isfinite(self.onpolicy_temperature) and self.onpolicy_temperature >= 0, "onpolicy_temperature",
                 self.onpolicy_temperature, "must be a number >= 0 (0 is greedy)")
        if self.onpolicy_fraction > 0:
            _require(self.teacher_cache is None, "onpolicy_fraction", self.onpolicy_fraction,
                     "on-policy sequences need the teacher to score what the student writes, which a teacher cache cannot; unset teacher_cache or set onpolicy_fraction 0")
        if self.teacher_cache is not None:
            _require(Path(self.teacher_cache).is_dir(), "teacher_cache", self.teacher_cache,
                     "is not a folder; build it with bganalysis cache-teacher, or unset it to run the teacher online")
        reporters = [name.strip() for name in self.report_to.split(",")]
        _require(all(name in REPORTERS for name in reporters) and (reporters == ["none"] or "none" not in reporters),
                 "report_to", self.report_to, f"must be none or a comma-separated list of {', '.join(REPORTERS[1:])}")
        self._check_lora()

    def _check_lora(self) -> None:
        _require(self.lora_rank >= 1, "lora_rank", self.lora_rank, "must be a whole number >= 1")
        _require(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be a number > 0")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _require(self.lora_target_modules.strip() != "", "lora_target_modules", self.lora_target_modules, "must be all-linear or module names such as q_proj,v_proj")
        if self.lora:
            _require(self.student not in ("tiny",) and not self.student.endswith(".json"), "lora", self.lora,
                     "LoRA adapts pretrained weights, but this student starts from random weights; use a derived or pretrained student, or set lora false")

    def _check_divergence(self) -> None:
        from bganalysis.divergences import DIVERGENCES
        from bganalysis.train_loss import divergence_parameters

        _require(self.divergence in DIVERGENCES, "divergence", self.divergence, f"must be one of {', '.join(DIVERGENCES)}")
        takes = divergence_parameters(self.divergence)
        for parameter in ("alpha", "beta"):
            key, value = f"divergence_{parameter}", getattr(self, f"divergence_{parameter}")
            if parameter not in takes:
                _require(value is None, key, value, f"divergence {self.divergence} takes no {parameter}; remove {key}")
            elif value is None:
                _require(self.divergence != "ab", key, value, f"divergence ab needs both alpha and beta; set {key}")
            elif self.divergence == "ab":
                _require(math.isfinite(value), key, value, "must be a finite number")
            else:
                _require(0.0 <= value <= 1.0, key, value, f"the {parameter} of divergence {self.divergence} must be in [0, 1]")

    def _check_weight_scheme(self) -> None:
        from bganalysis.train_loss import PROXY_RISK_SIGNS, STATIC_LAMBDA_SCHEMES, WEIGHT_SCHEMES

        scheme = self.weight_scheme
        _require(scheme in WEIGHT_SCHEMES, "weight_scheme", scheme, f"must be one of {', '.join(WEIGHT_SCHEMES)}")
        if scheme not in STATIC_LAMBDA_SCHEMES:
            _require(self.method == "hybrid", "weight_scheme", scheme,
                     f"a per-token soft weight needs method hybrid, but method {self.method} fixes lam; set method hybrid")
        if scheme == "risk_guided":
            _require(self.method != "soft", "weight_scheme", scheme,
                     "risk_guided adds its penalty to the hard loss, which method soft weights by 0; use method hybrid or hard")
            _require(self.hard_target == "sample", "hard_target", self.hard_target,
                     "risk_guided needs the student's logits after the label, which the batch has only for sample labels; use hard_target sample")

        _require(math.isfinite(self.tsallis_order) and self.tsallis_order > 0, "tsallis_order", self.tsallis_order, "must be a number > 0 (1 is Shannon entropy)")
        for key in ("lam_max", "lam_bridge", "lam_garden", "lam_middle"):
            _require(0.0 <= getattr(self, key) <= 1.0, key, getattr(self, key), "is a soft weight and must be in [0, 1]")
        _require(0.0 < self.ramp_fraction <= 1.0, "ramp_fraction", self.ramp_fraction, "must be in (0, 1]; use weight_scheme static for a constant lam")
        _require(math.isfinite(self.risk_alpha) and self.risk_alpha >= 0, "risk_alpha", self.risk_alpha, "must be a number >= 0")
        _require(self.bridge_garden_proxy in PROXY_RISK_SIGNS, "bridge_garden_proxy", self.bridge_garden_proxy,
                 f"must be one of {', '.join(PROXY_RISK_SIGNS)}")
        if self.bridge_garden_map is not None:
            _require(scheme == "bridge_garden", "bridge_garden_map", self.bridge_garden_map,
                     f"only the bridge_garden scheme reads a map, not {scheme}; remove bridge_garden_map or set weight_scheme bridge_garden")
            _require(Path(self.bridge_garden_map).is_file(), "bridge_garden_map", self.bridge_garden_map,
                     "is not a file; pass the analysis/tokens.parquet written by bganalysis analyze")

    def _check_tiny_student(self) -> None:
        for key in ("student_hidden", "student_layers", "student_heads", "student_kv_heads", "student_intermediate"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be a whole number >= 1")
        _require(self.student_hidden % (2 * self.student_heads) == 0, "student_hidden", self.student_hidden,
                 f"must be a multiple of 2 × student_heads={self.student_heads} (rotary embeddings need an even head size)")
        _require(self.student_heads % self.student_kv_heads == 0, "student_kv_heads", self.student_kv_heads,
                 f"must divide student_heads={self.student_heads}")


def _require(condition: bool, key: str, value, rule: str) -> None:
    if not condition:
        flag = "--" + key.replace("_", "-")
        raise UserError(f"invalid {key}={value!r}: {rule}; set {key} in the recipe or {flag} on the command line")


def _coerce(key: str, value, hint):
    """Convert `value` to the field's type, or raise UserError naming the field."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next(arg for arg in args if arg is not type(None)) if args else hint
    if kind is str:
        if isinstance(value, Path):
            return str(value)
        _require(isinstance(value, str), key, value, "must be a string")
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        _require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "must be a whole number")
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    _require(isinstance(value, int | float) and not isinstance(value, bool), key, value, "must be a number")
    return float(value)
