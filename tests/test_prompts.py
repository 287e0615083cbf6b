"""Prompt templates and the instruction-span locator, on our tokenizer and a Llama-like one."""

from __future__ import annotations

import pytest

from vlaforget.models.prompts import (
    ACTION_PREFIX,
    action_prompt,
    decode_span,
    encode_action_prompt,
    encode_vqa,
    vqa_prompt,
)
from vlaforget.models.tiny import train_tokenizer

INSTRUCTIONS = [
    "open the drawer",
    "Open The DRAWER",
    "press the button, then open the door!",
    "put the red block on the plate and slide the plate into the goal region near the back wall " * 3,
    "pick up the cup's handle",
    "a",
]


@pytest.fixture(scope="module")
def word_tok():
    return train_tokenizer(INSTRUCTIONS + ["is the gripper open", "yes", "no"], vocab_words=300)


@pytest.fixture(scope="module")
def sp_tok():
    """A sentencepiece-style (Llama fast) BPE: metaspace '▁', <s> prepended, no punctuation split,
    so merges can straddle template boundaries like Llama's can."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    corpus = (
        [action_prompt(i) for i in INSTRUCTIONS] * 5
        + ["drawer? door? goal? a?"] * 20
        + [vqa_prompt("is the gripper open") + " yes"] * 5
    )
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_template_text():
    assert (
        action_prompt("Open The Drawer") == "In: What action should the robot take to open the drawer?\nOut:"
    )
    assert vqa_prompt("is the gripper open?") == "In: is the gripper open?\nOut:"
    assert vqa_prompt("is the gripper open") == "In: is the gripper open?\nOut:"


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_span_is_instruction_tokens_word_level(word_tok, instruction):
    pt = encode_action_prompt(word_tok, instruction)
    s0, s1 = pt.span
    assert pt.exact
    assert pt.ids[0] == word_tok.bos_token_id
    assert s0 == len(word_tok.encode(ACTION_PREFIX))  # right after the prefix tokens
    # the span's tokens are exactly the instruction's own tokens
    assert pt.ids[s0:s1] == word_tok.encode(instruction.lower(), add_special_tokens=False)
    assert decode_span(word_tok, pt.ids, pt.span) == " ".join(
        word_tok.convert_ids_to_tokens(word_tok.encode(instruction.lower(), add_special_tokens=False))
    )


@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_span_sentencepiece_style(sp_tok, instruction):
    pt = encode_action_prompt(sp_tok, instruction)
    s0, s1 = pt.span
    text = decode_span(sp_tok, pt.ids, pt.span)
    instr = " ".join(instruction.lower().split())
    if pt.exact:
        assert text == instr
    else:  # a token straddles the boundary: it is inside the span, never dropped
        assert instr in text
    assert 1 <= s0 < s1 <= len(pt.ids)
    # nothing of the prefix leaks in: decoding everything before the span gives the prefix
    assert sp_tok.decode(pt.ids[1:s0]).strip() == ACTION_PREFIX or not pt.exact


def test_boundary_merge_is_included(sp_tok):
    # the corpus teaches merges like "a?" / "drawer?": the last instruction token may absorb "?"
    for instr in ["a", "open the drawer"]:
        pt = encode_action_prompt(sp_tok, instr)
        assert instr in decode_span(sp_tok, pt.ids, pt.span)


def test_empty_instruction(word_tok):
    pt = encode_action_prompt(word_tok, "   ")
    assert pt.span[0] == pt.span[1]


def test_vqa_encoding(word_tok, sp_tok):
    for tok in (word_tok, sp_tok):
        ids, n = encode_vqa(tok, "is the gripper open", "yes")
        p_ids, n2 = encode_vqa(tok, "is the gripper open")
        assert ids[:n] == p_ids and n == n2 and len(ids) > n
        assert tok.decode(ids[n:]).strip() == "yes"
