"""The repository tokenizer (tokenizer.json + tokenizer_config.json at the root, made by scripts/train_tokenizer.py)."""

import os

import pytest
from transformers import AutoTokenizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT)


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — 你好 🙂\n\tdef f(): pass",
        "  leading spaces ,  odd   spacing\r\n\x00\x7f\u200b ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "",
    ],
)
def test_unicode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_byte_level_has_no_unknowns(tokenizer):
    # every byte is a base token, so no input needs an unk token
    assert tokenizer.unk_token is None
    ids = tokenizer("\U0001f600\U000e0001", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "\U0001f600\U000e0001"


def test_special_tokens(tokenizer):
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 4096
    # special tokens are single ids and survive a round trip; plain text never produces them
    assert tokenizer("<|endoftext|>x", add_special_tokens=False)["input_ids"][0] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in tokenizer("<|endoftext", add_special_tokens=False)["input_ids"]


def test_python_source_is_compressed(tokenizer):
    code = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    ids = tokenizer(code, add_special_tokens=False)["input_ids"]
    assert len(code) / len(ids) > 2  # trained on Python: keywords and indentation runs are merged


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(side):
    tok = AutoTokenizer.from_pretrained(ROOT, padding_side=side)
    batch = tok(["x", "a longer line of text"], padding=True)
    short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
    n_pad = len(short_mask) - sum(short_mask)
    assert n_pad > 0
    pads = short_ids[:n_pad] if side == "left" else short_ids[len(short_ids) - n_pad :]
    mask = short_mask[:n_pad] if side == "left" else short_mask[len(short_mask) - n_pad :]
    assert pads == [tok.pad_token_id] * n_pad and mask == [0] * n_pad
    assert tok.decode(short_ids, skip_special_tokens=True) == "x"


def test_padding_side_settable_after_load(tokenizer):
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(["x", "two words"], padding=True, return_tensors="pt")
        assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    finally:
        tokenizer.padding_side = "right"
