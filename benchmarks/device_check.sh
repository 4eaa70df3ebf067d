#!/usr/bin/env bash
# The GPU checks as one short command on a CUDA machine (about 5-6 min on an H100/H200):
#   1. benchmarks/gpu_extract.py: ResNet-50 at 224 px, 20,000 tiles, device JPEG decode, against the bare encoder,
#      with the stored features checked against an fp32 CPU reference; once more decoding on the CPU (--cpu-decode);
#   2. benchmarks/finetune.py: a fine-tuning job's images/s against the bare forward + backward on the GPU;
#   3. the test files that exercise CUDA (nvJPEG decode, precision choice, extraction and fine-tuning with the
#      device left to `auto`, i.e. CUDA).
# Results in $OUT (default ./device-out): smi.txt, dmon.txt (utilisation each second), gpu_extract.json,
# finetune.json, pytest.txt, profile.txt (torch.profiler's op tables of one more extraction: where the loop's
# time goes), and the two benchmarks' stderr. Packages the machine lacks can travel as wheels in
# .whl/ (installed into /tmp/site first).
set -u
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
  --format=csv | tee "$OUT/smi.txt"
python3 -c "import torch, timm, torchvision, os; print('torch', torch.__version__, 'timm', timm.__version__,
'torchvision', torchvision.__version__, 'cpus', os.cpu_count())" | tee -a "$OUT/smi.txt"
nvidia-smi dmon -s u -d 1 > "$OUT/dmon.txt" 2>&1 &
dmon=$!
t0=$SECONDS
timeout "${GPU_EXTRACT_S:-240}" python3 benchmarks/gpu_extract.py --cpu-decode --profile "$OUT/profile.txt" "$@" \
  > "$OUT/gpu_extract.json" 2> "$OUT/gpu_extract.err"
echo "gpu_extract rc $? in $((SECONDS - t0)) s"
grep -v "Warning\|return _create" "$OUT/gpu_extract.err" | tail -n 15
t0=$SECONDS
# shellcheck disable=SC2086
timeout "${FINETUNE_S:-100}" python3 benchmarks/finetune.py ${FINETUNE_ARGS:---batch 64 --steps 12 --epochs 2 \
  --workers 8 --bare-steps 6} > "$OUT/finetune.json" 2> "$OUT/finetune.err"
echo "finetune rc $? in $((SECONDS - t0)) s"
grep -v "Warning\|return _create" "$OUT/finetune.err" | tail -n 15
kill "$dmon" 2>/dev/null
# One pytest process per test file or node (PYTEST_NODES, space-separated), each under its own time limit, so
# one slow or hanging test cannot take the others' tracebacks with it.
: > "$OUT/pytest.txt"
for node in ${PYTEST_NODES:-tests/test_jpeg_tiles.py tests/test_resample.py tests/test_precision.py tests/test_extract.py tests/test_finetune.py}; do
  t0=$SECONDS
  timeout "${PYTEST_S:-120}" python3 -m pytest -q -p no:cacheprovider --tb=short -W ignore "$node" > "$OUT/one.txt" 2>&1
  rc=$?
  { echo "=== $node rc $rc in $((SECONDS - t0)) s"; tail -n 40 "$OUT/one.txt"; } >> "$OUT/pytest.txt"
  echo "pytest $node rc $rc in $((SECONDS - t0)) s"
done
rm -f "$OUT/one.txt"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("gpu_extract.json", "finetune.json"):
    try:
        d = json.loads((out / name).read_text())
    except Exception as e:  # noqa: BLE001
        print(name, "unreadable:", e)
        continue
    if name == "gpu_extract.json":
        h = d["hefeat"]
        print("extract", h["tiles"], "tiles", h["precision"], "cl", h["channels_last"], "loop", h["loop_tiles_per_s"],
              "call", h["call_tiles_per_s"], "bare", d["bare_tiles_per_s"], "loop/bare", d["ratio_loop_over_bare"],
              "cached call/bare", d["ratio_cached_call_over_bare"], "rel err", h["rel_error_vs_fp32_reference"],
              "| cpu decode loop", d.get("hefeat_cpu_decode", {}).get("loop_tiles_per_s"))
        print("  precision:", h.get("precision_reason"))
        print("  timings:", h["timings"], "| decode per batch:", d.get("device_decode_per_batch"), "|", d.get("phases"))
    else:
        t = d.get("throughput", {})
        print("finetune", t.get("backbone"), t.get("precision"), "train", t.get("train_images_per_s"), "bare",
              t.get("bare_fwd_bwd_step_images_per_s"), "ratio", t.get("ratio_vs_fwd_bwd_step"), "gpu util",
              t.get("gpu_utilisation_percent"), "|", t.get("precision_reason"))
EOF
