# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Upload a saved Titans model to the Hugging Face Hub as a `trust_remote_code` repository.

Takes a folder written by `save_pretrained`, reloads it with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (so that `auto_map` and the two code files are
kept), and stages exactly what the Hub repo should hold:

    config.json, generation_config.json, model.safetensors (or model-0000x-of-0000n.safetensors + index),
    configuration_titans.py, modeling_titans.py, tokenizer.json, tokenizer_config.json (+ whatever else the
    tokenizer's save_pretrained writes), README.md (the model card, from model_card.md)

`--dry-run DIR` writes that folder to DIR and uploads nothing; otherwise it is uploaded with `HfApi.upload_folder`.
The token comes from `--token`, the HF_TOKEN environment variable, or the stored login (`hf auth login`).

    .venv/bin/python scripts/push_to_hub.py outputs/quickstart --dry-run outputs/hub-staging
    .venv/bin/python scripts/push_to_hub.py outputs/quickstart --repo_id you/titans-mag-small --private --revision v0.1
"""

import argparse
import filecmp
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = ("configuration_titans.py", "modeling_titans.py")
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# weight files of an earlier push that a new one replaces (a stale model.safetensors next to new shards would win)
STALE_WEIGHTS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
SAMPLE_TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="push_to_hub.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="folder written by save_pretrained (config.json + weights)")
    p.add_argument("--repo_id", help="Hub repository, e.g. 'your-name/titans-mag-small' (not needed with --dry-run)")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer folder (default: model_dir if it holds a tokenizer, else the repository root's)",
    )
    p.add_argument("--model_card", type=Path, default=ROOT / "model_card.md", help="written as README.md")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private (if it does not exist)")
    p.add_argument("--revision", help="branch to push to (created from main if missing); default: main")
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="safetensors shards above this size, e.g. '5GB', '500MB' (default: %(default)s)",
    )
    p.add_argument("--commit_message", default="Upload Titans model")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        type=Path,
        metavar="DIR",
        help="write the exact folder that would be uploaded to DIR (new or empty) and upload nothing",
    )
    p.add_argument("--no_verify", action="store_true", help="skip reloading the staged folder before upload")
    args = p.parse_args(argv)
    if args.dry_run is None and not args.repo_id:
        p.error("--repo_id is required unless --dry-run is given")
    return args


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def resolve_tokenizer_dir(args) -> Path:
    if args.tokenizer is not None:
        if not has_tokenizer(args.tokenizer):
            sys.exit(f"error: --tokenizer {args.tokenizer} holds neither {' nor '.join(TOKENIZER_MARKERS)}")
        return args.tokenizer
    for candidate in (args.model_dir, ROOT):
        if has_tokenizer(candidate):
            return candidate
    sys.exit(
        f"error: no tokenizer in {args.model_dir} nor in {ROOT}; train one (scripts/train_tokenizer.py) or pass "
        "--tokenizer DIR"
    )


def load_model(model_dir: Path):
    """Load through the Auto class with remote code, so that re-saving keeps auto_map and copies the code files."""
    from transformers import AutoModelForCausalLM

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        sys.exit(f"error: {config_file} not found; pass a folder written by model.save_pretrained")
    if "auto_map" in json.loads(config_file.read_text()):
        return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype="auto")
    # saved without auto_map (e.g. by an unregistered class): importing the repository's code registers it
    print(f"note: {config_file} has no auto_map; loading with the repository's modeling_titans.py")
    sys.path.insert(0, str(ROOT))
    from modeling_titans import TitansForCausalLM

    return TitansForCausalLM.from_pretrained(model_dir, dtype="auto")


def load_model_card(path: Path) -> str:
    from huggingface_hub import ModelCard

    if not path.is_file():
        sys.exit(f"error: model card {path} not found")
    card = ModelCard.load(path)  # raises if the YAML front matter does not parse
    if not card.data.to_dict():
        sys.exit(f"error: {path} has no YAML metadata block (--- ... ---) at the top")
    return path.read_text(encoding="utf-8")


def stage(model, tokenizer, card_text: str, out: Path, max_shard_size: str) -> list[str]:
    """Write the repository folder; returns the tokenizer's file names."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer_files = [Path(f).name for f in tokenizer.save_pretrained(out)]
    (out / "README.md").write_text(card_text, encoding="utf-8")
    return tokenizer_files


def check_folder(out: Path, tokenizer_files: list[str]) -> list[str]:
    """Exactly the expected files, auto_map set; returns the sorted listing."""
    files = sorted(p.name for p in out.iterdir())
    if (out / "model.safetensors.index.json").is_file():
        index = json.loads((out / "model.safetensors.index.json").read_text())
        weights = {"model.safetensors.index.json", *index["weight_map"].values()}
    else:
        weights = {"model.safetensors"}
    expected = {"config.json", "generation_config.json", "README.md", *CODE_FILES, *weights, *tokenizer_files}
    missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
    if missing or extra:
        raise RuntimeError(f"staged folder {out} is not as expected: missing {missing}, unexpected {extra}")
    auto_map = json.loads((out / "config.json").read_text()).get("auto_map", {})
    if not {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(auto_map):
        raise RuntimeError(
            f"{out / 'config.json'} lacks auto_map for AutoConfig/AutoModel/AutoModelForCausalLM: {auto_map}"
        )
    return files


@torch.no_grad()
def verify(model, tokenizer, out: Path) -> None:
    """Reload the staged folder the way a Hub user would and compare with the model in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto")
    if reloaded.dtype != model.dtype:
        raise RuntimeError(f"dtype changed on reload: {model.dtype} -> {reloaded.dtype}")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
    if not torch.equal(ids, reloaded_tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids):
        raise RuntimeError("the staged tokenizer encodes differently from the source tokenizer")
    ids = ids[:, :64].to(model.device)
    # equal up to float noise, not bitwise: the weights are memory-mapped at other byte offsets, and BLAS may pick
    # its kernels by alignment (MKL on an AVX-512 AMD CPU: 5e-6 in fp32 with equal weights)
    want, got = model(ids).logits, reloaded.to(model.device)(ids).logits
    try:
        torch.testing.assert_close(got, want)  # dtype-aware tolerances (fp32: rtol 1.3e-6, atol 1e-5)
    except AssertionError as error:
        raise RuntimeError(f"the staged model gives different logits from the source model: {error}") from None


def main(argv=None) -> Path | str:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer_dir = resolve_tokenizer_dir(args)
    card_text = load_model_card(args.model_card)
    model = load_model(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    if len(tokenizer) > model.config.vocab_size:
        sys.exit(
            f"error: tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    for name in CODE_FILES:  # the folder's code is what matches its weights; say so if the repo moved on
        if (args.model_dir / name).is_file() and not filecmp.cmp(args.model_dir / name, ROOT / name, shallow=False):
            print(f"note: {args.model_dir / name} differs from {ROOT / name}; uploading the folder's version")
    print(f"model: {args.model_dir} ({type(model).__name__}, {model.dtype}, variant={model.config.variant})")
    print(f"tokenizer: {tokenizer_dir} ({len(tokenizer)} tokens); model card: {args.model_card}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dry_run if args.dry_run is not None else Path(tmp) / "repo"
        if out.exists() and any(out.iterdir()):
            sys.exit(f"error: {out} is not empty; the staged folder must hold only the repository's files")
        out.mkdir(parents=True, exist_ok=True)
        tokenizer_files = stage(model, tokenizer, card_text, out, args.max_shard_size)
        files = check_folder(out, tokenizer_files)
        if not args.no_verify:
            verify(model, tokenizer, out)
        print(f"staged {out}: {', '.join(files)}")
        if args.dry_run is not None:
            print("dry run: nothing uploaded")
            return out

        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model").repo_id
        if args.revision and args.revision != "main":
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=out,
            revision=args.revision,
            commit_message=args.commit_message,
            delete_patterns=STALE_WEIGHTS,
        )
        print(f"uploaded to {getattr(commit, 'commit_url', None) or repo_id} (revision {args.revision or 'main'})")
        return repo_id


if __name__ == "__main__":
    main()
