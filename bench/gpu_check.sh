#!/usr/bin/env bash
# One-shot check of the GPU path on a machine with CUDA (one GPU, within about 8 minutes):
#   1. the tests marked gpu: AMP bf16/fp16 steps (loss and gradients against fp32 on one batch),
#      channels_last, a one-process NCCL group, test top-1 against the CPU's for the same weights,
#      hnd serve --device cuda against hnd edge, ONNX parity with the CUDA provider
#      (onnxruntime-gpu, installed by this script beside the CPU package);
#   2. bench/train_step.py --device cuda for the four paper teachers;
#   3. bench/input_pipeline.py (PIL, torchvision.io and CUDA JPEG decoding per worker).
# Prints one table at the end and exits non-zero if anything failed. Run from the repository
# root after ./run.sh has set up .venv (or with PY pointing at another Python):
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
status=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it with a time limit, log it, remember the outcome
    local name="$1" limit="$2" start rc
    shift 2
    start=$(date +%s)
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    status+=("$(printf '%-16s %-6s %4ss  %s' "$name" "$([ "$rc" = 0 ] && echo ok || echo FAIL:$rc)" \
        "$(( $(date +%s) - start ))" "$OUT/$name.log")")
    return 0
}

"$PY" -c 'import sys, torch; print(torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU"); sys.exit(not torch.cuda.is_available())' \
    || { echo "gpu_check: torch sees no CUDA device; nothing to check" >&2; exit 2; }

# onnxruntime's CUDA provider ships as onnxruntime-gpu, which cannot share a folder with the CPU
# package: installed into $OUT/ort-gpu and put first on the path of the GPU tests only.
timeout 120 "$PY" -m pip install --quiet --disable-pip-version-check --target "$OUT/ort-gpu" onnxruntime-gpu \
    >"$OUT/ort-gpu.log" 2>&1 || echo "gpu_check: onnxruntime-gpu did not install ($OUT/ort-gpu.log); its test skips"
step gpu-tests 300 env PYTHONPATH="$OUT/ort-gpu${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -m gpu tests/test_gpu.py -rs
step train-step 180 "$PY" bench/train_step.py --device cuda --amp bf16 --channels-last --json "$OUT/train_step.json"
step input-pipeline 90 "$PY" bench/input_pipeline.py --device cuda --images 128 --json "$OUT/input_pipeline.json"

echo
echo "== gpu_check summary"
printf '%s\n' "${status[@]}"
printf '%s\n' "${status[@]}" | grep -q FAIL && exit 1
exit 0
