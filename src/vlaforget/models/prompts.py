"""Prompt templates (OpenVLA action prompt, VQA prompt) and the instruction-span locator.

The instruction's tokens are found by tokenising the template pieces — prefix alone, prefix +
instruction, whole prompt — and comparing the encodings, never by guessed offsets: this works for
Llama's sentencepiece tokenizer (OpenVLA) and for the word-level tokenizer trained here. When a
tokenizer merges characters across a piece boundary, the merged token is counted in the span
(conservative) and `PromptTokens.exact` says so. Positions are in TEXT coordinates (index 0 = <s>);
add the backend's n_image_tokens for sequence (hidden-state) coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTION_PREFIX = "In: What action should the robot take to"
ACTION_SUFFIX = "?\nOut:"
VQA_PREFIX = "In:"


def action_prompt(instruction: str) -> str:
    """`In: What action should the robot take to {instruction.lower()}?\\nOut:` (openvla)."""
    return f"{ACTION_PREFIX} {clean_instruction(instruction)}{ACTION_SUFFIX}"


def clean_instruction(instruction: str) -> str:
    return " ".join(str(instruction).strip().lower().split())


def vqa_prompt(question: str) -> str:
    """`In: {question}?\\nOut:` — the answer and </s> follow."""
    q = " ".join(str(question).strip().split()).rstrip("?").rstrip()
    return f"{VQA_PREFIX} {q}{ACTION_SUFFIX}"


@dataclass
class PromptTokens:
    ids: list[int]  # text token ids, starting with <s>
    span: tuple[int, int]  # [start, end) of the instruction tokens in text coordinates
    exact: bool  # False if a token straddles a template boundary (then it is inside the span)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=True))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_action_prompt(tokenizer, instruction: str) -> PromptTokens:
    """Token ids of the action prompt and the span of the instruction inside it."""
    instr = clean_instruction(instruction)
    full = _encode(tokenizer, action_prompt(instruction))
    prefix = _encode(tokenizer, ACTION_PREFIX)
    with_instr = _encode(tokenizer, f"{ACTION_PREFIX} {instr}") if instr else prefix
    start = _common_prefix(prefix, full)
    end = _common_prefix(with_instr, full)
    exact = start == len(prefix) and end == len(with_instr)
    if end < len(with_instr):  # the last instruction token merged with the suffix: include it
        end = min(end + 1, len(full))
    if not instr:
        end = start
    return PromptTokens(ids=full, span=(start, max(start, end)), exact=exact)


def encode_vqa(tokenizer, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """(ids, n_prompt): prompt ids (+ answer ids when given; no </s>) and the prompt length."""
    prompt = vqa_prompt(question)
    p_ids = _encode(tokenizer, prompt)
    if answer is None:
        return p_ids, len(p_ids)
    full = _encode(tokenizer, f"{prompt} {str(answer).strip()}")
    n = _common_prefix(p_ids, full)
    return full, n


def decode_span(tokenizer, ids: list[int], span: tuple[int, int]) -> str:
    """The instruction as the tokenizer sees it (audit): decoded span tokens."""
    return tokenizer.decode(
        ids[span[0] : span[1]], skip_special_tokens=False, clean_up_tokenization_spaces=False
    ).strip()
