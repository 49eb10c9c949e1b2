# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Data helpers shared by the scripts: find the default corpus, load any `datasets` source, tokenise and pack.

Import from another script with `sys.path.insert(0, <repo>/scripts)` then `import data` (the scripts folder is not a
package). Every problem with the input raises `DataError` with a message naming the problem, so a caller can stop
before any model is built or trained.
"""

import glob
import os
import random
import sysconfig
from collections.abc import Sequence

import torch


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests, vendored packages and caches are not the "library": test suites hold deliberately broken or odd files.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

# datasets builder per file extension; anything else is read as plain text.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """Unusable input data (missing file, empty dataset, block size larger than the data, ...)."""


def stdlib_python_files(max_bytes: int | None = None, seed: int = 0) -> list[str]:
    """UTF-8 `.py` sources of the running interpreter's standard library, in a fixed pseudo-random order.

    The order is a seeded shuffle of the sorted paths, so a byte cap keeps a sample of the whole library (not only
    the packages whose names start with "a") and the same Python install always gives the same list.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        paths.extend(os.path.join(dirpath, name) for name in filenames if name.endswith(".py"))
    paths.sort()
    random.Random(seed).shuffle(paths)
    kept, total = [], 0
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            continue  # empty __init__.py files add nothing but an end-of-text token
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few legacy files declare another coding; the text builder reads UTF-8
        kept.append(path)
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            break
    if not kept:
        raise DataError(f"No Python sources found under the standard library folder {root}.")
    return kept


def resolve_files(patterns: Sequence[str], what: str = "--train_files") -> list[str]:
    """Expand globs and check that every file exists, so a typo fails with its name rather than deep in datasets."""
    files = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{what}: no file matches the pattern {pattern!r}.")
            files.extend(matches)
        elif not os.path.isfile(pattern):
            raise DataError(f"{what}: data file not found: {pattern!r}.")
        else:
            files.append(pattern)
    return files


def builder_for(files: Sequence[str]) -> str:
    kinds = {BUILDERS.get(os.path.splitext(f)[1].lower(), "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"Data files mix formats {sorted(kinds)}; pass files of one kind (text, json, csv or parquet).")
    return kinds.pop()


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_files: Sequence[str] | None = None,
    validation_files: Sequence[str] | None = None,
    text_column: str = "text",
    sample_by: str = "document",
    stdlib_max_bytes: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
):
    """A `DatasetDict` with a "train" split (and "validation" when the source has one) holding `text_column`.

    Sources, in order of precedence: a Hub dataset, local files, else the standard library sources. Local text
    files are read one sample per document by default: packing then keeps their line breaks, which matter for code.
    """
    from datasets import DatasetDict, load_dataset

    if dataset_name:
        try:
            raw = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        except Exception as err:  # offline, unknown name, missing config: all surface as different exception types
            raise DataError(
                f"Could not load the dataset {dataset_name!r} (config {dataset_config_name!r}): {err}. "
                "Without network access use --train_files with local text/JSON files."
            ) from err
        if "train" not in raw:
            raise DataError(f"Dataset {dataset_name!r} has no 'train' split (splits: {list(raw)}).")
        splits = {"train": raw["train"]}
        if "validation" in raw:
            splits["validation"] = raw["validation"]
        raw = DatasetDict(splits)
    else:
        if train_files:
            data_files = {"train": resolve_files(train_files)}
        else:
            data_files = {"train": stdlib_python_files(stdlib_max_bytes, seed)}
        if validation_files:
            data_files["validation"] = resolve_files(validation_files, "--validation_files")
        builder = builder_for([f for files in data_files.values() for f in files])
        kwargs = {"sample_by": sample_by, "keep_linebreaks": True} if builder == "text" else {}
        try:
            raw = load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **kwargs)
        except Exception as err:  # malformed JSON/CSV, undecodable text
            raise DataError(f"Could not read the data files with the datasets {builder!r} builder: {err}") from err
    for split, ds in raw.items():
        if text_column not in ds.column_names:
            raise DataError(
                f"The {split} data has no column {text_column!r} (columns: {ds.column_names}); set --text_column."
            )
        if len(ds) == 0:
            raise DataError(f"The {split} dataset is empty (0 rows).")
    return raw


def tokenize_and_pack(
    raw,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    append_eos: bool = True,
    num_proc: int | None = None,
):
    """Tokenise every split, concatenate it and cut it into `block_size`-token blocks (the tail that does not fill a
    block is dropped). Returns (blocks `DatasetDict` with an `input_ids` column, {split: token count}).

    An end-of-text token after each sample marks document boundaries. Blocks are plain causal-LM rows: the Titans
    memory runs across a boundary inside a block like attention does in GPT-style packing; only the
    `DataCollatorWithFlattening` style (restarting position ids) would need a reset, and it is not used here.
    """
    if block_size <= 0:
        raise DataError(f"--block_size must be positive, got {block_size}.")
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise DataError("The tokenizer has no eos token; pass --append_eos false or use a tokenizer with one.")

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        ids = [x + [eos] if append_eos else x for x in ids if x]
        return {"input_ids": ids, "num_tokens": [len(x) for x in ids]}

    def pack(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokenized = raw.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=raw["train"].column_names, desc="Tokenising"
    )
    # a split whose texts are all empty maps to zero rows and no columns at all
    counts = {split: int(sum(ds["num_tokens"])) if len(ds) else 0 for split, ds in tokenized.items()}
    for split, count in counts.items():
        if count == 0:
            raise DataError(f"The {split} dataset is empty: no text (0 tokens after tokenisation).")
        if count < block_size:
            raise DataError(
                f"--block_size {block_size} is larger than the {split} data ({count} tokens): no full block. "
                "Use a smaller --block_size or more data."
            )
    # large batches lose less to the per-batch remainder
    blocks = tokenized.map(
        pack, batched=True, batch_size=2000, num_proc=num_proc, remove_columns=["num_tokens"],
        desc=f"Packing into {block_size}-token blocks",
    )
    return blocks, counts


def split_validation(blocks, validation_split_percentage: float):
    """Hold out the last `validation_split_percentage` % of the training blocks when there is no validation split.

    A contiguous tail (not a random sample) keeps neighbouring blocks of one document on the same side; the default
    corpus is shuffled by file, so the tail is still a random set of files.
    """
    from datasets import DatasetDict

    if "validation" in blocks or validation_split_percentage <= 0:
        return blocks
    if not validation_split_percentage < 100:
        raise DataError(f"--validation_split_percentage must be in [0, 100), got {validation_split_percentage}.")
    train = blocks["train"]
    n_val = max(1, round(len(train) * validation_split_percentage / 100))
    if len(train) - n_val < 1:
        raise DataError(
            f"Only {len(train)} full block(s): too few to hold out a validation split. Use a smaller --block_size, "
            "more data, or --validation_split_percentage 0."
        )
    cut = len(train) - n_val
    return DatasetDict({"train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))})


def causal_lm_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack equal-length packed blocks; labels are the inputs (the model's loss shifts them)."""
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
