#!/usr/bin/env bash
# One prepared run of everything issue 16 measures on a GPU (benchmarks/GPU.md says how to use it).
#
#   benchmarks/gpu_check.sh [--dry-run-cpu] WHEEL RESULTS_DIR [CHECKPOINT]
#
# WHEEL        onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl (its sha256 is checked)
# RESULTS_DIR  where the results go: at most 7 files (summary.md, results.json, parity.json,
#              placement.json, bench.json, log.txt, results.tar.gz), refreshed after every step
# CHECKPOINT   the trained digits checkpoint (default recipe); when missing, 3 epochs are trained here
# --dry-run-cpu  label the run as a rehearsal on a machine without a GPU (the CUDA provider is then
#              expected to fail; every step still runs, on the CPU provider) and use fewer timed calls
# Environment: GPU_CHECK_BUDGET (seconds, default 420), GPU_CHECK_MODE=dry-run-cpu, GPU_CHECK_ITERATIONS
#              (stn-bench timed calls per cell: 100, dry run 20), PYTHON (default python3)
#
# Every step has its own timeout, its time and exit status are recorded, and a failed step never
# stops the run (no `set -e`). The whole run is held to GPU_CHECK_BUDGET seconds (default 420);
# a step that would start after that is recorded as skipped. The summary is printed last.
set -u -o pipefail

MODE=${GPU_CHECK_MODE:-gpu} # GPU_CHECK_MODE=dry-run-cpu is the same as --dry-run-cpu
if [[ "${1:-}" == "--dry-run-cpu" ]]; then MODE=dry-run-cpu; shift; fi
if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: $0 [--dry-run-cpu] WHEEL RESULTS_DIR [CHECKPOINT]" >&2
    exit 2
