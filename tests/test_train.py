"""Training: Trainer on a tiny Titans, scripts/train.py end to end (checkpoint, resume, fine-tune, reload through
trust_remote_code), 2-process CPU DDP, and clear errors for bad input."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, VARIANTS, tiny_config


SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)
from data import causal_lm_collator, load_raw_datasets, tokenize_and_pack  # noqa: E402


def load_train_script():
    spec = importlib.util.spec_from_file_location("titans_train_script", os.path.join(SCRIPTS, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the conftest tiny model, as train.py flags (vocab and special ids come from the tokenizer)
TINY_FLAGS = [
    arg
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "attention_window",
                "num_persistent_tokens", "num_memory_heads", "memory_head_dim", "memory_chunk_size")
    for arg in (f"--{key}", str(TINY[key]))
] + [
    "--variant", "mag", "--block_size", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size",
    "8", "--learning_rate", "5e-3", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
    "--max_new_tokens", "4", "--seed", "0",
]


def make_corpus(path, n=120):
    """Regular Python-like text (~5k tokens): a tiny model's loss falls within a few steps."""
    docs = [f"def add_{i}(x):\n    return x + {i}\n\n\nclass Item{i}:\n    value = {i * 7}\n" for i in range(n)]
    path.write_text("\n".join(docs))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "code.txt")


@pytest.fixture
def single_thread():
    # two OpenMP threads on a 2-core machine shared with other jobs spin-wait badly; tiny models gain nothing
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def script_env(tmp_path, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    env.update(extra)
    return env


def run_script(args, tmp_path, launcher=(), **env):
    proc = subprocess.run(
        [sys.executable, *launcher, os.path.join(SCRIPTS, "train.py"), *args],
        env=script_env(tmp_path, **env), capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    return proc


def losses_of(state_or_history):
    history = state_or_history["log_history"] if isinstance(state_or_history, dict) else state_or_history
    return [h["loss"] for h in history if "loss" in h]


def trend_down(losses, k=3):
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


# ----------------------------------------------------------------------------------------------------------------
# (a) Trainer on a tiny Titans, with and without gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_with_and_without_gradient_checkpointing(tmp_path, corpus, single_thread):
    from modeling_titans import TitansForCausalLM
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(ROOT)
    raw = load_raw_datasets(train_files=[corpus], cache_dir=str(tmp_path / "cache"))
    blocks, counts = tokenize_and_pack(raw, tokenizer, block_size=32)
    assert len(blocks["train"]) == counts["train"] // 32 >= 80

    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = tiny_config("mag", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = TitansForCausalLM(config)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        args = TrainingArguments(
            output_dir=str(tmp_path / f"gc_{checkpointing}"), max_steps=20, per_device_train_batch_size=4,
            learning_rate=5e-3, warmup_steps=2, logging_steps=1, save_strategy="no", report_to="none",
            activation_checkpointing=checkpointing, disable_tqdm=True, seed=0, use_cpu=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=blocks["train"], data_collator=causal_lm_collator)
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        losses = losses_of(trainer.state.log_history)
        assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
        assert trend_down(losses, k=5), losses
        unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
        assert not unchanged, f"parameters never updated: {unchanged}"
        runs[checkpointing] = losses
    # recomputation under checkpointing is the same computation: the loss curves agree
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-4, atol=1e-4)


def test_time_budget_stops_training(tmp_path, corpus, single_thread, train_script):
    from modeling_titans import TitansForCausalLM
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(ROOT)
    blocks, _ = tokenize_and_pack(load_raw_datasets(train_files=[corpus], cache_dir=str(tmp_path / "cache")),
                                  tokenizer, block_size=32)
    model = TitansForCausalLM(tiny_config("mag", vocab_size=len(tokenizer)))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=10_000, per_device_train_batch_size=2,
                             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=blocks["train"], data_collator=causal_lm_collator,
                      callbacks=[train_script.TimeBudgetCallback(0.0)])
    trainer.train()
    assert trainer.state.global_step == 1
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "out").iterdir())  # save_strategy "no"


