"""Property-based tests (hypothesis) of the divergences, the losses and the loaders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bganalysis.divergences import DIVERGENCES, divergence
from bganalysis.errors import UserError
from bganalysis.io import read_prompts
from bganalysis.lab import lab_tokenizer
from bganalysis.losses import IGNORE_INDEX, hybrid_token_losses, masked_mean
from bganalysis.train_data import collate, jsonl_examples, truncate

VOCAB = 6
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PARAMETERS = {"jsd": {"beta": [0.0, 0.3, 1.0]}, "skew_forward_kl": {"alpha": [0.0, 0.1, 1.0]},
              "skew_reverse_kl": {"alpha": [0.0, 0.1, 1.0]}}
AB_PARAMETERS = [(1.0, 0.0), (0.5, 0.5), (0.0, 0.0)]

finite = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, allow_infinity=False, width=32)
moderate = st.floats(-1e4, 1e4, width=32)
huge_or_small = st.one_of(st.floats(-30, 30, width=32), finite)
# Finite logits stay within 60 of each other here, so no probability underflows to 0 next to a -inf.
with_inf = st.one_of(st.floats(-30, 30, width=32), st.just(float("-inf")))


def _rows(draw, values, rows: int) -> torch.Tensor:
    data = [[draw(values) for _ in range(VOCAB)] for _ in range(rows)]
    for row in data:  # a distribution needs one token it does not rule out
        if all(value == float("-inf") for value in row):
            row[0] = 0.0
    return torch.tensor(data, dtype=torch.float32)


def _cases() -> list[tuple[str, dict]]:
    cases = []
    for name in DIVERGENCES:
        if name == "ab":
            cases += [(name, {"alpha": a, "beta": b}) for a, b in AB_PARAMETERS]
        elif name in PARAMETERS:
            cases += [(name, {key: value}) for key, values in PARAMETERS[name].items() for value in values]
        else:
            cases.append((name, {}))
    return cases


def _value_and_grad(name, params, teacher, student):
    student = student.clone().requires_grad_(True)
    values = divergence(name, teacher, student, 1.0, **params)
    torch.where(torch.isfinite(values), values, 0.0).sum().backward()
    return values.detach(), student.grad


@pytest.mark.parametrize("name, params", _cases(), ids=lambda case: str(case))
@FAST
@given(data=st.data())
def test_divergence_finite_logits(name, params, data):
    # The AB family grows like a power of the logits, so beyond about 1e4 its true value leaves float32.
    values = moderate if name == "ab" else huge_or_small
    teacher, student = _rows(data.draw, values, 3), _rows(data.draw, values, 3)
    values, grad = _value_and_grad(name, params, teacher, student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all(), (values, grad)
    assert (values >= -1e-5 * (1 + values.abs().max())).all(), values
    same, _ = _value_and_grad(name, params, teacher, teacher.clone())
    assert same.abs().max() <= 1e-5, same


@pytest.mark.parametrize("name, params", _cases(), ids=lambda case: str(case))
@FAST
@given(data=st.data())
def test_divergence_with_ruled_out_tokens(name, params, data):
    teacher, student = _rows(data.draw, with_inf, 2), _rows(data.draw, with_inf, 2)
    values, grad = _value_and_grad(name, params, teacher, student)
    assert not values.isnan().any() and (values >= -1e-5 * (1 + values[values.isfinite()].abs().sum())).all(), values
    assert not grad.isnan().any(), grad
    same, _ = _value_and_grad(name, params, teacher, teacher.clone())
    assert same.abs().max() <= 1e-5, same


@pytest.mark.parametrize("name, params", [("forward_kl", {}), ("jsd", {"beta": 0.0})])
def test_divergence_underflowing_teacher_mass_is_not_nan(name, params):
    teacher = torch.tensor([[0.0, 0.0, 0.0, 104.0, float("-inf"), float("-inf")]])
    student = torch.tensor([[0.0, float("-inf"), float("-inf"), 0.0, float("-inf"), float("-inf")]])
    values, grad = _value_and_grad(name, params, teacher, student)
    assert not values.isnan().any() and not grad.isnan().any(), values


@FAST
@given(data=st.data(), lam=st.floats(0, 1), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_hybrid_losses_masked_finite(data, lam, temperature):
    rows = data.draw(st.integers(1, 5))
    student, teacher = _rows(data.draw, huge_or_small, rows), _rows(data.draw, huge_or_small, rows)
    targets = torch.tensor(data.draw(st.lists(st.integers(-1, VOCAB - 1), min_size=rows, max_size=rows)))
    targets = torch.where(targets < 0, IGNORE_INDEX, targets)
    student.requires_grad_(True)
    losses = hybrid_token_losses(student, teacher, targets, lam, temperature, chunk_tokens=2)
    masked = targets == IGNORE_INDEX
    for part in ("soft", "hard", "total"):
        assert torch.isfinite(losses[part]).all() and (losses[part] >= -1e-4).all(), losses
        assert (losses[part][masked] == 0).all(), losses
    mean = masked_mean(losses["total"], ~masked, int((~masked).sum()))
    mean.backward()
    assert torch.isfinite(mean) and torch.isfinite(student.grad).all()
    assert (student.grad[masked] == 0).all()
    same = hybrid_token_losses(teacher, teacher, targets, lam, temperature)["soft"]
    assert same.abs().max() <= 1e-4


@FAST
@given(values=st.lists(st.sampled_from([1.0, float("inf"), float("nan"), -2.5]), min_size=1, max_size=8),
       data=st.data())
def test_masked_mean_ignores_masked_values(values, data):
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    values = torch.tensor(values)
    values[mask] = torch.where(values[mask].isfinite(), values[mask], 1.0)
    mean = masked_mean(values, mask, int(mask.sum()))
    assert torch.isfinite(mean)
    assert math.isclose(float(mean), float(values[mask].sum()) / max(int(mask.sum()), 1), rel_tol=1e-6)


# --- loaders ---------------------------------------------------------------------------

LINE = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda p, r: json.dumps({"prompt": p, "response": r}).encode(), st.text(max_size=20),
              st.one_of(st.none(), st.text(max_size=20), st.integers())),
    st.builds(lambda v: json.dumps(v).encode(), st.one_of(st.integers(), st.lists(st.integers()), st.text())),
    st.sampled_from([b"", b"   ", b"\xff\xfe", b'{"prompt": "calc 3 + 5 :"', b'{"prompt": null}']),
)


@FAST
@given(lines=st.lists(LINE, max_size=6))
def test_read_prompts_gives_rows_or_user_error(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        rows = read_prompts(path)
    except UserError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert rows and all(isinstance(row["prompt"], str) and isinstance(row["id"], str) for row in rows)
    assert all(row["response"] is None or isinstance(row["response"], str) for row in rows)


LAB_WORDS = ["calc", "prog", "3", "+", "5", ":", "let", "y", "=", "6", ";", "out", "<eos>", "<pad>", "zebra", ""]


@FAST
@given(rows=st.lists(st.tuples(st.lists(st.sampled_from(LAB_WORDS), max_size=12),
                               st.lists(st.sampled_from(LAB_WORDS), max_size=12)), min_size=1, max_size=5),
       max_len=st.integers(2, 20))
def test_jsonl_examples_fit_and_keep_the_response_start(tmp_path, rows, max_len):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(p), "response": " ".join(r)}) + "\n" for p, r in rows))
    tokenizer = lab_tokenizer()
    try:
        examples = jsonl_examples(str(path), tokenizer, max_len, chat_template=True)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert len(examples) == len(rows)
    for example, (_, response) in zip(examples, rows):
        response_ids = tokenizer(" ".join(response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert 1 <= example.prompt_length < len(example.ids) <= max_len
        kept = example.ids[example.prompt_length:]
        assert kept == response_ids[: len(kept)]
        assert len(kept) == min(len(response_ids), max_len - 1)  # the response is cut only when it cannot fit


@FAST
@given(prompt=st.lists(st.integers(0, 99), min_size=1, max_size=30),
       response=st.lists(st.integers(0, 99), min_size=1, max_size=30), max_len=st.integers(2, 40))
def test_truncate_cuts_the_prompt_from_the_left(prompt, response, max_len):
    example, part = truncate(prompt, response, max_len)
    assert len(example.ids) <= max_len and example.prompt_length >= 1
    assert example.ids[: example.prompt_length] == prompt[-example.prompt_length:]
    kept = example.ids[example.prompt_length:]
    assert kept == response[: len(kept)] and len(kept) == min(len(response), max_len - 1)
    assert part == (None if len(prompt) + len(response) <= max_len else "response" if len(kept) < len(response) else "prompt")


@FAST
@given(lengths=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=1, max_size=4))
def test_collate_keeps_eos_labels_when_pad_is_eos(lengths):
    from bganalysis.train_data import Example

    eos = 2
    examples = [Example([1] * p + [7] * (r - 1) + [eos], p) for p, r in lengths]
    batch = collate(examples, pad_id=eos)
    for row, (p, r) in enumerate(lengths):
        labels = batch["targets"][row][batch["targets"][row] != IGNORE_INDEX].tolist()
        assert labels == [7] * (r - 1) + [eos]  # every response token, the final EOS included
        assert int(batch["attention_mask"][row].sum()) == p + r
