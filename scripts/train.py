# Copyright 2026 The Titans-HF authors. Apache-2.0.
"""Train (or fine-tune) a Titans causal LM with the 🤗 `Trainer`.

Every `TrainingArguments` flag works (`--bf16`, `--fp16`, `--activation_checkpointing`, `--report_to`, `--save_steps`,
`--resume_from_checkpoint`, ...); the model and data flags are listed by `--help`.

Main job (2 CPU cores, 4-7 min): a small MAG Titans on the Python standard library, then eval, a sample, save and a
reload check through `trust_remote_code` in a fresh process:

    .venv/bin/python scripts/train.py --quickstart --output_dir outputs/quickstart

From scratch, local files (text: one sample per file by default; .json/.jsonl with a "text" field):

    .venv/bin/python scripts/train.py --output_dir outputs/run --train_files data/*.txt \
        --variant mac --hidden_size 256 --num_hidden_layers 6 --attention_window 128 --memory_chunk_size 16 \
        --config_overrides "memory_depth=2,memory_layers=[0,2,4]" --block_size 512 --max_steps 2000

Hub dataset (needs network; rows are lines there, so no end-of-text after each row):

    .venv/bin/python scripts/train.py --output_dir outputs/wt2 --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --append_eos false --num_train_epochs 1

Fine-tune a saved Titans, continue an interrupted run:

    .venv/bin/python scripts/train.py --model_name_or_path outputs/quickstart --output_dir outputs/ft ...
    .venv/bin/python scripts/train.py <same args> --resume_from_checkpoint last     # or a checkpoint-N folder

Data-parallel (DDP; gloo on CPU, NCCL on GPUs):

    .venv/bin/torchrun --nproc_per_node 2 scripts/train.py --output_dir outputs/ddp ...

FSDP: `_no_split_modules = ["TitansDecoderLayer"]` makes auto-wrap shard one decoder layer per unit, either through
the Trainer flags or an accelerate config:

    torchrun --nproc_per_node 8 scripts/train.py --fsdp --bf16 --output_dir outputs/fsdp ...   # FSDP2, layer-wise
    accelerate launch --num_processes 8 --use_fsdp --fsdp_sharding_strategy FULL_SHARD \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap TitansDecoderLayer \
        --fsdp_state_dict_type FULL_STATE_DICT scripts/train.py --bf16 --output_dir outputs/fsdp ...

Set `TITANS_RANK_LOG_DIR=<dir>` to have every rank write `rank<i>.json` (its logs and a parameter checksum), which
the tests use to check that DDP ranks agree.
"""

import argparse
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields


START = time.time()  # the job's reported time includes the imports below
# libgomp threads spin while waiting: with two threads on two cores and any other busy process, a Titans step (many
# small kernels) measured 10-50x slower. Passive waiting costs little on an idle machine. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging


SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)
from data import (  # noqa: E402
    REPO_ROOT,
    DataError,
    causal_lm_collator,
    load_raw_datasets,
    split_validation,
    tokenize_and_pack,
)


try:  # installed (pip install -e .) or run from the repository root
    from configuration_titans import TitansConfig
    from modeling_titans import TitansForCausalLM
except ImportError:
    sys.path.insert(0, REPO_ROOT)
    from configuration_titans import TitansConfig
    from modeling_titans import TitansForCausalLM


logger = logging.getLogger("train")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved Titans (folder or Hub id) to fine-tune; omit to train from scratch."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the model's, else the repository's)."}
    )
    variant: str | None = field(default=None, metadata={"help": "mac, mag, mal or lmm (from scratch)."})
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    attention_window: int | None = None
    num_persistent_tokens: int | None = None
    memory_depth: int | None = None
    num_memory_heads: int | None = None
    memory_head_dim: int | None = None
    memory_chunk_size: int | None = None
    memory_max_lr: float | None = None
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'Any other TitansConfig fields, e.g. "memory_layers=[0,2],memory_max_lr=0.05".'},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa (default), eager or flex_attention."})


