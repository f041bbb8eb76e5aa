"""The lab: grammar roles, exact teacher distributions, the teacher as an HF model, exact kappa."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bganalysis.lab import ExactLossToGo, LabProcess, LabTeacher, grammar, lab_tokenizer, sample_documents
from bganalysis.lab.teacher import LabConfig

FLOOR = 1e-4
CALC_PROMPT = "calc 3 + 5 :"
CALC_RESPONSE = "3 + 5 = 8 ; answer 8 <eos>"


@pytest.fixture(scope="module")
def process():
    return LabProcess(floor=FLOOR)


@pytest.fixture(scope="module")
def tokenizer():
    return lab_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


def _document_states(process) -> list[grammar.State]:
    """Return every clean state along a few sampled documents of both tasks."""
    states = []
    for doc in sample_documents(6, seed=1):
        states.extend(process.states_along(doc.prompt_ids + doc.response_ids)[:-1])
    return [state for state in states if not state.corrupt]


def _corrupt_state(process, tokenizer) -> grammar.State:
    """Return the state after `calc 3 + 5 : 3 +` followed by a wrong operand `7`."""
    return process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 7"))


def _entropy(probs: np.ndarray) -> float:
    return float(-(probs * np.log(probs)).sum())


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * (np.log(p) - np.log(q))).sum())


# Teacher distributions


def test_probs_sum_to_one(process, tokenizer):
    states = _document_states(process) + [_corrupt_state(process, tokenizer)]
    for state in states:
        assert abs(process.probs(state).sum() - 1.0) < 1e-12, state


def test_probs_grammar_mass_on_valid_tokens(process):
    for state in _document_states(process):
        probs = process.probs(state)
        valid = [process.word_to_id[word] for word in grammar.grammar_distribution(state)]
        assert probs[valid].sum() >= 1.0 - FLOOR, state


def _uniform_share(process, word: str) -> float:
    """The floor's share of `word`: 1 per emittable word, 0.1 for `<eos>`, 0 for the rest."""
    total = (process.vocab_size - 4) + 0.1  # 1 for each ordinary word and 0.1 for <eos>
    if word in ("<pad>", "<bos>", "<unk>"):
        return 0.0
    return (0.1 if word == grammar.EOS else 1.0) / total


def test_probs_follow_grammar_weights(process):
    for state in _document_states(process):
        probs = process.probs(state)
        for word, weight in grammar.grammar_distribution(state).items():
            expected = (1.0 - FLOOR) * weight + FLOOR * _uniform_share(process, word)
            # The renormalisation after the 1e-12 clamp of non-emittable tokens moves values by ~1e-12.
            assert abs(probs[process.word_to_id[word]] - expected) < 1e-10, (state, word)


def test_probs_special_tokens_near_zero(process):
    state = _document_states(process)[3]
    probs = process.probs(state)
    for word in ("<pad>", "<bos>", "<unk>"):
        assert probs[process.word_to_id[word]] < 1e-11, word


def test_teacher_logits_are_exact_logprobs(process, tokenizer):
    ids = _ids(tokenizer, f"{CALC_PROMPT} {CALC_RESPONSE}")
    logits = LabTeacher(LabConfig(floor=FLOOR))(torch.tensor([ids])).logits[0]
    states = process.states_along(ids)
    for position in range(len(ids)):
        expected = torch.from_numpy(process.probs(states[position])).float()
        assert torch.allclose(logits[position].exp(), expected, rtol=1e-5, atol=1e-12), position


# The teacher as a Hugging Face model


def _check_calc_derivation(prompt: list[str], response: list[str]) -> None:
    """Assert that `response` derives the value of the calc expression in `prompt`, mod 10."""
    operands = [int(word) for word in prompt[1:-1:2]]
    ops = prompt[2:-1:2]
    segments = " ".join(response).split(" ; ")
    steps, final = segments[:-1], segments[-1].split()

    acc = operands[0]
    for index, step in enumerate(steps):
        words = step.split()
        if index > 0:
            assert words[0] in grammar.CONNECTIVES, step
            words = words[1:]
        left, op, right, equality, result = words
        assert int(left) == acc, step
        assert op == ops[index], step
        assert int(right) == operands[index + 1], step
        assert equality in grammar.EQUALITY_WORDS, step
        acc = (acc + operands[index + 1]) % 10 if op == "+" else (acc - operands[index + 1]) % 10
        assert int(result) == acc, step
    assert len(steps) == len(ops)
    assert final[0] in grammar.ANSWER_WORDS
    assert int(final[1]) == acc
    assert final[2] == grammar.EOS


