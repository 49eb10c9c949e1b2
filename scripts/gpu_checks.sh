#!/usr/bin/env bash
# GPU checks in one short run (what results/benchmark_gpu*.json and the model card's GPU rows come from):
#   1. tests/test_gpu.py (CUDA vs the references: token recurrence, CPU, uncached generation, eager attention, fp32)
#   2. scripts/benchmark.py on CUDA, bf16 autocast, batch 4: Titans vs memory-disabled vs Llama (sdpa) at 4k and 32k
#   3. FSDP2 through Trainer (torchrun, --fsdp, --bf16) for a few steps
#   4. the slow tests of tests/test_gpu.py (torch.compile / inductor on CUDA)
# Usage: OUT=/tmp/gpu bash scripts/gpu_checks.sh [stage ...]   (stages: env tests bench fsdp compile; default all)
# Each stage has its own time limit and log under $OUT; a stage that fails or times out does not stop the others.
set -u
OUT=${OUT:-/tmp/titans-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # pinned wheels carried to a machine without a registry
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=${*:-env tests bench fsdp compile}
BENCH_MODELS=${BENCH_MODELS:-llama,swa,mag,lmm,mal,mac}
BENCH_LENGTHS=${BENCH_LENGTHS:-4096,32768}

stage() {
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $((SECONDS - start))s"
    tail -n 12 "$OUT/$name.log"
}

stage env 60 bash -c "nvidia-smi -L; $PY -c 'import torch, transformers, triton, accelerate, datasets;
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"triton\", triton.__version__,
      \"accelerate\", accelerate.__version__, \"datasets\", datasets.__version__, torch.cuda.get_device_name())'"
stage tests 150 $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py -m "not slow"
stage bench ${BENCH_LIMIT:-270} $PY scripts/benchmark.py --device "${BENCH_DEVICE:-cuda}" --dtype bfloat16 --models "$BENCH_MODELS" \
    --lengths "$BENCH_LENGTHS" --no-decode --isolation model --code-ref worktree --warmup 1 --min-steps 3 \
    --max-steps 5 --step-budget-s 6 --slow-step-s 8 --capped-steps 1 --timeout 100 \
    --note "${BENCH_NOTE:-gpu_checks.sh}" --output "$OUT/benchmark_gpu.json"
stage fsdp 100 env TITANS_RANK_LOG_DIR="$OUT" torchrun --nproc_per_node 1 scripts/train.py --output_dir /tmp/titans-fsdp \
    --fsdp --bf16 --max_steps 12 --logging_steps 4 --eval_strategy no \
    --stdlib_max_bytes 1000000 --block_size 256 --per_device_train_batch_size 8 --max_new_tokens 0 \
    --check_reload false --save_strategy no --report_to none --max_eval_samples 16
stage compile 120 $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py -m slow
ls -la "$OUT"