CONFIG_FIELDS = [
    f.name for f in fields(ModelArguments)
    if f.name not in ("model_name_or_path", "tokenizer_name", "config_overrides", "attn_implementation")
]


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. wikitext."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. wikitext-2-raw-v1."})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Local .txt/.json/.jsonl/.csv/.parquet files or globs (default: stdlib)."}
    )
    validation_files: list[str] | None = field(default=None, metadata={"help": "Local validation files."})
    text_column: str = "text"
    sample_by: str = field(default="document", metadata={"help": "Text files: document, paragraph or line."})
    append_eos: bool = field(default=True, metadata={"help": "End each sample with <|endoftext|> before packing."})
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training blocks held out when the data has no validation split."}
    )
    stdlib_max_bytes: int | None = field(default=None, metadata={"help": "Cap on the default stdlib corpus."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on N random validation blocks."})
    preprocessing_num_workers: int | None = None
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder (default: HF_DATASETS_CACHE)."})


@dataclass
class ScriptArguments:
    quickstart: bool = field(default=False, metadata={"help": "Preset for the README main job (see QUICKSTART)."})
    prompt: str = field(default="def fibonacci(n):", metadata={"help": "Prompt of the sample printed at the end."})
    max_new_tokens: int = field(default=64, metadata={"help": "Length of that sample; 0 skips it."})
    max_train_time: float | None = field(
        default=None, metadata={"help": "Stop training after this many seconds (a wall-clock cap on max_steps)."}
    )
    check_reload: bool = field(
        default=False, metadata={"help": "Reload the saved model with trust_remote_code in a fresh process and "
                                          "check logits and greedy tokens are identical."}
    )


# The README main job, sized for 2 CPU cores: 350 steps of 8x256 tokens at 0.6-1 s each (4-6 min); the time cap
# only stops a much slower or busier machine early, keeping the job under 10 minutes. memory_max_lr 0.01: at
# 0.05-0.1 the memory state of a 16-token chunk diverges within ~30 steps on this data. Explicit flags on the
# command line come after these and win.
QUICKSTART = [
    "--variant", "mag", "--hidden_size", "128", "--intermediate_size", "384", "--num_hidden_layers", "4",
    "--num_attention_heads", "4", "--attention_window", "64", "--memory_chunk_size", "16",
    "--num_memory_heads", "4", "--memory_head_dim", "32", "--memory_max_lr", "0.01",
    "--block_size", "256", "--max_eval_samples", "64",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "30", "--weight_decay", "0.1",
    "--max_steps", "350", "--max_train_time", "420", "--logging_steps", "25",
    "--eval_strategy", "steps", "--eval_steps", "100", "--save_strategy", "steps", "--save_steps", "200",
    "--save_total_limit", "1", "--seed", "0",
    "--check_reload", "true",
]


def fail(message: str):
    raise SystemExit(f"train.py: error: {message}")


def parse_overrides(text: str) -> dict:
    """ "a=1,b=[0,2],c=silu" -> {"a": 1, "b": [0, 2], "c": "silu"}; commas inside brackets stay in the value."""
    pairs, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            pairs.append(current)
            current = ""
        else:
            current += ch
    pairs.append(current)
    out = {}
    for pair in filter(str.strip, pairs):
        if "=" not in pair:
            fail(f'--config_overrides: expected "key=value", got {pair.strip()!r}.')
        key, value = (s.strip() for s in pair.split("=", 1))
        literal = {"true": True, "false": False, "none": None, "null": None}.get(value.lower(), value)
        if isinstance(literal, str):
            try:
                literal = json.loads(value)
            except json.JSONDecodeError:
                pass  # a bare string such as silu
        out[key] = literal
    return out


def build_config(model_args: ModelArguments, tokenizer):
    given = {name: getattr(model_args, name) for name in CONFIG_FIELDS if getattr(model_args, name) is not None}
    overrides = parse_overrides(model_args.config_overrides) if model_args.config_overrides else {}
    try:
        if model_args.model_name_or_path:
            config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
            updates = {**given, **overrides}
            unknown = [k for k in updates if not hasattr(config, k)]
            if unknown:
                fail(f"unknown config field(s) {unknown} for {type(config).__name__}.")
            for key, value in updates.items():
                setattr(config, key, value)
            if hasattr(config, "validate_titans"):
                config.validate_titans()
            return config
        known = {f.name for f in fields(TitansConfig)}
        unknown = [k for k in overrides if k not in known]
        if unknown:
            fail(f"--config_overrides: unknown TitansConfig field(s) {unknown}.")
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        return TitansConfig(**{**special, **given, **overrides, "vocab_size": len(tokenizer)})
    except (ValueError, TypeError) as err:  # the config names the bad field and the allowed values
        fail(f"invalid model configuration: {err}")


class TimeBudgetCallback(TrainerCallback):
    """Ends training once `seconds` have passed, so a preset finishes in time on a slower or busy machine."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        stop = torch.tensor([time.time() - self.start > self.seconds], dtype=torch.int32, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(stop, src=0)  # ranks must stop on the same step, or the others hang
        if stop.item():
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"  # a checkpoint to --resume_from_checkpoint from


class DivergenceCallback(TrainerCallback):
    """Stops at the first non-finite gradient norm: Trainer's NaN filter would otherwise log a finite-looking loss
    while the weights are already NaN. The norm is taken after the DDP all-reduce, so every rank stops together."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if norm is not None and not math.isfinite(norm):
            raise RuntimeError(
                f"training diverged by step {state.global_step} (gradient norm {norm}). Lower --learning_rate, or "
                "--memory_max_lr (a large inner learning rate makes the memory state blow up), or raise --warmup_steps."
            )


class RankLogCallback(TrainerCallback):
    """Writes every rank's logs and a checksum of its parameters (DDP keeps replicas equal) for the tests."""

    def __init__(self, directory: str):
        self.directory = directory
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}, step=state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        # FSDP2 shards parameters as DTensors: the checksum is over the full tensors, and each rank says how many of
        # the parameter's elements it holds itself
        sharded = [p for p in params if isinstance(p, DTensor)]
        checksum = sum(float((p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum()) for p in params)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{args.process_index}.json"), "w") as f:
            json.dump({"rank": args.process_index, "world_size": args.world_size, "global_step": state.global_step,
                       "param_checksum": checksum, "sharded_parameters": len(sharded), "parameters": len(params),
                       "local_elements": local, "total_elements": sum(p.numel() for p in params), "logs": self.logs},
                      f, indent=1)


# Runs in a fresh interpreter whose cwd is elsewhere: only the saved folder (config.json auto_map + the copied
# configuration_titans.py / modeling_titans.py) can supply the code.
RELOAD_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out_dir, ref_path = sys.argv[1:3]
ref = torch.load(ref_path)
model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True).eval()
AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"]).logits.float()
    greedy = model.generate(ref["input_ids"], max_new_tokens=ref["new_tokens"], do_sample=False)[0].tolist()
diff = (logits - ref["logits"]).abs().max().item()
result = {"module": type(model).__module__, "max_abs_logit_diff": diff, "greedy_equal": greedy == ref["greedy"]}
print(json.dumps(result))
sys.exit(0 if result["greedy_equal"] and diff <= 1e-5 and result["module"].startswith("transformers_modules") else 1)
"""


def check_reload(model, tokenizer, output_dir: str, prompt: str, new_tokens: int = 24) -> bool:
    # the reference runs on CPU in fp32, like the fresh process, so "identical" means bit-for-bit comparable
    model = model.to("cpu", dtype=torch.float32).eval()
    input_ids = torch.tensor([tokenizer(tokenizer.eos_token + prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
        greedy = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.pt")
        torch.save({"input_ids": input_ids, "logits": logits, "greedy": greedy, "new_tokens": new_tokens}, ref_path)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", RELOAD_CHECK, os.path.abspath(output_dir), ref_path],
            cwd=tmp, env=env, capture_output=True, text=True,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        print(f"[reload check] FAILED: the fresh process printed nothing\n{proc.stderr[-3000:]}")
        return False
    result = json.loads(lines[-1])
    ok = proc.returncode == 0
    print(
        f"[reload check] {'OK' if ok else 'FAILED'}: AutoModelForCausalLM.from_pretrained({output_dir!r}, "
        f"trust_remote_code=True) in a fresh process loaded {result['module']}; max |logit diff| = "
        f"{result['max_abs_logit_diff']:.3g}, greedy tokens identical: {result['greedy_equal']}"
    )
    return ok


def sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    model.eval()
    # <|endoftext|> ends every training document, so it is the "new file starts here" context
    input_ids = torch.tensor([tokenizer(tokenizer.eos_token + prompt)["input_ids"]], device=model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.5, top_k=40,
            pad_token_id=tokenizer.pad_token_id,
        )
    return prompt + tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quickstart", nargs="?", const="true", default="false")
    quick = pre.parse_known_args(argv)[0].quickstart.lower() in ("true", "1", "yes")
    defaults = ["--report_to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    if not torch.accelerator.is_available():
        # accelerate picks its multi-CPU (gloo) mode under torchrun, and allows --bf16, only when told it is on CPU
        defaults += ["--use_cpu", "true"]
    formatter = type("Formatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    parser = HfArgumentParser((ModelArguments, DataArguments, ScriptArguments, TrainingArguments),
                              description=__doc__, formatter_class=formatter)
    return parser.parse_args_into_dataclasses(args=defaults + (QUICKSTART if quick else []) + list(argv))


def main(argv=None):
    model_args, data_args, script_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    hf_logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # resolve the checkpoint first: a wrong path must fail before minutes of preprocessing
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and checkpoint.lower() in ("last", "latest", "true"):
        checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if checkpoint is None:
            fail(f"--resume_from_checkpoint: no checkpoint-* folder in {training_args.output_dir!r}.")
    elif checkpoint is not None and not os.path.isdir(checkpoint):
        fail(f"--resume_from_checkpoint: {checkpoint!r} is not a folder.")
    elif os.path.isdir(training_args.output_dir) and get_last_checkpoint(training_args.output_dir):
        logger.warning("%s already holds checkpoints; this run starts over (use --resume_from_checkpoint last "
                       "to continue).", training_args.output_dir)

    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path or REPO_ROOT
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, trust_remote_code=True)
    except (OSError, ValueError) as err:
        fail(f"could not load the tokenizer from {tokenizer_name!r}: {err}")

    try:
        with training_args.main_process_first(desc="dataset preprocessing"):
            raw = load_raw_datasets(
                data_args.dataset_name, data_args.dataset_config_name, data_args.train_files,
                data_args.validation_files, data_args.text_column, data_args.sample_by, data_args.stdlib_max_bytes,
                training_args.seed, data_args.cache_dir,
            )
            blocks, counts = tokenize_and_pack(
                raw, tokenizer, data_args.block_size, data_args.text_column, data_args.append_eos,
                data_args.preprocessing_num_workers,
            )
            blocks = split_validation(blocks, data_args.validation_split_percentage)
    except DataError as err:
        fail(str(err))
    train_set, eval_set = blocks["train"], blocks.get("validation")
    if data_args.max_train_samples is not None:
        train_set = train_set.select(range(min(data_args.max_train_samples, len(train_set))))
    if eval_set is not None and data_args.max_eval_samples is not None and data_args.max_eval_samples < len(eval_set):
        eval_set = eval_set.shuffle(seed=training_args.seed).select(range(data_args.max_eval_samples))
    logger.info("tokens: %s; blocks of %d: %d train, %d validation", counts, data_args.block_size, len(train_set),
                len(eval_set) if eval_set is not None else 0)

    if training_args.do_eval and eval_set is None:
        fail("--do_eval needs validation data: --validation_files or --validation_split_percentage > 0.")

    config = build_config(model_args, tokenizer)
    extra = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, trust_remote_code=True, **extra
        )
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        if model_args.attn_implementation:
            config._attn_implementation = model_args.attn_implementation
        model = TitansForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Titans %s: %.2fM parameters, %d layers, hidden %d, window %d, memory chunk %d", config.variant,
                n_params / 1e6, config.num_hidden_layers, config.hidden_size, config.attention_window,
                config.memory_chunk_size)

    callbacks = [DivergenceCallback()]
    if os.environ.get("TITANS_RANK_LOG_DIR"):
        callbacks.append(RankLogCallback(os.environ["TITANS_RANK_LOG_DIR"]))
    if script_args.max_train_time:
        callbacks.append(TimeBudgetCallback(script_args.max_train_time))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=causal_lm_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on for accelerator processes only; on CPU the run is plain data parallel
        logger.warning("--fsdp was given but FSDP is not active on this device (%s): training runs as DDP, unsharded.",
                       training_args.device)

    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # save_pretrained: weights, config.json with auto_map, the two .py files, tokenizer
    metrics = dict(train_result.metrics, train_samples=len(train_set))
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if eval_set is not None:
        metrics = trainer.evaluate()
        loss = metrics["eval_loss"]
        metrics["perplexity"] = math.exp(loss) if loss < 50 else float("inf")
        metrics["eval_samples"] = len(eval_set)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            print(f"\neval loss {loss:.4f}  perplexity {metrics['perplexity']:.2f}  "
                  f"({len(eval_set)} blocks of {data_args.block_size} tokens)")

    ok = True
    sharded = bool(training_args.fsdp) or training_args.deepspeed is not None  # generation needs the full weights
    if trainer.is_world_process_zero() and not sharded:
        # with --bf16/--fp16, accelerate leaves an autocast wrapper on forward; the saved model has none
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        if script_args.max_new_tokens > 0:
            text = sample(model, tokenizer, script_args.prompt, script_args.max_new_tokens, training_args.seed)
            print(f"\n----- sample (temperature 0.5, top-k 40) -----\n{text}\n----------------------------------------")
        if script_args.check_reload:
            ok = check_reload(model, tokenizer, training_args.output_dir, script_args.prompt)
        print(f"\nsaved to {training_args.output_dir}; total time {time.time() - START:.0f}s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