fi
abspath() { [[ -z $1 || $1 == /* ]] && echo "$1" || echo "$PWD/$1"; } # the arguments are the caller's paths
WHEEL=$(abspath "$1")
RES=$(abspath "$2")
CKPT=$(abspath "${3:-}")
EXPECTED_SHA256=05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7
EXPECTED_VERSION=1.31.1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-420}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

T0=$(date +%s)
DEADLINE=$((T0 + BUDGET - 20)) # the last 20 s are kept for the summary
mkdir -p "$RES" || exit 2
RES=$(cd "$RES" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
MODELS=$WORK/models
mkdir -p "$MODELS" "$WORK/logs" "$WORK/bin"
LOG=$RES/log.txt
: >"$LOG"
GP="$REPO/benchmarks/gpu_parity.py"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1
NPROC=$(nproc 2>/dev/null || echo 2)
if [[ $MODE == dry-run-cpu ]]; then ITER=${GPU_CHECK_ITERATIONS:-20}; ROUNDS=2; else ITER=${GPU_CHECK_ITERATIONS:-100}; ROUNDS=5; fi

say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

# record NAME STATUS RC SECONDS NOTE: one line of steps.jsonl
record() {
    "$PY" -c 'import json, sys; n, s, rc, sec, note = sys.argv[1:6]
print(json.dumps({"name": n, "status": s, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": float(sec), "note": note}))' \
        "$@" >>"$WORK/steps.jsonl" 2>>"$LOG"
}

# refresh: summary.md, results.json and the JSON files in RESULTS_DIR, as they are now
refresh() {
    "$PY" "$GP" summarize "$WORK" --out "$RES" >/dev/null 2>>"$LOG"
    for f in parity.json placement.json bench.json; do
        [[ -f $WORK/$f ]] && cp "$WORK/$f" "$RES/$f"
    done
}

# step NAME LIMIT [--out FILE] [--ok "RC..."] CMD...: run CMD under `timeout`, log it, record it.
# Its stdout goes to FILE (or the log), stderr to the log. Returns CMD's exit status.
step() {
    local name=$1 limit=$2 out="" okrc="0"
    shift 2
    while [[ $# -gt 0 ]]; do
        case $1 in
            --out) out=$2; shift 2 ;;
            --ok) okrc=$2; shift 2 ;;
            *) break ;;
        esac
    done
    local slog=${STEP_LOG:-$LOG} left=$((DEADLINE - $(date +%s)))
    if ((left < 5)); then
        record "$name" skipped "" 0 "out of the ${BUDGET} s budget"
        say "$name: skipped (out of time)"
        return 124
    fi
    ((limit > left)) && limit=$left
    echo "== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*" >>"$slog"
    local t1 rc
    t1=$(date +%s.%N)
    if [[ -n $out ]]; then
        timeout --kill-after=10 "$limit" "$@" >"$out" 2>>"$slog"
    else
        timeout --kill-after=10 "$limit" "$@" >>"$slog" 2>&1
    fi
    rc=$?
    local sec status note=""
    sec=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [[ " $okrc " == *" $rc "* ]]; then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status=TIMEOUT
        note="killed after ${limit} s"
    else
        status=FAILED
        # the last line that names an error, else the last line with words in it
        note=$(grep -E '[A-Za-z]{3}' "$slog" | grep -v '^== \[' | grep -iE 'error|fail|refus|denied' | tail -n 1)
        [[ -z $note ]] && note=$(grep -E '[A-Za-z]{3}' "$slog" | grep -v '^== \[' | tail -n 1)
        note=$(echo "$note" | sed -E 's/\x1b\[[0-9;]*m//g; s/^[0-9-]+ [0-9:.]+ \[[A-Z]:onnxruntime:[^]]*\] //' | cut -c1-150 | tr -d '|')
    fi
    [[ $name == provider-* && $rc == 3 ]] && status=skipped && note="provider refused (see probes)"
    record "$name" "$status" "$rc" "$sec" "$note"
    echo "== [$name] rc=$rc $status ${sec}s" >>"$slog"
    say "$name: $status (rc $rc, ${sec} s)${note:+ - $note}"
    return $rc
}

# bg NAME LIMIT ARGS...: the same step in the background, logging to its own file (see join);
# at most JOBS at once (one per two cores: the exports are mostly single-threaded Python)
JOBS=${GPU_CHECK_JOBS:-$((NPROC / 2 > 0 ? NPROC / 2 : 1))}
BG_NAMES=()
bg() {
    local name=$1
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
    BG_NAMES+=("$name")
    # torch's CPU threads shared out between the jobs (six exports of 16 threads each would oversubscribe)
    (export OMP_NUM_THREADS=$((NPROC / JOBS > 0 ? NPROC / JOBS : 1)); STEP_LOG="$WORK/logs/$name.log" step "$@") &
}
join() {
    wait
    local n
    for n in "${BG_NAMES[@]}"; do cat "$WORK/logs/$n.log" >>"$LOG" 2>/dev/null; done
    BG_NAMES=()
}

say "gpu_check: mode $MODE, budget ${BUDGET} s, $NPROC cores ($JOBS parallel exports), work $WORK, results $RES"

# -- 1. the onnxruntime-gpu wheel: sha256, install into its own folder, shadow the CPU build -----
SITE=$WORK/ort-site
HAVE_WHEEL=0
if [[ -f $WHEEL ]] && echo "$EXPECTED_SHA256  $WHEEL" | sha256sum --check --status; then
    record wheel-sha256 ok 0 0 "$EXPECTED_SHA256"
    say "wheel-sha256: ok"
    if step install-ort 240 "$PY" -m pip install --no-deps --no-index --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$SITE" "$WHEEL"; then
        HAVE_WHEEL=1
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    got=$( [[ -f $WHEEL ]] && sha256sum "$WHEEL" | cut -d' ' -f1 || echo "no such file")
    record wheel-sha256 FAILED 1 0 "REFUSED $WHEEL: sha256 $got, expected $EXPECTED_SHA256; not installed, the CPU onnxruntime stays"
    say "wheel-sha256: REFUSED ($WHEEL: $got); going on with the onnxruntime already installed"
fi

# -- 2. does a node really run on CUDA? (plain; then with the nvidia-* pip libraries on LD_LIBRARY_PATH)
PROVIDER=cpu
NVLIBS=$("$PY" - <<'EOF' 2>>"$LOG"
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))):
        if d not in dirs and glob.glob(os.path.join(d, "*.so*")):
            dirs.append(d)
print(":".join(dirs))
EOF
)
LIBMODE=none
if step probe-ort 90 "$PY" "$GP" probe-ort --provider cuda --expect-version "$EXPECTED_VERSION" --json "$WORK/probe-ort.json"; then
    PROVIDER=cuda
elif [[ -n $NVLIBS ]]; then
    OLD_LD=${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH="$NVLIBS${OLD_LD:+:$OLD_LD}"
    if step probe-ort-ldpath 90 "$PY" "$GP" probe-ort --provider cuda --expect-version "$EXPECTED_VERSION" \
        --json "$WORK/probe-ort-ldpath.json"; then
        PROVIDER=cuda
        LIBMODE=ld_library_path
    else
        export LD_LIBRARY_PATH="$OLD_LD"
        [[ -z $OLD_LD ]] && unset LD_LIBRARY_PATH
        # for the record only: the CLIs below import neither (onnxruntime's preload_dlls looks for the
        # nvidia-* libraries beside its own folder, which is not site-packages after --target)
        step probe-ort-preload 90 "$PY" "$GP" probe-ort --provider cuda --preload --json "$WORK/probe-ort-preload.json"
        step probe-ort-torch-first 90 "$PY" "$GP" probe-ort --provider cuda --import-torch --json "$WORK/probe-ort-torch-first.json"
    fi
fi
if [[ $PROVIDER == cuda ]]; then
    say "CUDA provider works (libraries: $LIBMODE); the ONNX Runtime steps run on cuda"
else
    say "CUDA provider NOT working ($MODE); the ONNX Runtime steps run on the CPU provider"
fi

# -- 3. the project, editable, without touching the installed packages ----------------------------
step install-project 180 "$PY" -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
for n in stn-train stn-export stn-infer stn-bench; do
    if [[ -x $BIN/$n ]]; then
        ln -sf "$BIN/$n" "$WORK/bin/$n"
    else # no console script where pip put them: call the entry point through importlib.metadata
        printf '#!/bin/sh\nexec "%s" -c '\''import sys; from importlib.metadata import entry_points as e; n = sys.argv.pop(1); sys.argv[0] = n; sys.exit(next(iter(e(group="console_scripts", name=n))).load()())'\'' %s "$@"\n' \
            "$PY" "$n" >"$WORK/bin/$n"
        chmod +x "$WORK/bin/$n"
    fi
done
export PATH="$WORK/bin:$PATH"

# -- 4. the machine --------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi 30 --out "$WORK/nvidia-smi.txt" nvidia-smi -q
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader >"$WORK/gpu.csv" 2>>"$LOG"
else
    record nvidia-smi skipped "" 0 "no nvidia-smi on PATH"
fi
"$PY" -m pip freeze --disable-pip-version-check >"$WORK/pip-freeze.txt" 2>>"$LOG"
export MODE PROVIDER LIBMODE HAVE_WHEEL
step machine 90 --out "$WORK/machine.json" "$PY" - <<'EOF'
import json, os, platform
from pathlib import Path
info = {"mode": os.environ["MODE"], "provider": os.environ["PROVIDER"], "cuda_libraries": os.environ["LIBMODE"],
        "onnxruntime_gpu_wheel_installed": os.environ["HAVE_WHEEL"] == "1",
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", ""), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
try:
    cpu = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    info["cpu"] = cpu.split(":", 1)[1].strip()
except Exception:
    pass
import numpy, onnx
info.update(numpy=numpy.__version__, onnx=onnx.__version__)
try:
    import onnxscript
    info["onnxscript"] = onnxscript.__version__
except Exception as exc:
    info["onnxscript"] = repr(exc)
import onnxruntime as ort
info.update(onnxruntime=ort.__version__, onnxruntime_file=ort.__file__, onnxruntime_providers=ort.get_available_providers())
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            torch_cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}")
import stn_deploy
info["stn_deploy_file"] = stn_deploy.__file__
print(json.dumps(info, indent=1))
EOF
if [[ -s $WORK/gpu.csv ]]; then # the driver version comes from nvidia-smi
    "$PY" - "$WORK/machine.json" "$WORK/gpu.csv" <<'EOF' 2>>"$LOG"
import json, sys
path, csv = sys.argv[1:3]
info = json.load(open(path))
name, driver, mem, cc = [v.strip() for v in open(csv).readline().split(",")][:4]
info.update(gpu=name, driver=driver, gpu_memory=mem, compute_capability=cc)
json.dump(info, open(path, "w"), indent=1)
EOF
fi
refresh

# -- 5. the cuda-marked tests (TensorRT: the provider-tensorrt probe below) ---------------------------
# Only the files that hold such tests: the host has no dev extras (hypothesis), and a module that
# cannot be collected there would fail the step whatever the CUDA tests do.
mapfile -t CUDA_TEST_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
step pytest-cuda 150 "$PY" -m pytest -m cuda -rA -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml "$WORK/pytest-cuda.xml" "${CUDA_TEST_FILES[@]:-tests}"
refresh

# -- 6. the checkpoint, then the exports (in parallel) ----------------------------------------------
if [[ -n $CKPT && -f $CKPT ]]; then
    record checkpoint ok 0 0 "given: $CKPT"
else
    CKPT=$WORK/stn_digits.pt
    step train-3-epochs 180 --out "$WORK/train.json" stn-train --dataset digits --epochs 3 --output "$CKPT" --json --no-progress
fi
EXPORT=(--with-theta --with-warped --json -q)
bg export-ort 200 --out "$WORK/export-ort.json" stn-export "$CKPT" --target ort --no-optimize -o "$MODELS/stn.onnx" "${EXPORT[@]}"
bg export-cuda 200 --out "$WORK/export-cuda.json" stn-export "$CKPT" --target cuda --no-optimize -o "$MODELS/stn.cuda.onnx" "${EXPORT[@]}"
bg export-portable 200 --out "$WORK/export-portable.json" stn-export "$CKPT" --target portable --no-optimize -o "$MODELS/stn.portable.onnx" "${EXPORT[@]}"
bg export-ort-opt 200 --out "$WORK/export-ort-opt.json" stn-export "$CKPT" --target ort --optimize -o "$MODELS/stn.opt.onnx" "${EXPORT[@]}"
bg export-cuda-opt 200 --out "$WORK/export-cuda-opt.json" stn-export "$CKPT" --target cuda --optimize -o "$MODELS/stn.cuda.opt.onnx" "${EXPORT[@]}"
bg export-portable-opt 200 --out "$WORK/export-portable-opt.json" stn-export "$CKPT" --target portable --optimize -o "$MODELS/stn.portable.opt.onnx" "${EXPORT[@]}"
join
refresh
# fp16 variants, derived from the fp32 files (stn-export checks them on CUDA where it runs)
for pair in cuda:stn.cuda cuda-opt:stn.cuda.opt ort:stn; do
    tag=${pair%%:*} m=${pair#*:}
    [[ -f $MODELS/$m.onnx ]] || continue
    bg "export-fp16-$tag" 200 --out "$WORK/export-fp16-$tag.json" stn-export "$MODELS/$m.onnx" --precision fp16 --json -q
done
join
refresh

# -- 7. placement and parity of every model on the provider; TensorRT and auto on their own ----------
# most telling first: parity.json is rewritten after each model, so a step cut short keeps those
ALL=()
for m in stn.cuda stn.cuda.fp16 stn stn.portable stn.cuda.opt stn.cuda.opt.fp16 stn.opt stn.portable.opt stn.fp16; do
    [[ -f $MODELS/$m.onnx ]] && ALL+=("$MODELS/$m.onnx")
done
if ((${#ALL[@]})); then
    step parity 150 "$PY" "$GP" check "${ALL[@]}" --checkpoint "$CKPT" --provider "$PROVIDER" \
        --json "$WORK/parity.json" --placement "$WORK/placement.json"
    refresh
    M=$MODELS/stn.cuda.onnx
    [[ -f $M ]] || M=${ALL[0]}
    step provider-tensorrt 90 --ok 0 "$PY" "$GP" probe-provider "$M" --provider tensorrt --json "$WORK/probe-tensorrt.json"
    step provider-auto 90 "$PY" "$GP" probe-provider "$M" --provider auto --json "$WORK/probe-auto.json"
else
    record parity "$( (($(date +%s) < DEADLINE)) && echo FAILED || echo skipped)" "" 0 "no model was exported"
fi
refresh

# -- 8. stn-infer --strict-placement on 200 sample images -------------------------------------------
step samples 90 "$PY" -m stn_deploy.train.samples --dataset digits --count 200 --no-progress "$WORK/samples"
for pair in cuda:stn.cuda ort:stn; do
    tag=${pair%%:*} m=${pair#*:}
    [[ -f $MODELS/$m.onnx ]] || continue
    step "infer-$tag" 90 --out "$WORK/infer-$tag.json" stn-infer "$WORK/samples" --model "$MODELS/$m.onnx" \
        --provider "$PROVIDER" --strict-placement --output "$WORK/predictions-$tag.csv" --json --no-progress
done
refresh

# -- 9. stn-bench: PyTorch eager CUDA, ORT CUDA fp32 and fp16 (IO binding), batch 1..1024 -------------
BM=$MODELS/stn.cuda.opt.onnx
[[ -f $BM ]] || BM=$MODELS/stn.cuda.onnx
B16=${BM%.onnx}.fp16.onnx
BACKENDS=pytorch-eager-cuda,ort-cuda-fp32,ort-cuda-tf32
[[ -f $B16 ]] && BACKENDS+=,ort-cuda-fp16
[[ $PROVIDER == cpu ]] && BACKENDS+=,ort-cpu-fp32
if [[ -f $BM ]]; then
    FP16=()
    [[ -f $B16 ]] && FP16=(--fp16-model "$B16")
    step bench 240 --out "$WORK/bench.json" stn-bench --model "$BM" --checkpoint "$CKPT" "${FP16[@]}" \
        --backends "$BACKENDS" --batch-sizes 1,8,64,256,1024 --threads "$NPROC" --warmup 5 \
        --iterations "$ITER" --rounds "$ROUNDS" --settle-ms 20 --rewarm-ms 50 --inputs auto --json --quiet
else
    record bench "$( (($(date +%s) < DEADLINE)) && echo FAILED || echo skipped)" "" 0 "no cuda-target model to benchmark"
fi

# -- 10. results ----------------------------------------------------------------------------------------
refresh
tar -C "$WORK" --exclude=./models --exclude=./samples --exclude=./ort-site --exclude=./bin --exclude='*.pt' --exclude='*.onnx' \
    -czf "$RES/results.tar.gz" . 2>>"$LOG"
# log.txt must stay under the 16 MiB a returned file may have
if (($(stat -c %s "$LOG") > 15000000)); then tail -c 15000000 "$LOG" >"$LOG.tmp" && mv "$LOG.tmp" "$LOG"; fi
say "done in $(($(date +%s) - T0)) s; results in $RES: $(cd "$RES" && echo *)"
echo
cat "$RES/summary.md"
grep -q '"status": "\(FAILED\|TIMEOUT\)"' "$WORK/steps.jsonl" && exit 1
exit 0
