#!/usr/bin/env bash
# GPU checks in one short run (what results/benchmark_gpu*.json and the model card's GPU rows come from):
#   env       versions and the device name
#   tests     tests/test_gpu.py (CUDA vs the references: token recurrence, CPU, uncached generation, eager attention,
#             fp32)
#   tkernel   tests/test_triton_scan.py (the fused memory kernels vs the PyTorch scan, compiled for the GPU; several
#             kernel configurations, each compiled once: minutes)
#   triton    scripts/gpu_triton_check.py: the kernels at the anchor sizes (errors vs the PyTorch scan, timings), and
#             their times as the batch (program count) grows ($TRITON_SCALING)
#   triton4   (only when named) the same with 4 warps per program instead of 8 (half the spilled bytes per program)
#   tblock    (only when named) the same with the blocked depth-2 kernels (TITANS_MEMORY_KERNEL_BLOCK=$TBLOCK, default
#             32: (C, 32) tiles instead of (C, 128), under a third of the backward's spill traffic offline; products
#             $TBLOCK_PRECISION, default tf32x3; gates $TBLOCK_GATES: check, or model as at initialisation)
#   bench     scripts/benchmark.py on CUDA, bf16 autocast, batch 4: Titans vs memory-disabled vs Llama (sdpa) at 4k
#             and 32k, with TITANS_MEMORY_KERNEL=$BENCH_KERNEL (default torch: the PyTorch chunk loop, the baseline)
#   kernel    the same benchmark with TITANS_MEMORY_KERNEL=auto (fused kernels) and --titans-attn $KERNEL_ATTN
#   flex      the fused kernels again with --titans-attn flex_attention (block-sparse sliding window) for $FLEX_MODELS
#   large     (only when named) the kernel benchmark at a GPU-sized width ($LARGE_DIMS: hidden 1024, 16 attention and
#             16 memory heads, batch 8) for $LARGE_MODELS
#   tlarge    (only when named) `large`'s MAG at 4k with the blocked kernels (block $TBLOCK)
#   profile   torch.profiler tables (CUDA kernel time) of one bf16 training step at 4 x $PROFILE_LENGTH (default 4,096)
#             for $PROFILE_MODELS, Titans attention $PROFILE_ATTN (default sdpa; flex_attention for the block-sparse
#             window), at the anchor width or at $PROFILE_DIMS (e.g. PROFILE_DIMS="$LARGE_DIMS" for the large width)
#   chunkc    the same benchmark with TITANS_MEMORY_KERNEL=compile (each chunk through inductor: fewer, fused launches)
#   tcompile  (only when named) the kernel benchmark with every model through torch.compile(model) (--torch-compile):
#             inductor fuses the elementwise work around the memory scan, which stays one operator (the fused Triton
#             kernels), for $TCOMPILE_MODELS at $TCOMPILE_LENGTHS
#   cgraph    (only when named) `tcompile` at the anchor width with --torch-compile-mode reduce-overhead: each step
#             replayed as CUDA graphs (the step is one graph since 16fd9f8; 3 warm-up steps: compile, warm-up run,
#             recording), for $CGRAPH_MODELS at $CGRAPH_LENGTHS
#   fsdp      FSDP2 through Trainer (torchrun, --fsdp, --bf16) for a few steps
#   compile   the slow tests of tests/test_gpu.py (torch.compile / inductor on CUDA)
#   decode    (only when named) cached decoding at contexts 128 and 8192 with TITANS_MEMORY_KERNEL=compile (one
#             graph per steady step) for Titans, memory-disabled and Llama, batch 1, fp32
# Usage: OUT=/tmp/gpu bash scripts/gpu_checks.sh [stage ...]   (default: all but those named only when named, in the
# order above)
# DRY_RUN=1 prints the command of each named stage and runs none.
# Named stages run in the order named, so a short lease can put first what matters most. DEADLINE_S (seconds from
# the start) cuts each stage's limit to the time left and skips the stages that would get under 30 s.
# Each stage has its own time limit; a stage that fails or times out does not stop the others. The logs are packed
# into $OUT/logs.tgz at the end (the device tool returns at most 8 files); JSON results stay beside it.
# Machines without a package registry: put the pinned wheels the image lacks in .whl/ (on 2026-11-26 the H200 image
# had transformers 5.17 and no datasets: transformers==5.23.0 datasets==5.2.0 dill multiprocess regex, downloaded
# with `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`); they are installed to /tmp/site.
# The first use of the Triton kernels compiles them (about 20 s forward and 2 min backward on a slow CPU; cached
# in ~/.triton/cache for the stages after it).
set -u
OUT=${OUT:-/tmp/titans-gpu}
LOGS=$OUT/logs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
PY=${PYTHON:-python3}
STAGES=${*:-env tests tkernel triton bench kernel chunkc fsdp compile}
DEADLINE_S=${DEADLINE_S:-0}
BENCH_MODELS=${BENCH_MODELS:-llama,swa,mag,lmm,mal,mac}
KERNEL_MODELS=${KERNEL_MODELS:-llama,swa,mag,lmm}
BENCH_LENGTHS=${BENCH_LENGTHS:-4096,32768}
BENCH_ARGS=(--device "${BENCH_DEVICE:-cuda}" --dtype bfloat16 --lengths "$BENCH_LENGTHS" --no-decode --isolation model
    --code-ref worktree --warmup 1 --min-steps 3 --max-steps 5 --step-budget-s 6 --slow-step-s 8 --capped-steps 1
    --timeout 240 --plot none --flops)  # --flops: each point's FLOPs, achieved FLOP/s and each ratio's FLOP bound

