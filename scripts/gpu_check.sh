#!/usr/bin/env bash
# GPU check for sharded training (issue 6), one call of a few minutes on a CUDA machine without network:
#   1. installs the package (and the DeepSpeed / hjson / pydantic wheels carried in .whl/, if any),
#   2. runs the CUDA tests (pytest -m cuda: inference parity, bf16 training loop, FSDP2 / ZeRO-3 smoke),
#   3. a short stage-2 run of a ~0.7 B random Parrot (CLIP ViT-L/14-336, ~1150 tokens with an image per
#      sample) in one process under the plain loop, FSDP2 and DeepSpeed ZeRO-3, printing tokens/s/GPU,
#      MFU and peak memory (scripts/bench_gpu_train.py states the FLOP formula),
#   4. (issue 17) ours vs transformers' LlavaForConditionalGeneration on the GPU (scripts/bench_peers.py, batch 1
#      and 8, bf16) and padding-free training vs padded (scripts/bench_train.py --backend cuda; flash-attention
#      varlen when flash_attn is installed; the CUDA packing test checks it against the padded batch).
# Each part has its own time limit and a failure does not stop the others; the whole stays under
# GPU_CHECK_BUDGET seconds (default 470). Everything is printed and copied to $OUT/gpu_check.log ($OUT if set).
#
#   bash scripts/gpu_check.sh          # on the GPU machine
#   bash scripts/gpu_check.sh --cpu    # dry run of the same steps on CPU (tiny model), e.g. before lending a GPU
#   bash scripts/gpu_check.sh --perf   # on the GPU machine: install, environment, packing test and part 4 only
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
PERF_ONLY=0
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
[[ "${1:-}" == "--perf" ]] && PERF_ONLY=1
BUDGET=${GPU_CHECK_BUDGET:-470}
LOGDIR=${OUT:-$(mktemp -d)}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
T0=$SECONDS
SUMMARY=()

if [[ $MODE == cpu ]]; then
    PY=${PYTHON:-.venv/bin/python}
    DEVICE=cpu; STEPS=3; SMALL=--small
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    PY=${PYTHON:-python3}
    DEVICE=cuda; STEPS=8; SMALL=
fi

# part NAME LIMIT CMD...: runs CMD with a time limit (cut to what is left of the budget), records its status
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - T0)))
    if ((left < 15)); then
        echo "=== $name: SKIPPED (time budget spent)"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== [$((SECONDS - T0)) s] $name (limit $limit s)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
    echo "=== [$((SECONDS - T0)) s] $name: $status"
    SUMMARY+=("$name: $status")
}

install_package() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || return 1
    fi
    if python3 -m pip install -q --no-build-isolation --no-deps -e . 2>/tmp/pip-e.err \
        || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>>/tmp/pip-e.err
    then
        return 0
    fi
    cat /tmp/pip-e.err
    echo "pip install -e . failed: falling back to a source tree on PYTHONPATH (/tmp/parrot-src)"
    rm -rf /tmp/parrot-src && mkdir -p /tmp/parrot-src/parrot
    for f in parrot_core/*; do ln -s "$PWD/$f" /tmp/parrot-src/parrot/; done
    for d in backends convert cli; do ln -s "$PWD/$d" "/tmp/parrot-src/parrot/$d"; done
    return 0
}

echo "gpu_check ($MODE) $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [[ $MODE == gpu ]]; then
    part "install" 120 bash -c "$(declare -f install_package); install_package"
    [[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    [[ -d /tmp/parrot-src ]] && export PYTHONPATH=/tmp/parrot-src${PYTHONPATH:+:$PYTHONPATH}
    part "environment" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY - <<'EOF'
import importlib.util, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpus', torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')
mods = ['parrot', 'transformers', 'deepspeed', 'tokenizers', 'safetensors', 'ml_dtypes', 'click', 'tqdm', 'PIL',
        'huggingface_hub', 'pytest', 'peft', 'bitsandbytes']
print('missing modules:', [m for m in mods if importlib.util.find_spec(m) is None] or 'none')
EOF"
fi

if ((PERF_ONLY)); then
    part "cuda packing test" 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_packing.py
else
part "cuda tests" 200 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_train_cuda.py \
    tests/test_packing.py

BENCH=$(mktemp -d)
part "bench: prepare model + data" 90 "$PY" scripts/bench_gpu_train.py prepare "$BENCH" $SMALL
for strategy in single fsdp zero3; do
    part "bench: $strategy" 120 "$PY" scripts/bench_gpu_train.py run "$BENCH" --strategy $strategy \
        --steps $STEPS --device $DEVICE
done
# issue 16: LoRA (PEFT) and QLoRA (--quantize 4: NF4 base through bitsandbytes, CUDA only) on the same model,
# the projector and MoE trained fully beside the adapters: tokens/s/GPU, MFU (frozen LLM: 4 x params) and peak memory
LORA_RUNS="lora qlora"
[[ $MODE == cpu ]] && LORA_RUNS="lora"
for strategy in $LORA_RUNS; do
    part "bench: $strategy" 120 "$PY" scripts/bench_gpu_train.py run "$BENCH" --strategy $strategy \
        --steps $STEPS --device $DEVICE
done
# inference on the same model (bf16): prompt/generation tokens/s, time to first token, peak memory
part "inference bench (batch 1)" 60 "$PY" -m parrot.cli.main bench --backend $DEVICE --model "$BENCH/model" \
    -p 512 -g 128 -n 3
part "inference bench (batch 8)" 60 "$PY" -m parrot.cli.main bench --backend $DEVICE --model "$BENCH/model" \
    -p 512 -g 128 -n 2 -b 8
rm -rf "$BENCH"
fi
# issue 17: ours vs transformers' LlavaForConditionalGeneration on the GPU (batch 1 and 8, bf16, same weights checked
# by greedy tokens in float32 first), and padding-free training vs padded (flash-attention varlen when installed)
if [[ $MODE == gpu ]]; then
    part "peers: ours vs transformers LLaVA (cuda, bf16)" 150 "$PY" scripts/bench_peers.py --only torch --device cuda \
        --torch-dtype bfloat16 --rounds 5 --new-tokens 64
    part "packing vs padded (cuda)" 120 "$PY" scripts/bench_train.py --backend cuda --steps 8 --rounds 2 \
        --hidden 1024 --layers 8 --batch-size 8
else
    part "peers: ours vs transformers LLaVA (cpu dry run)" 150 "$PY" scripts/bench_peers.py --only torch \
        --torch-hidden 128 --torch-layers 2 --rounds 1 --new-tokens 4
    part "packing vs padded (cpu dry run)" 120 "$PY" scripts/bench_train.py --backend cpu --steps 3 --rounds 1 \
        --hidden 128 --layers 2 --vocab 4096
fi

echo "=== summary ($((SECONDS - T0)) s)"
printf '  %s\n' "${SUMMARY[@]}"
"$PY" scripts/bench_gpu_train.py summary "$LOG" || true
echo "log: $LOG"
