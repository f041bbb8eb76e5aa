"""Answer extraction for generated (chain-of-thought) answers, and TheoremQA matching.

`extract_answer` turns a model's free text into the short answer that exact match
compares with the target: BBH targets are "(B)", "True", "valid", "-45", "] ) }";
TheoremQA answers are numbers, lists, booleans or options. The rules, in order:

1. take the text after the last "answer is" / "answer:" (case-insensitive), up to the
   end of that line; without one, take nothing (BBH) or the last number (TheoremQA);
2. strip spaces, wrapping quotes, `**`, `$`, and trailing punctuation;
3. a choice letter, with or without parentheses ("B", "(b)", "B)", "option B"),
   becomes "(B)", the BBH target format;
4. a number followed by words ("5 apples", "12 m/s") keeps the number only;
   thousands separators go ("1,234" -> "1234").

TheoremQA numbers are compared as in its release: within 4% of the reference
(relative), elementwise for lists. Decision: relative tolerance rather than rounding to
the reference's decimals, because the release scored that way and results must be
comparable with published numbers.
"""

from __future__ import annotations

import math
import re

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.IGNORECASE)
_CHOICE = re.compile(r"^(?:option\s+|choice\s+)?\(?([A-Ra-r])\)?(?:[.:),]|\s|$)")
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
_LEADING_NUMBER = re.compile(rf"^({_NUMBER})(?:\s*(?:\*|x|×|\\times)\s*10\s*\^\s*\{{?\(?([-+]?\d+)\)?\}}?)?(?=\s|%|$|[,;:!?)\]])")
_ANY_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_TRAILING = ".,;:!?。 \t"
THEOREMQA_RELATIVE_TOLERANCE = 0.04


def extract_answer(text: str, fallback_last_number: bool = False) -> str:
    """Return the normalised short answer in `text`, or "" when none is found."""
    span = _after_last_answer_is(text)
    if span is None and fallback_last_number:
        numbers = _ANY_NUMBER.findall(text)
        span = numbers[-1] if numbers else None
    return "" if span is None else normalise_answer(span)


def normalise_answer(span: str) -> str:
    """Apply rules 2-4 of the module docstring to one extracted span."""
    span = span.strip().replace("**", "").strip()
    span = span.strip("\"'`").strip().rstrip(_TRAILING).strip("\"'`$ ").rstrip(_TRAILING)
    span = re.sub(r"\\boxed\{(.*)\}", r"\1", span)
    choice = _CHOICE.match(span)
    if choice and (len(span) <= 3 or span[:1] == "(" or span.lower().startswith(("option", "choice"))):
        return f"({choice.group(1).upper()})"
    number = _LEADING_NUMBER.match(span)
    if number and number.group(1) not in ("", "-", "+"):
        value = number.group(1).replace(",", "")
        if number.group(2) is not None:
            value = f"{value}e{number.group(2)}"
        return value + "%" if span[number.end():].lstrip().startswith("%") else value
    return re.sub(r"\s+", " ", span)


def parse_number(text: str) -> float | None:
    """Return the number a normalised answer states (`"1.2e-3"`, `"45%"` -> 0.45), or None."""
    text = text.strip().replace(",", "")
    percent = text.endswith("%")
    text = text.rstrip("%").strip()
    try:
        value = float(text)
    except ValueError:
        match = _LEADING_NUMBER.match(text)
        if not match or match.group(1) in ("", "-", "+"):
            return None
        value = float(match.group(1).replace(",", "")) * (10.0 ** int(match.group(2)) if match.group(2) else 1.0)
    return value / 100 if percent else value


def theoremqa_correct(prediction: str, answer, answer_type: str) -> bool:
    """Whether an extracted `prediction` matches TheoremQA's `answer` of `answer_type`.

    Types: integer, float, list of integer, list of float, bool, option.
    """
    prediction = prediction.strip()
    if answer_type == "bool":
        truth = {"true": True, "yes": True, "false": False, "no": False}.get(prediction.lower().rstrip("."))
        return truth is not None and truth == _as_bool(answer)
    if answer_type == "option":
        return normalise_answer(prediction).lower() == normalise_answer(str(answer)).lower()
    if answer_type.startswith("list"):
        values = [parse_number(part) for part in prediction.strip("[]() ").split(",") if part.strip()]
        reference = answer if isinstance(answer, list) else [answer]
        return len(values) == len(reference) and all(
            value is not None and _within(value, float(ref)) for value, ref in zip(values, reference))
    value = parse_number(prediction)
    return value is not None and _within(value, float(answer))


def theoremqa_prediction(text: str, answer_type: str) -> str:
    """Extract the answer of a TheoremQA generation, keeping lists whole."""
    span = _after_last_answer_is(text)
    if answer_type.startswith("list") and span is not None:
        bracket = re.search(r"\[[^\]]*\]", span)
        if bracket:
            return bracket.group(0)
    if answer_type == "bool" and span is not None:
        word = re.match(r"\W*(true|false|yes|no)\b", span, re.IGNORECASE)
        if word:
            return word.group(1)
    return extract_answer(text, fallback_last_number=True)


def _after_last_answer_is(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "answer:", or None."""
    matches = list(_ANSWER_IS.finditer(text))
    return text[matches[-1].end():].split("\n")[0] if matches else None


def _within(value: float, reference: float) -> bool:
    if not math.isfinite(value):
        return False
    return abs(value - reference) <= abs(reference) * THEOREMQA_RELATIVE_TOLERANCE


def _as_bool(answer) -> bool:
    if isinstance(answer, str):
        return answer.strip().lower() in ("true", "yes")
    return bool(answer)