# ----------------------------------------------------------------------------------------------------------------
# (b) train.py end to end: loss falls, checkpoints, resume, fine-tune, reload with trust_remote_code
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_script_end_to_end(tmp_path, corpus):
    from modeling_titans import TitansForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    common = ["--train_files", corpus, "--output_dir", str(out), *TINY_FLAGS, "--save_steps", "4",
              "--eval_strategy", "steps", "--eval_steps", "4"]
    proc = run_script([*common, "--max_steps", "8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoint-4").is_dir() and (out / "checkpoint-8").is_dir()
    first = json.loads((out / "trainer_state.json").read_text())
    assert first["global_step"] == 8
    losses = losses_of(first)
    assert len(losses) == 8 and trend_down(losses), losses
    assert "eval loss" in proc.stdout and "perplexity" in proc.stdout

    # resume: only steps 9..12 run (the rank log sees the new logs only), and the state counts on from 8
    proc = run_script([*common, "--max_steps", "12", "--resume_from_checkpoint", "last", "--check_reload", "true"],
                      tmp_path, TITANS_RANK_LOG_DIR=str(tmp_path / "ranks"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and (out / "checkpoint-12").is_dir()
    new_steps = [h["step"] for h in json.loads((tmp_path / "ranks" / "rank0.json").read_text())["logs"] if "loss" in h]
    assert new_steps == [9, 10, 11, 12]
    assert losses_of(state)[:8] == losses  # the history before the checkpoint is kept, not rerun
    assert "[reload check] OK" in proc.stdout, proc.stdout[-3000:]

    # the saved folder is a self-contained remote-code repo
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_titans.TitansForCausalLM"
    for name in ("modeling_titans.py", "configuration_titans.py", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    remote = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    local = TitansForCausalLM.from_pretrained(str(out)).eval()
    assert type(remote).__module__.startswith("transformers_modules")
    ids = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(remote(input_ids=ids).logits, local(input_ids=ids).logits)

    # fine-tune the saved model (bf16 autocast + activation checkpointing): it starts where training ended, well
    # below a fresh model's loss, and its save reloads exactly too (no autocast wrapper left on the reference)
    proc = run_script(["--model_name_or_path", str(out), "--train_files", corpus, "--output_dir",
                       str(tmp_path / "ft"), *TINY_FLAGS, "--max_steps", "2", "--save_strategy", "no", "--bf16", "true",
                       "--activation_checkpointing", "true", "--check_reload", "true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[reload check] OK" in proc.stdout, proc.stdout[-3000:]
    ft_losses = losses_of(json.loads((tmp_path / "ft" / "trainer_state.json").read_text()))
    assert ft_losses[0] < losses[0] - 0.5 and abs(ft_losses[0] - losses_of(state)[-1]) < 0.3, (ft_losses, state)


# ----------------------------------------------------------------------------------------------------------------
# (c) two CPU processes under torchrun (gloo): DDP through train.py, FSDP2 sharding
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_script_ddp_two_processes(tmp_path, corpus):
    ranks = tmp_path / "ranks"
    proc = run_script(
        ["--train_files", corpus, "--output_dir", str(tmp_path / "ddp"), *TINY_FLAGS, "--max_steps", "4",
         "--save_strategy", "no", "--eval_strategy", "steps", "--eval_steps", "4"],
        tmp_path, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        TITANS_RANK_LOG_DIR=str(ranks),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [log["rank"] for log in logs] == [0, 1] and all(log["world_size"] == 2 for log in logs)
    assert logs[0]["global_step"] == logs[1]["global_step"] == 4
    # the logged losses are averaged over both ranks, and DDP keeps the replicas identical
    assert losses_of(logs[0]["logs"]) == losses_of(logs[1]["logs"]) and len(losses_of(logs[0]["logs"])) == 4
    evals = [[h["eval_loss"] for h in log["logs"] if "eval_loss" in h] for log in logs]
    assert evals[0] == evals[1] and evals[0]
    assert logs[0]["param_checksum"] == logs[1]["param_checksum"]
    assert all(log["sharded_parameters"] == 0 and log["local_elements"] == log["total_elements"] for log in logs)
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_two_processes_matches_one_process(tmp_path):
    """FSDP2 over two CPU ranks (gloo), sharded by `_no_split_modules` as accelerate does on GPUs: the loss, every
    gradient, an AdamW step and the gathered, saved and reloaded checkpoint equal the unsharded model (all variants).
    Trainer itself turns FSDP on only on accelerators; the GPU run through train.py is in results/gpu_h200/."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(os.path.dirname(__file__), "fsdp_worker.py"), str(tmp_path)],
        env=script_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [log["rank"] for log in logs] == [0, 1] and all(log["world_size"] == 2 for log in logs)
    for variant in VARIANTS:
        for log in logs:
            r = log["variants"][variant]
            assert r["units"] == ["FSDPTitansDecoderLayer"] * 2, r["units"]
            # every parameter (memory weights and gates included) is a DTensor; each rank holds about half
            assert r["sharded_parameters"] == r["parameters"] and r["local_elements"] < 0.6 * r["total_elements"], r
            assert abs(sum(r["rank_losses"]) / 2 - r["ref_loss"]) < 1e-5, (variant, r)
            assert r["grad_err"] < 1e-4 and r["param_err"] < 1e-3 and r["logits_err_after_step"] < 1e-4, (variant, r)
        assert logs[0]["variants"][variant]["rank_losses"] == logs[1]["variants"][variant]["rank_losses"]
        saved = logs[0]["variants"][variant]
        assert saved["reload_err"] < 1e-4 and "model.safetensors" in saved["saved_files"], saved


# ----------------------------------------------------------------------------------------------------------------
# (d) bad input: a clear error before any training starts
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_script():
    return load_train_script()


def expect_error(train_script, tmp_path, args, *needles):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *TINY_FLAGS, "--max_steps", "2", *args]
    with pytest.raises(SystemExit) as err:
        train_script.main(argv)
    message = str(err.value)
    assert message.startswith("train.py: error:"), message
    for needle in needles:
        assert needle in message, message
    assert not out.exists() or not any(p.name.startswith("checkpoint") or p.name == "trainer_state.json"
                                       for p in out.iterdir())
    return message


def test_error_missing_data_file(train_script, tmp_path):
    expect_error(train_script, tmp_path, ["--train_files", str(tmp_path / "nope.txt")], "not found", "nope.txt")
    expect_error(train_script, tmp_path, ["--train_files", str(tmp_path / "*.nothing")], "no file matches")


def test_error_empty_dataset(train_script, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(train_script, tmp_path, ["--train_files", str(empty)], "empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n')
    expect_error(train_script, tmp_path, ["--train_files", str(blank)], "empty")


def test_error_block_size_larger_than_data(train_script, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("def f(x):\n    return x\n")
    expect_error(train_script, tmp_path, ["--train_files", str(small), "--block_size", "4096"],
                 "--block_size 4096", "larger than the train data", "no full block")
    # exactly one block: nothing left to hold out for validation
    expect_error(train_script, tmp_path, ["--train_files", str(small), "--block_size", "8"], "validation")


def test_error_other_bad_input(train_script, tmp_path, corpus):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "x = 1"}\n')
    expect_error(train_script, tmp_path, ["--train_files", str(rows)], "no column 'text'", "content")
    expect_error(train_script, tmp_path, ["--train_files", corpus, "--config_overrides", "memory_dpeth=3"],
                 "unknown", "memory_dpeth")
    expect_error(train_script, tmp_path, ["--train_files", corpus, "--variant", "xyz"], "variant")
    expect_error(train_script, tmp_path, ["--train_files", corpus, "--resume_from_checkpoint", "last"],
                 "no checkpoint")


def test_error_exit_status_from_the_command_line(tmp_path):
    proc = run_script(["--output_dir", str(tmp_path / "out"), "--train_files", str(tmp_path / "missing.txt")], tmp_path)
    assert proc.returncode != 0
    assert "train.py: error:" in proc.stderr and "missing.txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help(train_script, capsys):
    with pytest.raises(SystemExit) as err:
        train_script.main(["--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    assert "--quickstart" in text and "--train_files" in text and "torchrun" in text


def test_config_overrides_parsing(train_script):
    parsed = train_script.parse_overrides("memory_layers=[0, 2],memory_max_lr=0.05, memory_activation=gelu,"
                                          "num_memory_tokens=None,memory_use_momentum=false")
    assert parsed == {"memory_layers": [0, 2], "memory_max_lr": 0.05, "memory_activation": "gelu",
                      "num_memory_tokens": None, "memory_use_momentum": False}
