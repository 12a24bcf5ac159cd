#!/usr/bin/env bash
# The GPU suite, for a machine without network: installs the carried wheels, then runs the named
# stages in order, each under its own time limit, logging to $OUT/<stage>.log.
#
#   GPU_DIR=.gpu OUT=/tmp/out bash benches/gpu_suite.sh env tests onebatch offline serving
#
# $GPU_DIR holds: whl/ (dependency wheels), srtwhl/ (the srt abi3 wheel), fi.tar.xz (a slimmed
# flashinfer-python tree), optionally ficache.tar.xz (FlashInfer's JIT cache from an earlier
# run; NOTE: restoring it did not stop the recompiles on a fresh machine, so give the first
# stage that builds a model ~4 minutes for FlashInfer's kernels) and src/ (python/, tests/, benches/, pyproject.toml of the checkout under test: its
# Python files overlay the wheel's). Stages:
#   env       nvidia-smi, versions, imports
#   tests     pytest tests/test_gpu.py tests/test_attention_backends.py (compiles FlashInfer's
#             kernels on first use); the JIT cache is then saved to $OUT/ficache.tar.xz
#   profile   benches/profile_scheduler.py: host vs device time of a batch-256 decode step, and
#             the step with overlap scheduling
#   onebatch  python -m srt.bench one-batch, Llama-3.1-8B shape, bs 1 8 32 128, in 512, out 256
#   offline   python -m srt.bench offline, 1000 x 256 in / 256 out, all at once
#   serving   python -m srt serve + python -m srt.bench serving, same dataset, rate inf
set -uo pipefail
GPU_DIR=$(realpath "${GPU_DIR:-.gpu}")
OUT=${OUT:-/tmp/gpu_out}
SRC=$GPU_DIR/src
SITE=/tmp/site
MODEL=/tmp/llama8b
PY=python3
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-16}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[suite +$(($(date +%s) - T0))s] $*"; }

setup() {
    stamp setup
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE "$GPU_DIR"/whl/*.whl "$GPU_DIR"/srtwhl/*.whl || exit 1
    tar -xJf "$GPU_DIR/fi.tar.xz" -C $SITE || exit 1
    # The checkout's Python files over the wheel's (the native module stays the wheel's).
    (cd "$SRC/python" && find srt -name '*.py' -o -name '*.pyi' | tar -cf - -T -) | tar -xf - -C $SITE
    if [ -f "$GPU_DIR/ficache.tar.xz" ]; then
        mkdir -p ~/.cache && tar -xJf "$GPU_DIR/ficache.tar.xz" -C ~/.cache && stamp "JIT cache restored"
    fi
    export PYTHONPATH=$SITE
    stamp "setup done"
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
EOF
}

stage_tests() {
    (cd "$SRC" && $PY -m pytest -q -p no:cacheprovider -rs --durations=8 \
        tests/test_attention_backends.py tests/test_gpu.py)
}

stage_profile() {
    model
    $PY "$SRC/benches/profile_scheduler.py" $COMMON --batch ${PROFILE_BS:-1 256} --input-len 256 \
        --steps 60 --mem-fraction-static 0.85 --overlap
}

model() {
    [ -f $MODEL/config.json ] || $PY "$SRC/benches/make_llama8b_dummy.py" $MODEL
}

COMMON="--model-path $MODEL --load-format dummy --dtype bfloat16"

stage_onebatch() {
    model
    $PY -m srt.bench one-batch $COMMON --batch-size ${ONEBATCH_BS:-1 8 32 128} --input-len 512 \
        --output-len 256 --mem-fraction-static 0.8 --disable-tqdm \
        --output-file "$OUT/results.jsonl" ${ONEBATCH_EXTRA:-}
}

stage_offline() {
    model
    $PY -m srt.bench offline $COMMON --num-prompts 1000 --input-len 256 --output-len 256 \
        --range-ratio 1.0 --output-file "$OUT/results.jsonl" ${OFFLINE_EXTRA:-}
}

stage_serving() {
    model
    $PY -m srt serve $COMMON --port 30000 ${SERVING_EXTRA:-} >"$OUT/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do
        $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/health')" 2>/dev/null && break
        kill -0 $pid 2>/dev/null || { echo "server died"; tail -30 "$OUT/server.log"; return 1; }
        sleep 1
    done
    $PY -m srt.bench serving --base-url http://127.0.0.1:30000 --tokenizer $MODEL \
        --num-prompts 1000 --input-len 256 --output-len 256 --range-ratio 1.0 \
        --request-rate inf --output-file "$OUT/results.jsonl"
    local rc=$?
    kill $pid
    wait $pid
    return $rc
}

setup
export GPU_DIR OUT SRC SITE MODEL PY COMMON T0
export -f stamp model stage_env stage_tests stage_profile stage_onebatch stage_offline stage_serving
for stage in "$@"; do
    name=${stage%%:*}
    limit=${stage#*:}
    [ "$limit" = "$stage" ] && limit=600
    stamp "stage $name (limit ${limit}s)"
    timeout -k 10 "$limit" bash -c "stage_$name" 2>&1 | tee "$OUT/$name.log"
    stamp "stage $name rc=${PIPESTATUS[0]}"
    if [ "$name" = tests ]; then  # even after a timeout: what compiled is kept
        tar -cJf "$OUT/ficache.tar.xz" -C ~/.cache flashinfer && ls -la "$OUT/ficache.tar.xz"
    fi
done
stamp done
