#!/usr/bin/env bash
# The GPU suite, for a machine without network, run from the repository root there: installs
# the carried wheels, then runs the named stages in order, each under its own time limit,
# logging to <stage>.log, and prints the key lines of every log last. The logs (and
# results.jsonl) come back as $OUT/logs.tgz, re-packed after every stage (the device tool
# returns at most 8 files).
#
#   GPU_DIR=.carry OUT=/tmp/out bash benches/gpu_suite.sh env:60 tests:240 offline:150 ...
#
# $GPU_DIR (default .carry, ignored by git; made by `bash benches/gpu_carry.sh`) holds whl/
# (dependency wheels), srtwhl/ (the srt abi3 wheel; its native module is used, the checkout's
# Python files overlay the wheel's) and fi.tar.xz (a slimmed flashinfer-python tree whose
# data/aot holds the kernels benches/gpu_prebuild.py compiled here, so nothing is JIT-compiled
# there unless a module is missing; `env` and the end of `tests` say which were). Stages:
#   env       nvidia-smi, versions, imports, which FlashInfer kernels are prebuilt
#   tests     pytest tests/test_gpu.py tests/test_attention_backends.py
#   families  the model families' FlashInfer agreement (sliding windows, soft-caps: FlashInfer
#             modules of their own, JIT-compiled there unless prebuilt)
#   profile   benches/profile_scheduler.py: host vs device time of a decode step at batch 1
#             and 256, and the step with overlap scheduling
#   onebatch  python -m srt.bench one-batch, Llama-3.1-8B shape, bs 1 8 32 128, in 512, out 256
#   offline   python -m srt.bench offline, 1000 x 256 in / 256 out, all at once
#   offline_nooverlap  the same with --disable-overlap-schedule
#   offline_bs512  the same with 1024 running requests and decode CUDA graphs up to 512
#   serving   python -m srt serve + python -m srt.bench serving, same dataset, rate inf
set -uo pipefail
GPU_DIR=$(realpath "${GPU_DIR:-.carry}")
OUT=${OUT:-/tmp/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}
SRC=$(realpath "${SRC:-$PWD}")
SITE=/tmp/site
MODEL=/tmp/llama8b
PY=python3
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT" "$LOGS"
T0=$(date +%s)
stamp() { echo "[suite +$(($(date +%s) - T0))s] $*"; }

