"""The lab's two generators as finite-state processes over words.

Every document starts with `<bos>` and a task word, then a prompt, then `:`, then the
response, then `<eos>`. The process is written as two functions of an immutable,
hashable state:

- `grammar_distribution(state)` returns the valid next words with their probabilities;
- `advance(state, word)` returns the state after emitting `word`.

`advance` accepts any word, valid or not. `<eos>` always ends the document. Any other word outside the valid set corrupts the
document: the state moves on as if the most probable valid word had been written and
the `corrupt` flag is set for good (an invalid word where `<eos>` was expected keeps the
state waiting for `<eos>`). The teacher in `teacher.py` turns this into a distribution
over the whole vocabulary and becomes uncertain on corrupt prefixes.

Flavours:

- `calc`: a step-by-step modular-arithmetic derivation. Prompt `calc 3 + 5 - 2 :`,
  response `3 + 5 = 8 ; then 8 - 2 = 6 ; answer 6`. Copied operands and computed
  results are Bridges; connective and equality words are Gardens.
- `prog`: a small program with variables. Prompt `prog 3 :`, response
  `let a = 4 ; set x = a + 3 ; var c = x - 5 ; out a 4 x 7 c 2`. Names, keywords,
  literals and references are free choices (Gardens); the closing `out` block must read
  every variable's value back in declaration order (Bridges, with long-range state).

A position's true role follows from its valid set: one valid word means any deviation
corrupts the document (Bridge); several valid words, each continued consistently by the
teacher, make a Garden.
"""

from __future__ import annotations

from typing import NamedTuple

DIGITS = tuple(str(d) for d in range(10))
CONNECTIVES = {"then": 0.4, "next": 0.3, "so": 0.2, "now": 0.1}
EQUALITY_WORDS = {"=": 0.85, "is": 0.1, "gives": 0.05}
ANSWER_WORDS = {"answer": 0.6, "total": 0.4}
KEYWORDS = {"let": 0.5, "set": 0.3, "var": 0.2}
NAMES = ("a", "b", "c", "x", "y", "z")
TASK_WORDS = {"calc": 0.5, "prog": 0.5}
MAX_OPERANDS = 4

EOS = "<eos>"


class State(NamedTuple):
    """Position of a document in its process: the task, the grammar slot, the slot's data, and corruption.

    `data` is a tuple whose meaning depends on the task (see `_calc_*` and `_prog_*`).
    """

    task: str
    slot: str
    data: tuple
    corrupt: bool = False


START = State("start", "task", ())
DONE = State("done", "done", ())


def grammar_distribution(state: State) -> dict[str, float]:
    """Return the valid next words at `state` with their probabilities (summing to 1)."""
    if state.task == "start":
        return dict(TASK_WORDS)
    if state.task == "done":
        return {EOS: 1.0}
    if state.task == "calc":
        return _calc_distribution(state)
    return _prog_distribution(state)


def advance(state: State, word: str) -> State:
    """Return the state after `word`; an invalid word sets `corrupt` (see module doc)."""
    if word == EOS:
        return DONE  # a document ends where <eos> is written, valid or not
    valid = grammar_distribution(state)
    if word in valid:
        return _advance_valid(state, word)
    likely = min(valid, key=lambda w: (-valid[w], w))  # ties: alphabetically first
    if likely == EOS:
        return state._replace(corrupt=True)
    return _advance_valid(state, likely)._replace(corrupt=True)


def true_role(state: State) -> str:
    """Return the role of the position that emits the next word: prompt, bridge or garden."""
    if state.task == "start" or state.slot.startswith("prompt"):
        return "prompt"
    return "bridge" if len(grammar_distribution(state)) == 1 else "garden"


def in_response(state: State) -> bool:
    """Return whether the next word belongs to the response (the part after `:`)."""
    return true_role(state) != "prompt"


def _advance_valid(state: State, word: str) -> State:
    if word == EOS:
        return DONE
    if state.task == "start":
        slot = "prompt_operand" if word == "calc" else "prompt_count"
        return State(word, slot, ())
    if state.task == "calc":
        return _calc_advance(state, word)
    return _prog_advance(state, word)


# calc: data = (operands, ops, step, acc, answer_slot_payload)
#   prompt slots: prompt_operand, prompt_after_operand
#   response slots: connector, acc, op, operand, eq, result, semi, answer, final, eos