@pytest.mark.parametrize("prompt", ["calc 3 + 5 :", "calc 6 - 9 + 7 :", "calc 0 - 1 - 2 + 9 :"])
def test_generate_greedy_calc_correct(tokenizer, prompt):
    input_ids = torch.tensor([_ids(tokenizer, prompt)])
    output = LabTeacher().generate(input_ids, do_sample=False, max_new_tokens=40)
    response = tokenizer.convert_ids_to_tokens(output[0, input_ids.shape[1]:].tolist())

    _check_calc_derivation(prompt.split(), response)


def test_save_load_same_logits(tmp_path, tokenizer):
    teacher = LabTeacher(LabConfig(floor=0.01, corrupt_noise=0.3))
    teacher.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([_ids(tokenizer, f"{CALC_PROMPT} 3 + 7 = 8 ; answer 8 <eos>")])

    assert isinstance(loaded, LabTeacher)
    assert loaded.config.floor == 0.01
    assert loaded.config.corrupt_noise == 0.3
    assert torch.equal(loaded(ids).logits, teacher(ids).logits)


def _left_padded_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    rows = [_ids(tokenizer, f"{CALC_PROMPT} {CALC_RESPONSE}"), _ids(tokenizer, "prog 2 : let a = 4 ;")]
    width = max(len(row) for row in rows)
    padded = [[0] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(padded), torch.tensor(mask), rows


def test_left_padding_real_positions(tokenizer):
    teacher = LabTeacher()
    input_ids, mask, rows = _left_padded_batch(tokenizer)
    batch_logits = teacher(input_ids, attention_mask=mask).logits
    for index, row in enumerate(rows):
        alone = teacher(torch.tensor([row])).logits[0]
        assert torch.equal(batch_logits[index, -len(row):], alone), index


def test_left_padding_pad_positions_start(tokenizer, process):
    teacher = LabTeacher()
    input_ids, mask, rows = _left_padded_batch(tokenizer)
    pad_count = input_ids.shape[1] - len(rows[1])
    logits = teacher(input_ids, attention_mask=mask).logits[1, :pad_count]
    start = process.logprobs(grammar.START)
    for position in range(pad_count):
        assert torch.equal(logits[position], start), position


def test_logits_to_keep_one_is_last_row(tokenizer):
    teacher = LabTeacher()
    ids = torch.tensor([_ids(tokenizer, f"{CALC_PROMPT} 3 + 5 = 8")])
    last = teacher(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, teacher.config.vocab_size)
    assert torch.equal(last[0, 0], teacher(ids).logits[0, -1])


def test_logits_to_keep_one_left_padded(tokenizer):
    teacher = LabTeacher()
    input_ids, mask, rows = _left_padded_batch(tokenizer)
    last = teacher(input_ids, attention_mask=mask, logits_to_keep=1).logits[:, 0]
    full = teacher(input_ids, attention_mask=mask).logits[:, -1]
    assert torch.equal(last, full)


# Roles and corruption


def test_true_roles_calc_document(process, tokenizer):
    prompt_length = len(_ids(tokenizer, CALC_PROMPT))
    ids = _ids(tokenizer, f"{CALC_PROMPT} {CALC_RESPONSE}")
    states = process.states_along(ids)
    roles = [grammar.true_role(states[position - 1]) for position in range(prompt_length, len(ids))]

    # In `3 + 5 = 8 ; answer 8 <eos>` the copied operands, operator, result, `;`, final value
    # and <eos> admit one word each, while `=` and `answer` have synonyms.
    expected = ["bridge", "bridge", "bridge", "garden", "bridge", "bridge", "garden", "bridge", "bridge"]
    assert roles == expected


def test_true_roles_prompt_positions(process, tokenizer):
    prompt_ids = _ids(tokenizer, CALC_PROMPT)
    states = process.states_along(prompt_ids)
    roles = [grammar.true_role(states[position - 1]) for position in range(1, len(prompt_ids))]
    assert roles == ["prompt"] * (len(prompt_ids) - 1)


def test_sample_documents_roles_match_states(process):
    for doc in sample_documents(5, seed=4):
        states = process.states_along(doc.prompt_ids + doc.response_ids)
        prompt_length = len(doc.prompt_ids)
        expected = [grammar.true_role(states[prompt_length - 1 + i]) for i in range(len(doc.response_ids))]
        assert doc.roles == expected


def test_invalid_token_sets_corrupt(process, tokenizer):
    clean = process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 5"))
    wrong = process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 7"))
    assert not clean.corrupt
    assert wrong.corrupt


def test_corrupt_state_stays_corrupt(process, tokenizer):
    later = process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 7 = 8 ; answer"))
    assert later.corrupt


def test_corruption_raises_teacher_entropy(process, tokenizer):
    clean = process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 5"))
    wrong = _corrupt_state(process, tokenizer)
    assert clean.slot == wrong.slot
    assert _entropy(process.probs(wrong)) > _entropy(process.probs(clean)) + 1.0


def test_eos_ends_document(process, tokenizer):
    assert process.state_after(_ids(tokenizer, "calc 3 + <eos>")) == grammar.DONE


def test_sample_documents_deterministic_per_seed():
    first, second = sample_documents(8, seed=7), sample_documents(8, seed=7)
    assert [(d.prompt_ids, d.response_ids, d.roles) for d in first] == [
        (d.prompt_ids, d.response_ids, d.roles) for d in second
    ]


def test_sample_documents_seeds_differ():
    first, second = sample_documents(8, seed=7), sample_documents(8, seed=8)
    assert [d.response_ids for d in first] != [d.response_ids for d in second]


# Exact loss-to-go and kappa


def _brute_force_value(process, state: grammar.State, horizon: int) -> float:
    """Compute V_horizon(state) by enumerating every token id at every step, with no merging."""
    if horizon <= 0 or state == grammar.DONE:
        return 0.0
    probs = process.probs(state)
    loss = _kl(probs, process.probs(state._replace(corrupt=False))) if state.corrupt else 0.0
    future = sum(
        probs[token] * _brute_force_value(process, process.advance(state, token), horizon - 1)
        for token in range(process.vocab_size)
    )
    return loss + future


def _exact_states(process, tokenizer) -> dict[str, grammar.State]:
    return {
        "calc clean": process.state_after(_ids(tokenizer, "calc 3 + 5 - 2 : 3 + 5 =")),
        "calc corrupt": _corrupt_state(process, tokenizer),
        "calc before eos, corrupt": process.state_after(_ids(tokenizer, "calc 3 + 5 : 3 + 5 = 8 ; answer 9")),
        "prog out block": process.state_after(_ids(tokenizer, "prog 2 : let a = 4 ; set b = a + 3 ; out a")),
        "prog corrupt ref": process.state_after(_ids(tokenizer, "prog 2 : let a = 4 ; set b = c")),
        "start": grammar.START,
    }


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_exact_value_matches_enumeration(process, tokenizer, horizon):
    exact = ExactLossToGo(process)
    for name, state in _exact_states(process, tokenizer).items():
        expected = _brute_force_value(process, state, horizon)
        assert abs(exact.value(state, horizon) - expected) < 1e-9, name


def test_exact_clean_horizon_one_zero(process, tokenizer):
    exact = ExactLossToGo(process)
    state = _exact_states(process, tokenizer)["calc clean"]
    assert exact.value(state, 1) == 0.0


def test_exact_corrupt_horizon_one_kl(process, tokenizer):
    exact = ExactLossToGo(process)
    state = _corrupt_state(process, tokenizer)
    expected = _kl(process.probs(state), process.probs(state._replace(corrupt=False)))
    assert expected > 0.1
    assert abs(exact.value(state, 1) - expected) < 1e-12


def _exact_kappa(process, exact, state: grammar.State, num_actions: int = 4, horizon: int = 8) -> float:
    """Compute signed kappa over the teacher's top-k tokens, with Q_bar over their renormalised mass."""
    probs = process.probs(state)
    actions = list(np.argsort(-probs, kind="stable")[:num_actions])
    weights = probs[actions] / probs[actions].sum()
    q = exact.q_values(state, actions, horizon)
    return float((q - (weights * q).sum()).sum())


def test_exact_kappa_bridge_above_garden(process, tokenizer):
    exact = ExactLossToGo(process)
    ids = _ids(tokenizer, f"{CALC_PROMPT} {CALC_RESPONSE}")
    prompt_length = len(_ids(tokenizer, CALC_PROMPT))
    states = process.states_along(ids)
    equality = states[prompt_length + 2]  # the state that writes `=`
    result = states[prompt_length + 3]  # the state that writes the result `8`

    assert grammar.true_role(equality) == "garden"
    assert grammar.true_role(result) == "bridge"
    assert _exact_kappa(process, exact, result) > _exact_kappa(process, exact, equality)