declare -A STAGE_LIMIT STAGE_CMD
stage() {  # records a stage; they run below, in the order of $STAGES
    local name=$1
    STAGE_LIMIT[$name]=$2
    shift 2
    STAGE_CMD[$name]=$(printf '%q ' "$@")
}
run_stage() {
    local name=$1 limit=${STAGE_LIMIT[$1]}
    local start=$SECONDS
    if [ "$DEADLINE_S" -gt 0 ]; then
        local left=$((DEADLINE_S - SECONDS - 10))
        if [ "$left" -lt 30 ]; then echo "== $name skipped: ${left}s left before DEADLINE_S"; return; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name (limit ${limit}s)"
    eval "timeout --kill-after=5 $limit ${STAGE_CMD[$name]}" >"$LOGS/$name.log" 2>&1
    echo "== $name rc=$? in $((SECONDS - start))s"
    tail -n 12 "$LOGS/$name.log"
}

stage env 60 bash -c "nvidia-smi -L; $PY -c 'import torch, transformers, triton, accelerate, datasets;
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"triton\", triton.__version__,
      \"accelerate\", accelerate.__version__, \"datasets\", datasets.__version__, torch.cuda.get_device_name())'"
stage tests 400 $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py -m "not slow"
stage tkernel 400 $PY -m pytest -v -p no:cacheprovider tests/test_triton_scan.py
stage triton 400 $PY scripts/gpu_triton_check.py --lengths ${TRITON_LENGTHS:-4096 32768} \
    --scaling ${TRITON_SCALING:-4 8 16 32} --output "$OUT/triton_check.json"
# the same with 4 warps per program (TITANS_MEMORY_KERNEL_WARPS; compiles the kernels again), only when named
stage triton4 400 $PY scripts/gpu_triton_check.py --lengths ${TRITON_LENGTHS:-4096} --num-warps 4 \
    --scaling ${TRITON_SCALING:-4 8 16 32} --output "$OUT/triton_check_w4.json"
# the blocked kernels (compiled offline for sm_90: scripts/kernel_spills.py --block 32), only when named
stage tblock 400 $PY scripts/gpu_triton_check.py --lengths ${TRITON_LENGTHS:-4096 32768} --block "${TBLOCK:-32}" \
    --precision "${TBLOCK_PRECISION:-tf32x3}" --gates "${TBLOCK_GATES:-check}" --scaling ${TRITON_SCALING:-4 8 16 32} \
    --output "$OUT/triton_check_block.json"
stage bench ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL="${BENCH_KERNEL:-torch}" $PY scripts/benchmark.py "${BENCH_ARGS[@]}" --models "$BENCH_MODELS" \
    --note "${BENCH_NOTE:-gpu_checks.sh} memory kernel ${BENCH_KERNEL:-torch}" --output "$OUT/benchmark_gpu.json"
stage kernel ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto $PY scripts/benchmark.py "${BENCH_ARGS[@]}" \
    --models "$KERNEL_MODELS" --titans-attn "${KERNEL_ATTN:-sdpa}" \
    --note "${BENCH_NOTE:-gpu_checks.sh} fused memory kernels" --output "$OUT/benchmark_gpu_kernel.json"
stage flex ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto $PY scripts/benchmark.py "${BENCH_ARGS[@]}" \
    --models "${FLEX_MODELS:-swa,mag}" --titans-attn flex_attention \
    --note "${BENCH_NOTE:-gpu_checks.sh} fused memory kernels, flex attention" --output "$OUT/benchmark_gpu_flex.json"
# a GPU-sized model: the anchor width gives 16 (batch row, memory head) programs for 132 multiprocessors and Llama
# matmuls too small to load the GPU; this one gives 8 x 16 = 128 programs, with Llama of the same width beside it
read -r -a LARGE_DIMS <<<"${LARGE_DIMS:---hidden-size 1024 --num-heads 16 --intermediate-size 2816 --memory-heads 16 --batch 8}"
# without --flops: at this width its count (the PyTorch scan, at 32k too) took MAG past the stage's limit on an H200;
# the counts at this width are in results/benchmark_flops_gpu_sized.json
LARGE_ARGS=()
for a in "${BENCH_ARGS[@]}"; do [ "$a" = --flops ] || LARGE_ARGS+=("$a"); done
stage large ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto $PY scripts/benchmark.py "${LARGE_ARGS[@]}" "${LARGE_DIMS[@]}" \
    --models "${LARGE_MODELS:-llama,swa,mag,lmm}" \
    --note "${BENCH_NOTE:-gpu_checks.sh} fused memory kernels, GPU-sized model" --output "$OUT/benchmark_gpu_large.json"
