"""`bganalysis bench train`: the cost of a whole optimiser step of the trainer's losses.

Two measurements:

- Step variants on a random-init student (2 Llama layers of SmolLM2's width, its
  49,152-token vocabulary) with precomputed teacher logits. `ce` is PyTorch's plain
  `F.cross_entropy` on the logits, and `hybrid` the chunked hybrid loss the trainer uses
  (`losses.hybrid_token_losses`). `naive` is a hybrid loss with full log-softmax of both
  models and plain autograd, and `fused` the fused output-layer hybrid loss
  (`fused_loss.fused_hybrid_loss`). A step is forward, loss, backward and an
  AdamW update. Each variant runs in a fresh Python process. One warm-up step creates
  the gradients and the optimiser state. The peak resident memory is then reset
  (writing 5 to /proc/self/clear_refs, Linux), and the reported peak memory is the
  peak above the resident memory of that moment.
- Cached against online teacher: SmolLM2-135M-Instruct as teacher, a 2-layer student
  derived from it, ARC-Challenge train questions with their reference answers as
  responses. An online step runs the teacher and then the student step. A cached step
  reads the teacher's top-k from a `teacher_cache` built once beforehand.
- On-policy against off-policy KD with the same teacher, student and prompts: an
  on-policy step first lets the student write the responses, then scores them.

The trainer's default hybrid loss is the fused one, so `step_time_ratio_hybrid_vs_ce`
measures `fused` and `step_time_ratio_chunked_hybrid_vs_ce` the chunked loss on full
logits, which the other divergences use.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bganalysis.cached_loss import cached_token_losses
from bganalysis.fused_loss import fused_hybrid_loss
from bganalysis.losses import IGNORE_INDEX, hybrid_token_losses, masked_mean

log = logging.getLogger(__name__)

VARIANTS = ("ce", "hybrid", "naive", "fused")
DEFAULT_ARC = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks" / "arc_challenge" / "ARC-Challenge-Train.jsonl"
LAM = 0.5


@dataclass(frozen=True)
class BenchSize:
    """Budget of one run. The student's shape is SmolLM2-135M's width with 2 layers."""

    vocab: int = 49152
    hidden: int = 576
    intermediate: int = 1536
    layers: int = 2
    heads: int = 9
    kv_heads: int = 3
    seq_len: int = 1024
    batch: int = 4
    chunk_tokens: int = 1024  # the trainer's default loss_chunk_tokens
    steps: int = 3  # timed steps per variant, after one warm-up step
    cache_docs: int = 16
    cache_batch: int = 4
    cache_max_len: int = 256
    cache_k: int = 64
    cache_steps: int = 3  # timed steps of each of online and cached, after one warm-up each


# Fewer tokens a step; chunk_tokens keeps the full size's ratio of 4 chunks a step.
QUICK = BenchSize(seq_len=256, batch=1, chunk_tokens=64, steps=2, cache_docs=8, cache_max_len=192, cache_steps=2)


def naive_hybrid_losses(student_logits, teacher_logits, targets, lam: float) -> torch.Tensor:
    """Return λ·KL + (1 - λ)·CE per token from full log-softmaxes with plain autograd, the reference."""
    student_logprobs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits.float(), dim=-1)
    soft = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)
    hard = -student_logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return lam * soft + (1.0 - lam) * hard


def step_loss(variant: str, model, input_ids, targets, teacher_logits, chunk_tokens: int) -> torch.Tensor:
    """Return the scalar loss of one step of `variant` (the mean over valid tokens)."""
    valid = targets != IGNORE_INDEX
    count = int(valid.sum())
    if variant == "fused":
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return fused_hybrid_loss(hidden, model.lm_head.weight, teacher_logits, targets, LAM, count, 1.0, chunk_tokens)["loss"]
    logits = model(input_ids=input_ids, use_cache=False).logits
    if variant == "ce":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    if variant == "hybrid":
        total = hybrid_token_losses(logits, teacher_logits, targets, LAM, 1.0, chunk_tokens)["total"]
    else:
        total = naive_hybrid_losses(logits, teacher_logits, targets, LAM)
    return masked_mean(total, valid, count)


def measure_step(variant: str, size: BenchSize, threads: int | None = None) -> dict:
    """Time whole optimiser steps of `variant` and measure their peak memory above the state after a warm-up step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                         max_position_embeddings=max(2048, size.seq_len), tie_word_embeddings=True)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, size.vocab, (size.batch, size.seq_len), generator=generator)
    targets = torch.cat([input_ids[:, 1:], torch.full((size.batch, 1), IGNORE_INDEX)], dim=1)
    teacher_logits = 2.0 * torch.randn(size.batch, size.seq_len, size.vocab, generator=generator)

    def step():
        step_loss(variant, model, input_ids, targets, teacher_logits, size.chunk_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, part of the baseline

    step()
    gc.collect()
    baseline = _memory_kib("VmRSS")
    _reset_peak_memory()
    seconds = []
    for _ in range(size.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = _memory_kib("VmHWM")
    return {"variant": variant, "seconds_per_step": statistics.median(seconds), "peak_mb": (peak - baseline) / 1024,
            "baseline_mb": baseline / 1024}


def _memory_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark measures memory on Linux only")


def _reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def measure_step_in_process(variant: str, size: BenchSize, threads: int | None) -> dict:
    """Run `measure_step` in a fresh Python process, so no earlier variant's memory counts."""
    code = ("import json, sys; from bganalysis.bench.train import BenchSize, measure_step; "
            "threads = int(sys.argv[3]) if sys.argv[3] else None; "
            "print(json.dumps(measure_step(sys.argv[1], BenchSize(**json.loads(sys.argv[2])), threads)))")
    command = [sys.executable, "-c", code, variant, json.dumps(asdict(size)), str(threads or "")]
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the {variant} step failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_ratios(size: BenchSize, threads: int | None, fresh_process: bool = True) -> dict:
    """Measure every step variant and return the ratios against `ce` and `naive`."""
    measure = measure_step_in_process if fresh_process else measure_step
    runs = {}
    for variant in VARIANTS:
        runs[variant] = measure(variant, size, threads)
        log.info("%s step: %.2f s, peak %.0f MB above the %.0f MB baseline", variant, runs[variant]["seconds_per_step"],
                 runs[variant]["peak_mb"], runs[variant]["baseline_mb"])
    result = {f"{variant}_seconds_per_step": run["seconds_per_step"] for variant, run in runs.items()}
    result.update({f"{variant}_peak_mb": run["peak_mb"] for variant, run in runs.items()})
    # The trainer's default forward-KL loss is the fused one (`fused_loss=True`), so `hybrid` names it;
    # `chunked_hybrid` is the loss on full logits that the other divergences and risk_guided use.
    for name, variant in (("hybrid", "fused"), ("chunked_hybrid", "hybrid")):
        result[f"step_time_ratio_{name}_vs_ce"] = _ratio(runs[variant]["seconds_per_step"], runs["ce"]["seconds_per_step"])
        result[f"peak_memory_ratio_{name}_vs_ce"] = _ratio(runs[variant]["peak_mb"], runs["ce"]["peak_mb"])
    result["peak_memory_ratio_chunked_vs_naive"] = _ratio(runs["hybrid"]["peak_mb"], runs["naive"]["peak_mb"])
    result["step_time_ratio_chunked_vs_naive"] = _ratio(runs["hybrid"]["seconds_per_step"], runs["naive"]["seconds_per_step"])
    return result


def _ratio(value: float, reference: float) -> float:
    """Return value / reference, or NaN where the reference is 0 (a peak too small to raise the resident size)."""
    return value / reference if reference > 0 else math.nan


def loss_parity(vocab: int = 4096, tokens: int = 48, hidden: int = 32) -> dict:
    """Return the largest differences of the chunked and fused hybrid losses from the naive one (values, gradients)."""
    generator = torch.Generator().manual_seed(2)
    states = torch.randn(1, tokens, hidden, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    teacher = 2.0 * torch.randn(1, tokens, vocab, generator=generator)
    targets = torch.randint(0, vocab, (1, tokens), generator=generator)
    targets[0, :5] = IGNORE_INDEX
    valid, count = targets != IGNORE_INDEX, int((targets != IGNORE_INDEX).sum())

    logits = states @ weight.T
    naive = masked_mean(naive_hybrid_losses(logits, teacher, targets, LAM), valid, count)
    chunked = masked_mean(hybrid_token_losses(logits, teacher, targets, LAM, 1.0, 7)["total"], valid, count)
    fused = fused_hybrid_loss(states, weight, teacher, targets, LAM, count, 1.0, 7)["loss"]
    grads = {name: torch.autograd.grad(loss, (states, weight), retain_graph=True) for name, loss in
             (("naive", naive), ("chunked", chunked), ("fused", fused))}
    return {
        "parity_chunked_vs_naive_loss": abs(float(chunked.detach() - naive.detach())),
        "parity_fused_vs_naive_loss": abs(float(fused.detach() - naive.detach())),
        "parity_chunked_vs_naive_grad": max(float((a - b).abs().max()) for a, b in zip(grads["chunked"], grads["naive"])),
        "parity_fused_vs_naive_grad": max(float((a - b).abs().max()) for a, b in zip(grads["fused"], grads["naive"])),
    }


def arc_examples(path: Path, tokenizer, count: int, max_len: int, out: Path):
    """Return `count` training examples from ARC-Challenge questions, each answered with its reference choice."""
    from bganalysis.io import atomic_write_text
    from bganalysis.train_data import jsonl_examples

    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            choices = {choice["label"]: choice["text"] for choice in record["question"]["choices"]}
            options = "\n".join(f"{label}. {text}" for label, text in choices.items())
            answer = record["answerKey"]
            rows.append({"id": record["id"], "prompt": f"{record['question']['stem']}\n{options}",
                         "response": f"The answer is {answer}: {choices.get(answer, '')}."})
            if len(rows) == count:
                break
    data = out / "arc_train.jsonl"
    atomic_write_text(data, "".join(json.dumps(row) + "\n" for row in rows))
    return jsonl_examples(str(data), tokenizer, max_len, chat_template=True)


def cached_vs_online(teacher, tokenizer, examples, size: BenchSize, out: Path) -> dict:
    """Time student steps with the teacher run online against steps that read a top-k cache; return the speedup."""
    from bganalysis.models import derive_student
    from bganalysis.teacher_cache import TeacherCache, build_teacher_cache
    from bganalysis.train_data import collate

    vocab = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    cache = TeacherCache.open(build_teacher_cache(teacher, tokenizer, examples, out / "teacher_cache", size.cache_k,
                                                  batch_size=size.cache_batch))
    build_seconds = time.perf_counter() - start
    tokens = sum(len(example.ids) - example.prompt_length for example in examples)

    student = derive_student(teacher, 2).train().requires_grad_(True)
    students = {"online": student, "cached": copy.deepcopy(student)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in students.items()}
    batches = [examples[i:i + size.cache_batch] for i in range(0, len(examples), size.cache_batch)]

    def online_step(batch):
        inputs = collate(batch, pad_id)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     use_cache=False).logits[..., :vocab]
        logits = students["online"](input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    use_cache=False).logits[..., :vocab]
        total = hybrid_token_losses(logits, teacher_logits, inputs["targets"], LAM, 1.0, size.chunk_tokens)["total"]
        return inputs["targets"], total

    def cached_step(batch):
        inputs = cache.collate(batch, pad_id)
        logits = students["cached"](input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    use_cache=False).logits
        total = cached_token_losses(logits, inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"],
                                    inputs["teacher_tail_logprob"], inputs["targets"], LAM, "forward_kl", {}, 1.0,
                                    size.chunk_tokens, vocab_size=vocab)["total"]
        return inputs["targets"], total

    seconds = {"online": [], "cached": []}
    for number in range(size.cache_steps + 1):  # step 0 warms up; the two kinds alternate to share the machine's load
        batch = batches[number % len(batches)]
        for name, step in (("online", online_step), ("cached", cached_step)):
            begin = time.perf_counter()
            targets, total = step(batch)
            valid = targets != IGNORE_INDEX
            masked_mean(total, valid, int(valid.sum())).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if number:
                seconds[name].append(time.perf_counter() - begin)
    online, cached = statistics.median(seconds["online"]), statistics.median(seconds["cached"])
    return {"online_seconds_per_step": online, "cached_seconds_per_step": cached,
            "cached_vs_online_step_speedup": online / cached, "cache_build_seconds": build_seconds,
            "cache_tokens": tokens, "cache_bytes_per_token": size.cache_k * 8 + 4,
            "cache_tokens_per_step": tokens * size.cache_batch / len(examples)}


def onpolicy_vs_offpolicy(teacher, tokenizer, examples, size: BenchSize) -> dict:
    """Time trainer steps of on-policy KD against the off-policy hybrid; return the cost ratio.

    Both use the trainer's own functions (`onpolicy.mix_onpolicy`, `trainer.micro_batch_loss`),
    the same 2-layer student derived from the teacher and the same prompts. Each student
    response is capped at the length of the longest teacher response of the batch, so the
    budget per sequence is the same; the response tokens of both kinds are reported, with
    the cost ratio per response token.
    """
    from bganalysis.models import derive_student
    from bganalysis.onpolicy import mix_onpolicy, step_generator
    from bganalysis.train_config import TrainConfig
    from bganalysis.train_data import collate
    from bganalysis.train_loss import SoftWeights
    from bganalysis.trainer import fused_path_applies, micro_batch_loss

    vocab = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student = derive_student(teacher, 2).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batches = [examples[i:i + size.cache_batch] for i in range(0, len(examples), size.cache_batch)]
    seconds, tokens = {"offpolicy": [], "onpolicy": []}, {"offpolicy": [], "onpolicy": []}

    for number in range(size.cache_steps + 1):  # step 0 warms up; the two kinds alternate to share the machine's load
        batch_examples = batches[number % len(batches)]
        longest = max(len(example.ids) - example.prompt_length for example in batch_examples)
        for kind in ("offpolicy", "onpolicy"):
            config = TrainConfig(onpolicy_fraction=1.0 if kind == "onpolicy" else 0.0, onpolicy_max_new_tokens=longest,
                                 max_len=size.cache_max_len + longest, loss_chunk_tokens=size.chunk_tokens)
            begin = time.perf_counter()
            batch = collate(batch_examples, pad_id)
            if kind == "onpolicy":
                batch = mix_onpolicy(batch, student, config, step_generator(0, number, 0, 0), tokenizer.eos_token_id,
                                     pad_id, vocab, config.max_len)
            count = int((batch["targets"] != IGNORE_INDEX).sum())
            loss, *_ = micro_batch_loss(config, teacher, student, batch, SoftWeights(config), number + 1, vocab, count,
                                        fused_path_applies(config, student, cached=False))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if number:
                seconds[kind].append(time.perf_counter() - begin)
                tokens[kind].append(count)
    off, on = statistics.median(seconds["offpolicy"]), statistics.median(seconds["onpolicy"])
    return {"offpolicy_seconds_per_step": off, "onpolicy_seconds_per_step": on,
            "onpolicy_vs_offpolicy_step_cost": on / off,
            "onpolicy_vs_offpolicy_token_cost": (on / statistics.mean(tokens["onpolicy"])) / (off / statistics.mean(tokens["offpolicy"])),
            "offpolicy_response_tokens_per_step": statistics.mean(tokens["offpolicy"]),
            "onpolicy_response_tokens_per_step": statistics.mean(tokens["onpolicy"])}


def run_bench(teacher: str | None, prompts: str | None, out: str, size: BenchSize, threads: int | None = None,
              fresh_process: bool = True) -> dict:
    """Run every measurement; write OUT/bench_train.json and return its content."""
    from bganalysis.bench.analysis import resolve_teacher
    from bganalysis.io import atomic_write_json
    from bganalysis.models import load_causal_lm, load_tokenizer

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("settings: %s; torch threads %d", asdict(size), threads or torch.get_num_threads())
    result = {"settings": asdict(size), "torch_threads": threads or torch.get_num_threads()}
    result.update(loss_parity())
    result.update(step_ratios(size, threads, fresh_process))

    teacher_dir = resolve_teacher(teacher)
    tokenizer = load_tokenizer(str(teacher_dir))
    teacher_model = load_causal_lm(str(teacher_dir), dtype=torch.float32).requires_grad_(False)
    examples = arc_examples(Path(prompts) if prompts else DEFAULT_ARC, tokenizer, size.cache_docs, size.cache_max_len,
                            out_dir)
    result["teacher"] = str(teacher_dir)
    result.update(cached_vs_online(teacher_model, tokenizer, examples, size, out_dir))
    result.update(onpolicy_vs_offpolicy(teacher_model, tokenizer, examples, size))
    atomic_write_json(out_dir / "bench_train.json", result)
    return result
