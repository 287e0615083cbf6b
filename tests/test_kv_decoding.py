"""KV-cached greedy decoding (TinyBackend._greedy) equals the uncached reference decoding for a
right-padded batch of prompts of different lengths, for actions and for answers stopping at </s>."""

from __future__ import annotations

import numpy as np
import pytest

from vlaforget.models.base import VLABackend
from vlaforget.models.prompts import encode_action_prompt
from vlaforget.models.tiny import TinyBackend, random_tiny_backend

INSTR = [
    "open the drawer",
    "press the red button on the table now",
    "close the door",
    "push",
    "pick up the puck and place it on the shelf",
]


@pytest.mark.parametrize("seed", [0, 3])
def test_cached_decoding_equals_uncached(seed):
    b = random_tiny_backend(seed=seed)
    imgs = np.random.default_rng(seed).integers(0, 255, (len(INSTR), 32, 32, 3), dtype=np.uint8)
    pv = b._images(imgs)
    prompts = [encode_action_prompt(b.tokenizer, s).ids + b.action_sep_ids for s in INSTR]
    assert len({len(p) for p in prompts}) > 2  # really ragged: padding slots are exercised
    acts = slice(b.action_tokenizer.begin, b.vocab_end)
    cached = TinyBackend._greedy(b, prompts, pv, 7, acts, False, None)
    assert cached == VLABackend._greedy(b, prompts, pv, 7, acts, False, None)
    assert all(len(c) == 7 for c in cached)
    words = slice(0, b.action_tokenizer.begin)
    assert TinyBackend._greedy(b, prompts, pv, 5, words, True, None) == VLABackend._greedy(
        b, prompts, pv, 5, words, True, None
    )


def test_predict_actions_batched_equals_one_by_one():
    b = random_tiny_backend(seed=1)
    imgs = np.random.default_rng(1).integers(0, 255, (len(INSTR), 32, 32, 3), dtype=np.uint8)
    batched = b.predict_actions(imgs, INSTR)
    single = np.concatenate([b.predict_actions(imgs[i : i + 1], INSTR[i : i + 1]) for i in range(len(INSTR))])
    np.testing.assert_allclose(batched, single)