# `large`'s MAG at 4k with the blocked kernels (TITANS_MEMORY_KERNEL_BLOCK=$TBLOCK), only when named
stage tlarge ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto TITANS_MEMORY_KERNEL_BLOCK="${TBLOCK:-32}" $PY \
    scripts/benchmark.py "${LARGE_ARGS[@]}" "${LARGE_DIMS[@]}" --models mag --lengths 4096 \
    --note "${BENCH_NOTE:-gpu_checks.sh} blocked kernels (block ${TBLOCK:-32}), GPU-sized model" \
    --output "$OUT/benchmark_gpu_large_block.json"
PROFILE_MODELS=${PROFILE_MODELS:-llama swa mag}
PROFILE_ARGS=()
for m in $PROFILE_MODELS; do PROFILE_ARGS+=(--profile "$m:${PROFILE_LENGTH:-4096}"); done
# PROFILE_DIMS="$LARGE_DIMS" profiles at the GPU-sized width of `large` (default: the anchor width)
read -r -a PROFILE_DIMS <<<"${PROFILE_DIMS:-}"
stage profile ${BENCH_LIMIT:-300} $PY scripts/benchmark.py --device "${BENCH_DEVICE:-cuda}" --dtype bfloat16 \
    --models "$(echo $PROFILE_MODELS | tr ' ' ,)" --no-train --no-decode "${PROFILE_ARGS[@]}" "${PROFILE_DIMS[@]}" \
    --profile-rows 30 --isolation model --code-ref worktree --timeout 240 --plot none --titans-attn "${PROFILE_ATTN:-sdpa}" \
    --note "${BENCH_NOTE:-gpu_checks.sh} profiles, ${PROFILE_ATTN:-sdpa}" --output "$OUT/benchmark_gpu_profile.json"
stage chunkc ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=compile $PY scripts/benchmark.py "${BENCH_ARGS[@]}" \
    --models "${CHUNKC_MODELS:-swa,mag,lmm}" --lengths "${CHUNKC_LENGTHS:-4096}" \
    --note "${BENCH_NOTE:-gpu_checks.sh} compiled chunks" --output "$OUT/benchmark_gpu_chunkc.json"
# (without --flops, as `large`: the count would run the step through the compiled model once more)
stage tcompile ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto $PY scripts/benchmark.py "${LARGE_ARGS[@]}" \
    --models "${TCOMPILE_MODELS:-llama,swa,mag}" --lengths "${TCOMPILE_LENGTHS:-4096}" --torch-compile \
    --note "${BENCH_NOTE:-gpu_checks.sh} torch.compile(model), fused memory kernels" --output "$OUT/benchmark_gpu_tcompile.json"
stage cgraph ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=auto $PY scripts/benchmark.py "${LARGE_ARGS[@]}" \
    --models "${CGRAPH_MODELS:-llama,swa,mag}" --lengths "${CGRAPH_LENGTHS:-4096}" --torch-compile \
    --torch-compile-mode reduce-overhead --warmup 3 \
    --note "${BENCH_NOTE:-gpu_checks.sh} torch.compile(model, mode='reduce-overhead'), fused memory kernels" \
    --output "$OUT/benchmark_gpu_cgraph.json"
stage fsdp 100 env TITANS_RANK_LOG_DIR="$LOGS" torchrun --nproc_per_node 1 scripts/train.py --output_dir /tmp/titans-fsdp \
    --fsdp --bf16 --max_steps 12 --logging_steps 4 --eval_strategy no \
    --stdlib_max_bytes 1000000 --block_size 256 --per_device_train_batch_size 8 --max_new_tokens 0 \
    --check_reload false --save_strategy no --report_to none --max_eval_samples 16
stage compile 150 $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py -m slow
stage decode ${BENCH_LIMIT:-300} env TITANS_MEMORY_KERNEL=compile $PY scripts/benchmark.py --device "${BENCH_DEVICE:-cuda}" \
    --models "${DECODE_MODELS:-mag,mac,swa,llama}" --no-train --decode-contexts 128,8192 --decode-repeats 2 \
    --isolation model --code-ref worktree --timeout 240 --plot none \
    --note "${BENCH_NOTE:-gpu_checks.sh} compiled decoding" --output "$OUT/benchmark_gpu_decode.json"
[ -n "${DRY_RUN:-}" ] && { for n in $STAGES; do echo "$n: ${STAGE_CMD[$n]}"; done; exit 0; }
mkdir -p "$LOGS"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # pinned wheels carried to a machine without a registry
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for name in $STAGES; do
    if [ -n "${STAGE_CMD[$name]+x}" ]; then run_stage "$name"; else echo "== $name: no such stage"; fi
done
tar czf "$OUT/logs.tgz" -C "$LOGS" . && rm -rf "$LOGS"
ls -la "$OUT"