setup() {
    if [ -f $SITE/.srt-suite-setup ]; then  # an earlier run on this machine
        export PYTHONPATH=$SITE
        return
    fi
    stamp setup
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE "$GPU_DIR"/whl/*.whl "$GPU_DIR"/srtwhl/*.whl || exit 1
    tar -xJf "$GPU_DIR/fi.tar.xz" -C $SITE || exit 1
    # The checkout's Python files over the wheel's (the native module stays the wheel's).
    (cd "$SRC/python" && find srt -name '*.py' -o -name '*.pyi' -o -name '*.html' | tar -cf - -T -) |
        tar -xf - -C $SITE
    export PYTHONPATH=$SITE
    touch $SITE/.srt-suite-setup
    stamp "setup done"
}

# FlashInfer modules compiled on this machine (not found among the carried AOT kernels).
jit_built() {
    ls -d ~/.cache/flashinfer/*/*/cached_ops/*/ 2>/dev/null | xargs -r -n1 basename
}

stage_env() {
    nvidia-smi
    $PY - <<'EOF'
import sys, time
t = time.time()
import torch, flashinfer, fastapi, zmq, msgspec, uvicorn, pydantic
import srt, srt._native
from srt.layers.attention import resolve_attention_backend
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("flashinfer", flashinfer.__version__, "srt", srt.__file__, f"imports {time.time() - t:.1f}s")
print("auto backend:", resolve_attention_backend("auto", "cuda", torch.bfloat16))
from flashinfer.jit import env as jit_env
aot = sorted(p.name for p in jit_env.FLASHINFER_AOT_DIR.glob("*/*.so"))
print(f"prebuilt FlashInfer modules ({len(aot)}):", *aot, sep="\n  ")
t = time.time()
x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
flashinfer.rmsnorm(x, torch.ones(4096, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
print(f"first rmsnorm (loads the norm module): {time.time() - t:.1f}s")
EOF
    echo "JIT-compiled here: $(jit_built | tr '\n' ' ')"
}

# The test stages exit with pytest's code (the stage's rc in suite.log), not the echo's.
stage_tests() {
    (cd "$SRC" && $PY -m pytest -q -p no:cacheprovider -rs --durations=8 \
        tests/test_gpu.py tests/test_attention_backends.py)
    local rc=$?
    echo "JIT-compiled here: $(jit_built | tr '\n' ' ')"
    return $rc
}

stage_families() {
    (cd "$SRC" && $PY -m pytest -q -p no:cacheprovider -rs --durations=8 \
        tests/test_model_families.py::test_flashinfer_agrees_with_torch_native)
    local rc=$?
    echo "JIT-compiled here: $(jit_built | tr '\n' ' ')"
    return $rc
}

stage_profile() {
    model
    $PY "$SRC/benches/profile_scheduler.py" $COMMON --batch ${PROFILE_BS:-1 256} --input-len 256 \
        --steps 60 --overlap ${PROFILE_EXTRA:-}
}

model() {
    [ -f $MODEL/config.json ] || $PY "$SRC/benches/make_llama8b_dummy.py" $MODEL
}

COMMON="--model-path $MODEL --load-format dummy --dtype bfloat16"

stage_onebatch() {
    model
    $PY -m srt.bench one-batch $COMMON --batch-size ${ONEBATCH_BS:-1 8 32 128} --input-len 512 \
        --output-len 256 --mem-fraction-static 0.8 --disable-tqdm \
        --output-file "$LOGS/results.jsonl" ${ONEBATCH_EXTRA:-}
}

stage_offline() {
    model
    $PY -m srt.bench offline $COMMON --num-prompts 1000 --input-len 256 --output-len 256 \
        --range-ratio 1.0 --output-file "$LOGS/results.jsonl" ${OFFLINE_EXTRA:-}
}

stage_offline_nooverlap() {
    OFFLINE_EXTRA="${OFFLINE_EXTRA:-} --disable-overlap-schedule" stage_offline
}

stage_offline_bs512() {
    OFFLINE_EXTRA="${OFFLINE_EXTRA:-} --max-running-requests 1024 --cuda-graph-max-bs 512" stage_offline
}

stage_serving() {
    model
    $PY -m srt serve $COMMON --port 30000 ${SERVING_EXTRA:-} >"$LOGS/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do
        $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/health')" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 "$LOGS/server.log"; return 1; }
        sleep 1
    done
    $PY -m srt.bench serving --base-url http://127.0.0.1:30000 --tokenizer $MODEL \
        --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 1.0 \
        --request-rate inf --output-file "$LOGS/results.jsonl"
    local rc=$?
    kill $pid
    wait $pid
    return $rc
}

setup
export GPU_DIR OUT LOGS SRC SITE MODEL PY COMMON T0
export -f stamp jit_built model stage_env stage_tests stage_families stage_profile stage_onebatch stage_offline \
    stage_offline_nooverlap stage_offline_bs512 stage_serving
for stage in "$@"; do
    name=${stage%%:*}
    limit=${stage#*:}
    [ "$limit" = "$stage" ] && limit=600
    stamp "stage $name (limit ${limit}s)"
    timeout -k 10 "$limit" bash -c "stage_$name" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    stamp "stage $name rc=$rc" | tee -a "$LOGS/suite.log"
    tar -czf "$OUT/logs.tgz" -C "$LOGS" .
done
stamp done | tee -a "$LOGS/suite.log"
tar -czf "$OUT/logs.tgz" -C "$LOGS" .
echo "==== summary"
grep -h -E "^\[suite|passed|failed|error|Output token throughput|Total token throughput|^ +[0-9]+ +512|^batch [0-9]+:|JIT-compiled|first rmsnorm|Successful|Failed requests|Median (TTFT|TPOT)" \
    "$LOGS"/*.log 2>/dev/null | grep -v "^\[suite.*stage [a-z_]* (limit" | cut -c1-220