def _calc_distribution(state: State) -> dict[str, float]:
    slot, data = state.slot, state.data
    if slot == "prompt_operand":
        return {d: 0.1 for d in DIGITS}
    if slot == "prompt_after_operand":
        count = len(data[0])
        if count < 2:
            return {"+": 0.5, "-": 0.5}
        if count >= MAX_OPERANDS:
            return {":": 1.0}
        return {"+": 0.3, "-": 0.3, ":": 0.4}
    operands, ops, step, acc = data
    fixed = {
        "acc": str(acc),
        "op": ops[step] if step < len(ops) else "+",
        "operand": str(operands[step + 1]) if step + 1 < len(operands) else "0",
        "result": str(_apply(acc, ops, operands, step)),
        "semi": ";",
        "final": str(acc),
        "eos": EOS,
    }
    if slot in fixed:
        return {fixed[slot]: 1.0}
    return dict({"connector": CONNECTIVES, "eq": EQUALITY_WORDS, "answer": ANSWER_WORDS}[slot])


def _apply(acc: int, ops: tuple, operands: tuple, step: int) -> int:
    if step >= len(ops):
        return acc
    operand = operands[step + 1]
    return (acc + operand) % 10 if ops[step] == "+" else (acc - operand) % 10


def _calc_advance(state: State, word: str) -> State:
    slot, data = state.slot, state.data
    if slot == "prompt_operand":
        operands, ops = data if data else ((), ())
        return state._replace(slot="prompt_after_operand", data=(operands + (int(word),), ops))
    if slot == "prompt_after_operand":
        operands, ops = data
        if word == ":":
            return state._replace(slot="acc", data=(operands, ops, 0, operands[0]))
        return state._replace(slot="prompt_operand", data=(operands, ops + (word,)))
    operands, ops, step, acc = data
    if slot == "result":
        return state._replace(slot="semi", data=(operands, ops, step, int(word)))
    if slot == "semi":
        step += 1
        next_slot = "connector" if step < len(ops) else "answer"
        return state._replace(slot=next_slot, data=(operands, ops, step, acc))
    following = {"connector": "acc", "acc": "op", "op": "operand", "operand": "eq",
                 "eq": "result", "answer": "final", "final": "eos"}
    return state._replace(slot=following[slot])


# prog: data = (count, names, values, statement, pending) in the response;
#   pending = (name, ref_value, op) for the statement being written;
#   in the out block, statement is the index of the variable being read back.


def _prog_distribution(state: State) -> dict[str, float]:
    slot, data = state.slot, state.data
    if slot == "prompt_count":
        return {"2": 0.3, "3": 0.4, "4": 0.3}
    if slot == "prompt_colon":
        return {":": 1.0}
    count, names, values, statement, pending = data
    if slot == "kw":
        return dict(KEYWORDS)
    if slot == "name":
        free = [n for n in NAMES if n not in names]
        return {n: 1.0 / len(free) for n in free}
    if slot == "ref":
        return {n: 1.0 / len(names) for n in names}
    if slot == "op":
        return {"+": 0.5, "-": 0.5}
    if slot == "literal":
        return {d: 0.1 for d in DIGITS}
    fixed = {
        "assign": "=",
        "semi": ";",
        "out": "out",
        "out_name": names[statement] if statement < len(names) else EOS,
        "out_value": str(values[statement]) if statement < len(values) else EOS,
        "eos": EOS,
    }
    return {fixed[slot]: 1.0}


def _prog_advance(state: State, word: str) -> State:
    slot, data = state.slot, state.data
    if slot == "prompt_count":
        return state._replace(slot="prompt_colon", data=(int(word),))
    if slot == "prompt_colon":
        return state._replace(slot="kw", data=(data[0], (), (), 0, None))
    count, names, values, statement, pending = data
    if slot == "name":
        return state._replace(slot="assign", data=(count, names, values, statement, (word, 0, "+")))
    if slot == "assign":
        next_slot = "literal" if statement == 0 else "ref"
        return state._replace(slot=next_slot)
    if slot == "ref":
        name = pending[0]
        ref_value = values[names.index(word)]
        return state._replace(slot="op", data=(count, names, values, statement, (name, ref_value, "+")))
    if slot == "op":
        name, ref_value, _ = pending
        return state._replace(slot="literal", data=(count, names, values, statement, (name, ref_value, word)))
    if slot == "literal":
        name, ref_value, op = pending
        value = (ref_value + int(word)) % 10 if op == "+" else (ref_value - int(word)) % 10
        return state._replace(slot="semi", data=(count, names + (name,), values + (value,), statement, None))
    if slot == "semi":
        statement += 1
        if statement < count:
            return state._replace(slot="kw", data=(count, names, values, statement, None))
        return state._replace(slot="out", data=(count, names, values, 0, None))
    if slot == "out_value":
        statement += 1
        next_slot = "out_name" if statement < len(names) else "eos"
        return state._replace(slot=next_slot, data=(count, names, values, statement, None))
    following = {"kw": "name", "out": "out_name", "out_name": "out_value"}
    return state._replace(slot=following[slot])
