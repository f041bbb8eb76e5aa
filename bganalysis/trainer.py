"""`DistillTrainer`: the transformers Trainer with the KD loss of `bganalysis.train_loss`.

The Trainer brings checkpointing and resume, `accelerate launch` / `torchrun` with DDP,
FSDP or DeepSpeed, mixed precision and `report_to` logging. This subclass adds:

- the loss: λ·soft + (1 - λ)·hard per response token, from the teacher run online
  (no gradient), or from a top-k teacher cache, or hard labels alone;
- normalisation by the valid tokens of the whole optimiser step, counted over every
  micro-batch and every process (`get_batch_samples`), so the gradient is the same for
  any split of the step into micro-batches and processes;
- on-policy sequences (`bganalysis.onpolicy`), drawn before the tokens are counted;
- log records with each loss part and the mean λ per loss token.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
from transformers import Trainer

from bganalysis.losses import IGNORE_INDEX, align_vocab, masked_mean
from bganalysis.onpolicy import ONPOLICY_KEY, mix_onpolicy, step_generator
from bganalysis.train_loss import STATIC_LAMBDA_SCHEMES, token_losses

CACHE_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
SUM_KEYS = ("total", "soft", "hard", "risk", "lam", "loss_tokens", "tokens", "soft_tokens")


def needs_teacher(config) -> bool:
    """Return False only for hard labels from the data under a constant λ, where nothing reads the teacher."""
    return config.method != "hard" or config.hard_target == "argmax" or config.weight_scheme not in STATIC_LAMBDA_SCHEMES


def lr_factor(warmup_steps: int, steps: int):
    """Return the multiplier of the peak learning rate for update number `update` (from 0).

    Linear warmup reaches the peak at update `warmup_steps - 1`, then a cosine decays
    towards 0. Unlike transformers' get_cosine_schedule_with_warmup, which starts warmup
    at 0, the first update already gets a learning rate above 0.
    """

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / warmup_steps
        progress = (update - warmup_steps) / max(steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TeacherSide(NamedTuple):
    """The parts of one micro-batch that both loss paths need before the student runs."""

    inputs: dict  # the model inputs: the batch without targets, on-policy flags and cache tensors
    targets: torch.Tensor  # hard targets [batch, seq]: the data's, or the teacher's argmax
    valid: torch.Tensor  # mask of the loss tokens
    cached: dict  # the teacher-cache tensors of the batch; empty without a cache
    teacher_logits: torch.Tensor | None  # [batch, seq, vocab_size] float; None when cached or not needed
    lam: torch.Tensor  # λ per token, 1 on on-policy rows


def teacher_side(config, teacher, batch: dict, soft_weights, step: int, vocab_size: int) -> TeacherSide:
    """Split `batch`, run the teacher when the loss needs it (no gradient), and derive the targets and λ."""
    inputs = dict(batch)
    targets = inputs.pop("targets")
    onpolicy_rows = inputs.pop(ONPOLICY_KEY, None)
    cached = {key: inputs.pop(key) for key in CACHE_KEYS if key in inputs}
    valid = targets != IGNORE_INDEX

    teacher_logits = None
    if not cached and needs_teacher(config):
        with torch.no_grad():
            teacher_logits = teacher(**inputs, use_cache=False).logits[..., :vocab_size].float()
    teacher_view = teacher_logits
    if cached and config.weight_scheme not in STATIC_LAMBDA_SCHEMES:
        from bganalysis.cached_loss import dense_teacher_logits

        teacher_view = dense_teacher_logits(cached["teacher_topk_ids"], cached["teacher_topk_logprobs"],
                                            cached["teacher_tail_logprob"], vocab_size, config.loss_temperature)
    if config.hard_target == "argmax":
        top = cached["teacher_topk_ids"][..., 0] if cached else teacher_logits.argmax(dim=-1)
        targets = torch.where(valid, top, IGNORE_INDEX)

    lam = soft_weights(step, teacher_view, targets)
    if onpolicy_rows is not None:
        lam = torch.where(onpolicy_rows[:, None] & valid, 1.0, lam)
    return TeacherSide(inputs, targets, valid, cached, teacher_logits, lam)


def micro_batch_parts(config, teacher, student, batch: dict, soft_weights, step: int, vocab_size: int):
    """Run the teacher (when needed) and the student on one micro-batch.

    Returns (parts, valid, lam): per-token loss parts `[batch, seq]` (total, soft, hard,
    risk), the mask of loss tokens and λ. The student's forward keeps its graph.
    """
    side = teacher_side(config, teacher, batch, soft_weights, step, vocab_size)
    student_logits = student(**side.inputs, use_cache=False).logits
    teacher_logits = side.teacher_logits
    if teacher_logits is None:
        student_logits = student_logits[..., :vocab_size]
    else:  # raises when the student scores fewer tokens than the tokenizer has
        teacher_logits, student_logits = align_vocab(teacher_logits, student_logits, vocab_size)
    use_cache = side.cached if side.cached and config.method != "hard" else None
    parts = token_losses(config, student_logits, teacher_logits, side.inputs, side.targets, side.lam, cached=use_cache)
    return parts, side.valid, side.lam


def fused_path_applies(config, student, cached: bool) -> bool:
    """Return True when `fused_loss.fused_hybrid_loss` computes exactly this run's loss.

    It covers forward KL with the online teacher (or hard labels alone) and any λ scheme
    but risk_guided, which reads the student's logits. The student's output layer must
    be a plain linear map of the final hidden states: no bias, no logit scale or
    soft-capping.
    """
    if not config.fused_loss or cached or config.divergence != "forward_kl" or config.weight_scheme == "risk_guided":
        return False
    head = student.get_output_embeddings()
    model_config = student.config
    return (
        isinstance(head, torch.nn.Linear) and head.bias is None
        and not getattr(model_config, "final_logit_softcapping", None)
        and getattr(model_config, "logit_scale", None) in (None, 1.0)
    )


def micro_batch_loss(config, teacher, student, batch: dict, soft_weights, step: int, vocab_size: int, num_valid_tokens,
                     fused: bool = False):
    """Return (loss, parts, valid, lam) of one micro-batch; `loss` is normalised by `num_valid_tokens`.

    With `fused` the output layer and the loss run chunk by chunk
    (`fused_loss.fused_hybrid_loss`), so the student's `[tokens, vocab]` logits never
    exist; the parts are then detached. Otherwise the loss is
    `masked_mean(micro_batch_parts(...).total)`.
    """
    if not fused:
        parts, valid, lam = micro_batch_parts(config, teacher, student, batch, soft_weights, step, vocab_size)
        return masked_mean(parts["total"], valid, num_valid_tokens), parts, valid, lam

    from bganalysis.fused_loss import fused_hybrid_loss

    side = teacher_side(config, teacher, batch, soft_weights, step, vocab_size)
    # One logit row is kept because the model insists on computing some; the loss reads the hidden states.
    output = student(**side.inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    weight = _unwrap(student).get_output_embeddings().weight
    lam_argument = 0.0 if side.teacher_logits is None else side.lam
    result = fused_hybrid_loss(output.hidden_states[-1], weight, side.teacher_logits, side.targets, lam_argument,
                               num_valid_tokens, config.loss_temperature, config.loss_chunk_tokens, vocab_size)
    parts = {key: result[key] for key in ("soft", "hard", "total")}
    parts["risk"] = torch.zeros_like(parts["hard"])
    return result["loss"], parts, side.valid, side.lam


def _unwrap(model):
    """The model inside DDP or another wrapper that keeps it as `.module`."""
    while hasattr(model, "module"):
        model = model.module
    return model


class DistillTrainer(Trainer):
    """A Trainer whose `compute_loss` is the KD loss; see the module docstring."""

    loss_is_scaled_for_ga = True  # compute_loss already divides by the step's valid tokens

    def __init__(self, *args, config, teacher, vocab_size: int, soft_weights, pad_id: int, eos_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        self.vocab_size = vocab_size
        self.soft_weights = soft_weights
        self.pad_id, self.eos_id = pad_id, eos_id
        self.fused = fused_path_applies(config, _unwrap(self.model), cached=False)
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums = {key: 0.0 for key in SUM_KEYS}
        self._window_start = time.perf_counter()

    # --- optimiser -------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """AdamW that decays weight matrices and embeddings but not biases or norm gains."""
        if self.optimizer is None:
            parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=self.config.lr)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            factor = lr_factor(self.config.warmup_steps, num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    # --- batches and loss --------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """Fetch the step's micro-batches, mix in on-policy rows, and count loss tokens over all processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.config.onpolicy_fraction > 0:
            student = self.accelerator.unwrap_model(self.model)
            step = self.state.global_step + 1
            batches = [
                mix_onpolicy(batch, student, self.config, step_generator(self.config.seed, step, index, self.args.process_index),
                             self.eos_id, self.pad_id, self.vocab_size, self.config.max_len)
                for index, batch in enumerate(batches)
            ]
        count = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in batches)
        count = torch.tensor([count], device=self.args.device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step + 1
        if num_items_in_batch is None:  # outside training_step (evaluation): this batch alone
            num_items_in_batch = (inputs["targets"] != IGNORE_INDEX).sum()
        fused = self.fused and not any(key in inputs for key in CACHE_KEYS)
        loss, parts, valid, lam = micro_batch_loss(self.config, self.teacher, model, inputs, self.soft_weights, step,
                                                   self.vocab_size, num_items_in_batch, fused)
        # DDP averages gradients over processes; scaling by their number turns that into a sum.
        loss = loss * self.accelerator.num_processes
        self._add_sums(parts, valid, lam, inputs)
        return (loss, {"parts": parts}) if return_outputs else loss

    @torch.no_grad()
    def _add_sums(self, parts: dict, valid: torch.Tensor, lam: torch.Tensor, inputs: dict) -> None:
        for key in ("total", "soft", "hard", "risk"):
            self._sums[key] += float(torch.where(valid, parts[key].float(), 0.0).sum())
        self._sums["lam"] += float(torch.where(valid, lam, 0.0).sum())
        self._sums["loss_tokens"] += int(valid.sum())
        self._sums["tokens"] += int(inputs["attention_mask"].sum())
        has_teacher = self.teacher is not None or any(key in inputs for key in CACHE_KEYS)
        soft_measured = has_teacher and needs_teacher(self.config)
        self._sums["soft_tokens"] += int(valid.sum()) if soft_measured else 0

    # --- logging -----------------------------------------------------------------------------

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the KD loss parts, mean λ, throughput and peak memory to each training log."""
        if "loss" in logs and "eval_loss" not in logs:
            sums = torch.tensor([self._sums[key] for key in SUM_KEYS], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            totals = dict(zip(SUM_KEYS, sums.tolist()))
            elapsed = time.perf_counter() - self._window_start
            tokens = max(totals["loss_tokens"], 1.0)
            logs["loss"] = totals["total"] / tokens
            if totals["soft_tokens"]:  # unmeasured parts are left out rather than logged as 0
                logs["soft"] = totals["soft"] / tokens
            logs["hard"] = totals["hard"] / tokens
            if self.config.weight_scheme == "risk_guided":
                logs["risk"] = totals["risk"] / tokens
            logs["lam_mean"] = totals["lam"] / tokens
            logs["loss_tokens"] = int(totals["loss_tokens"])
            logs["tokens_per_s"] = totals["tokens"] / elapsed if elapsed > 0 else 0.0
            logs["peak_memory_gb"] = peak_memory_gb(self.args.device)
            self._reset_window()
        super().log(logs, start_time)


def peak_memory_gb(device) -> float:
    """Return peak accelerator memory on CUDA, else the peak resident memory of this process."""
    import platform
    import resource

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if platform.system() == "Darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
