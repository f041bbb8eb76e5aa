"""Answer extraction and TheoremQA matching, as cases: (model output, expected answer)."""

from __future__ import annotations

import pytest

from bganalysis.evaluation.extraction import extract_answer, parse_number, theoremqa_correct, theoremqa_prediction

# Endings written like the outputs of SmolLM2 and of the BBH CoT prompts.
BBH_CASES = [
    ("Plugging in A, we get: Z = not True = False. So the answer is False.", "False"),
    ("So the answer is (B).", "(B)"),
    ("So the answer is B.", "(B)"),
    ("so the answer is (b)", "(B)"),
    ("The answer is option C, the tallest.", "(C)"),
    ("So the answer is  valid .", "valid"),
    ("So the answer is Yes!", "Yes"),
    ("The answer is: **True**", "True"),
    ("Thus the answer is \"No\".", "No"),
    ("Adding them up, the answer is 1,234.", "1234"),
    ("So the answer is 5 apples.", "5"),
    ("So the answer is -45.", "-45"),
    ("So the answer is ] ) }.", "] ) }"),
    ("So the answer is apple banana cherry.", "apple banana cherry"),
    ("The first answer is (A). On reflection the answer is (D).", "(D)"),
    ("So the answer is A cat.", "A cat"),
    ("Let me think about the dates again", ""),
    ("So the answer is 12/14/1937.\n\nQ: next question", "12/14/1937"),
]


@pytest.mark.parametrize("text, expected", BBH_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1.2e-3 m/s.", 1.2e-3),
    ("The answer is 3.5 x 10^-2 kg.", 3.5e-2),
    ("Therefore, the answer is 6.02 × 10^{23}.", 6.02e23),
    ("The answer is 45%.", 0.45),
    ("Therefore, the answer is $12.50.", 12.5),
    ("The mass is 9.81 and the result is 2.5", 2.5),  # no "answer is": the last number
])
def test_numbers_with_units_and_scientific_notation(text, expected):
    assert parse_number(extract_answer(text, fallback_last_number=True)) == pytest.approx(expected)


@pytest.mark.parametrize("text, answer, answer_type, correct", [
    ("There are 11760 ways. Therefore, the answer is 11760.", 11760, "integer", True),
    ("Therefore, the answer is 11700.", 11760, "integer", True),  # within 4%
    ("Therefore, the answer is 11000.", 11760, "integer", False),
    ("Therefore, the answer is -1.05.", -1.047, "float", True),
    ("Therefore, the answer is [0, 5].", [0, 5], "list of integer", True),
    ("Therefore, the answer is [5, 0].", [0, 5], "list of integer", False),
    ("Therefore, the answer is [0, 5, 1].", [0, 5], "list of integer", False),
    ("Therefore, the answer is True.", True, "bool", True),
    ("Therefore, the answer is false", True, "bool", False),
    ("Therefore, the answer is (c).", "(c)", "option", True),
    ("Therefore, the answer is c.", "(c)", "option", True),
    ("Therefore, the answer is (a).", "(c)", "option", False),
    ("I cannot solve this.", 3, "integer", False),
])
def test_theoremqa_matching(text, answer, answer_type, correct):
    assert theoremqa_correct(theoremqa_prediction(text, answer_type), answer, answer_type) is correct
