#!/usr/bin/env bash
# Every CUDA path of anndist on a real GPU, once, in under 8 minutes; prints one summary table.
#
#   bash tests/gpu/run.sh            (from any directory; on a machine with an NVIDIA GPU and Python >= 3.10)
#
# Phases, each under its own time limit: install (a venv with torch==2.13.0, PyPI's CUDA build on
# Linux x86_64, and anndist[test]), the tests marked cuda (tests/gpu/test_cuda.py), the benchmark
# (tests/gpu/bench_gpu.py). A Python that already imports a CUDA torch and pytest can be used instead
# of installing: ANNDIST_GPU_PYTHON=/path/to/python (for a machine without network access).
# Logs and the table go to $OUT when it is set (the device tool brings $OUT back), else to ./gpu-run/.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
BUDGET=${ANNDIST_GPU_BUDGET:-470}          # seconds for the whole script, under 8 minutes
DEST=${OUT:-$PWD/gpu-run}
mkdir -p "$DEST"
PHASES="$DEST/phases.txt"; : > "$PHASES"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

left() { echo $(( BUDGET - (SECONDS - START) )); }
phase() {  # phase NAME LIMIT COMMAND...: run with a time limit, log, record exit code and seconds
    local name=$1 limit=$2; shift 2
    local rest; rest=$(left)
    (( limit > rest )) && limit=$rest
    if (( limit < 20 )); then echo "$name skipped 0" >> "$PHASES"; echo "== $name: no time left"; return 1; fi
    echo "== $name (limit ${limit} s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > >(tee "$DEST/$name.log") 2>&1
    local code=$?
    echo "$name $code $(( SECONDS - t0 ))" >> "$PHASES"
    return $code
}

# ------------------------------------------------------------------ install
if [[ -n "${ANNDIST_GPU_PYTHON:-}" ]]; then
    PY=$ANNDIST_GPU_PYTHON
    echo "install skipped 0" >> "$PHASES"
else
    VENV=${ANNDIST_GPU_VENV:-$PWD/.venv-gpu}
    install() {
        set -e
        [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q torch==2.13.0
        "$VENV/bin/python" -m pip install -q -e '.[test]'
    }
    export -f install; export VENV
    phase install 220 bash -c install
    PY=$VENV/bin/python
fi

# ------------------------------------------------------------------ the machine
nvidia-smi 2>&1 | tee "$DEST/nvidia-smi.txt" || echo "nvidia-smi not found"
"$PY" - > "$DEST/info.json" <<'PY' || echo '{}' > "$DEST/info.json"
import json, platform, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
if torch.cuda.is_available():
    info["gpus"] = torch.cuda.device_count()
    info["gpu"] = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}))
    info["bf16"] = torch.cuda.is_bf16_supported()
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:
        info["nccl"] = f"unknown ({exc})"
else:
    info["gpu"] = "NONE: torch.cuda.is_available() is False"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
except Exception:
    pass
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except Exception:
    pass
print(json.dumps(info))
PY
cat "$DEST/info.json"; echo

# ------------------------------------------------------------------ tests, then benchmark
phase tests 200 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --timeout 150 \
    --junitxml "$DEST/junit.xml" tests/gpu/test_cuda.py
phase bench 120 "$PY" tests/gpu/bench_gpu.py --device cuda:0 --reps 5 --json "$DEST/bench.json"

"$PY" tests/gpu/summary.py --junit "$DEST/junit.xml" --bench "$DEST/bench.json" --info "$DEST/info.json" \
    --phases "$PHASES" | tee "$DEST/gpu-summary.txt"
echo "total $(( SECONDS - START )) s; logs in $DEST"
