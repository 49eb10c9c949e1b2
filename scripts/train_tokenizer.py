# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Train the repository's byte-level BPE tokenizer and save it as `tokenizer.json` + `tokenizer_config.json`.

    .venv/bin/python scripts/train_tokenizer.py                      # stdlib sources -> repo root
    .venv/bin/python scripts/train_tokenizer.py --files a.txt b.txt --vocab_size 8192 --output_dir my_tok

Default corpus: the UTF-8 `.py` files of the running interpreter's standard library (tests and site-packages
excluded), a seeded shuffle of the sorted paths capped at `--max_bytes`. Same interpreter + same arguments give the
same tokenizer.

Special tokens:
  * `<|endoftext|>` (id 0) is bos and eos: it ends every document when the training script packs text, so it is also
    the natural "start of a new document" prefix for generation (GPT-2 convention; nothing is added automatically).
  * `<|pad|>` (id 1) is a separate pad token. Sharing eos as pad would make label masking by pad id (e.g.
    `DataCollatorForLanguageModeling`) drop every real end-of-text label, and would hide where padding is in
    `generate` inputs without an attention mask.

Byte-level (GPT-2 byte alphabet, no normaliser): every Unicode string maps to known tokens and decodes back exactly.
Load it with `AutoTokenizer.from_pretrained(<output_dir>)`; `padding_side` can be passed there or set later.
"""

import argparse
import os
import sys
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import REPO_ROOT, resolve_files, stdlib_python_files  # noqa: E402


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def iter_texts(files, batch_size=64):
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i : i + batch_size]:
            with open(path, encoding="utf-8", errors="replace") as f:
                batch.append(f.read())
        yield batch


def train_tokenizer(files, vocab_size=4096, min_frequency=2) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text and break exact round trips
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer, length=len(files))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,  # byte-level: nothing is unknown
        clean_up_tokenization_spaces=False,  # would rewrite " ," -> "," and break round trips
        padding_side="right",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", help="text files or globs (default: Python stdlib sources)")
    parser.add_argument("--max_bytes", type=int, default=32_000_000, help="cap on the default stdlib corpus (CPython 3.11: ~12 MB in all)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="order of the stdlib files before the byte cap")
    parser.add_argument("--output_dir", default=REPO_ROOT)
    args = parser.parse_args(argv)

    files = resolve_files(args.files, "--files") if args.files else stdlib_python_files(args.max_bytes, args.seed)
    size = sum(os.path.getsize(f) for f in files)
    start = time.time()
    tokenizer = train_tokenizer(files, args.vocab_size, args.min_frequency)
    print(f"trained on {len(files)} files ({size / 1e6:.1f} MB) in {time.time() - start:.1f}s; vocab {len(tokenizer)}")
    os.makedirs(args.output_dir, exist_ok=True)
    # legacy_format=False: only tokenizer.json + tokenizer_config.json, no vocab.json/merges.txt duplicates
    tokenizer.save_pretrained(args.output_dir, legacy_format=False)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
