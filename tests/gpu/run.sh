#!/bin/bash
# tests/gpu/run.sh - every GPU test and benchmark of the CUDA backend in one go, for a
# few minutes on a GPU machine. Builds what it needs (CUDA backend, pdctl, the GPU
# programs; the service only if its libraries are there), then runs:
#   1. test_cuda_ops       every CUDA op against a reference (stated error bounds)
#   1c. test_cuda_graphs   decode passes replayed as CUDA graphs, bit for bit
#   1d. test_cuda_xfer     PD-SUM64 on the device; CUDA IPC between two processes
#   1f. test_cuda_attn_stage the decode attention variants (REGS, VSTAGE) bit for bit
#   1e. test_cluster_gpu.py (service built) golden ids through router + GPU workers
#                          over ucx (pinned host copies) and cuda-ipc
#   2. test_golden_gpu.py  golden ids on --device cuda alone, batched, speculative;
#                          BF16 against F32 agreement on mkmodel 110M; then the
#                          golden checks again with --cuda-graphs
#   3. bench_cuda          copy bandwidth, matvec (each matrix, and the whole model's
#                          reads in launch order: separate or multi launches, op by
#                          op or as one CUDA graph), paged attention (both decode
#                          variants), prefill GEMMs
#   4. end to end          decode tokens/s of mkmodel 1B (F32 file, BF16 on the GPU)
#                          at 1, 8, 64 and 256 sequences, without and with
#                          --cuda-graphs (the same ids); sampled decode at 256
#                          sequences with --sample-threads 1 and the default pool
#                          (the same ids); prefill tokens/s of a 1900-token
#                          prompt, cold (a new process) and warm
#   5. bench/torch_peer.py the same shapes in PyTorch eager (if torch is there)
# and writes REPORT (default build-gpu/report/report.md) with every figure and each
# step's status. Exit status: 0 when every check passed.
# usage: tests/gpu/run.sh [REPORT_DIR]   env: PD_SHARED_DIR (default ../shared),
#        PD_GPU_QUICK=1 (fewer repetitions), PD_CUDA_ARCHS (default: this GPU's),
#        PD_GPU_STEPS=1d,1e,2b (only those steps after the build; default all)
set -u
SRC=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$SRC/build-gpu/report}
BUILD=${PD_GPU_BUILD:-$SRC/build-gpu}
export PD_SHARED_DIR=${PD_SHARED_DIR:-$SRC/../shared}
mkdir -p "$OUT"
REPORT=${PD_GPU_REPORT:-$OUT/report.md}
STATUS=0
step() { echo "== $*" | tee -a "$REPORT"; }
# run_test LABEL LOG SECONDS CMD...: CMD, time-bounded, into $OUT/LOG; the report gets
# its last line, or on a failure its error lines
run_test() {
    local label=$1 log=$OUT/$2 secs=$3
    shift 3
    if timeout "$secs" "$@" > "$log" 2>&1; then
        tail -1 "$log" | tee -a "$REPORT"
    else
        fail "$label (status $?)"
        grep -E "^FAIL|ERROR|WARN|[Ee]rror" "$log" | head -20 | tee -a "$REPORT"
    fi
}
# PD_GPU_STEPS=1d,1e,2b (say): only those steps after the build (default: all)
want() { [ -z "${PD_GPU_STEPS:-}" ] || [[ ",$PD_GPU_STEPS," == *",$1,"* ]]; }
fail() { echo "FAILED: $*" | tee -a "$REPORT"; STATUS=1; }
: > "$REPORT"
step "pdserve GPU report, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$SRC" rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader \
    2>&1 | tee -a "$REPORT"

# ---- build ----
ARCH=${PD_CUDA_ARCHS:-}
if [ -z "$ARCH" ]; then
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
    case "$cc" in
        90) ARCH=90a ;;
        "") ARCH="80;90a" ;;
        *) ARCH=$cc ;;
    esac
fi
SERVICE=OFF
pkg-config --exists libzmq ucx libuv libprotobuf-c 2>/dev/null && SERVICE=ON
step "build (CUDA archs $ARCH, service $SERVICE)"
t0=$(date +%s)
if ! { cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPD_CUDA=ON -DPD_WERROR=OFF \
        -DPD_CUDA_ARCHS="$ARCH" -DPD_BUILD_TESTS=OFF -DPD_BUILD_SERVICE=$SERVICE \
        > "$OUT/build.log" 2>&1 &&
       cmake --build "$BUILD" -j"$(nproc)" --target pdctl test_cuda_ops test_cuda_handoff \
        test_cuda_graphs test_cuda_xfer test_cuda_attn_stage bench_cuda \
        $([ "$SERVICE" = ON ] && echo pd-router pd-prefill pd-decode) \
        >> "$OUT/build.log" 2>&1; }; then
    tail -40 "$OUT/build.log" | tee -a "$REPORT"
    fail "build"
    exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s" | tee -a "$REPORT"
BIN=$BUILD/bin
export PD_BIN_DIR=$BIN
QUICK=${PD_GPU_QUICK:-0}
q=""
[ "$QUICK" = 1 ] && q=--quick
MODEL_DIR=$BUILD/models # generated models (mkmodel), kept between runs
mkdir -p "$MODEL_DIR"

# ---- 1. ops ----
if want 1; then
step "1. test_cuda_ops"
run_test test_cuda_ops ops.log 300 "$BIN/test_cuda_ops"
grep -E "^(FAIL|ok)" "$OUT/ops.log" | sed 's/^/    /' >> "$REPORT"
fi

# ---- 1b. the KV handoff between two GPU engines ----
if want 1b; then
step "1b. test_cuda_handoff (prefill engine mirrored to host, decode engine staged)"
run_test test_cuda_handoff handoff.log 120 "$BIN/test_cuda_handoff" "$PD_SHARED_DIR"
fi

# ---- 1c. CUDA graphs against the same passes op by op ----
if want 1c; then
step "1c. test_cuda_graphs (decode passes replayed as CUDA graphs, bit for bit)"
run_test test_cuda_graphs graphs.log 120 "$BIN/test_cuda_graphs" "$PD_SHARED_DIR"
grep -E "graphs on:" "$OUT/graphs.log" | sed 's/^/    /' | tee -a "$REPORT"
fi

# ---- 1d. the device KV transport ----
if want 1d; then
step "1d. test_cuda_xfer (PD-SUM64 on the device, CUDA IPC between two processes)"
run_test test_cuda_xfer xfer.log 120 "$BIN/test_cuda_xfer" "$PD_SHARED_DIR"
fi

# ---- 1f. the decode attention variants ----
if want 1f; then
step "1f. test_cuda_attn_stage (decode attention REGS and VSTAGE, bit for bit)"
run_test test_cuda_attn_stage attn_stage.log 120 "$BIN/test_cuda_attn_stage"
fi

# ---- 1e. the cluster on the GPU (needs the service's libraries) ----
if want 1e; then
step "1e. test_cluster_gpu.py (router + GPU workers, ucx and cuda-ipc)"
if [ "$SERVICE" != ON ]; then
    fail "no ZeroMQ/UCX/libuv/protobuf-c here: the GPU cluster was not run"
else
    run_test test_cluster_gpu.py cluster.log 600 python3 "$SRC/tests/gpu/test_cluster_gpu.py"
fi
fi

# ---- 2. golden and BF16 ----
if want 2; then
step "2. golden ids on --device cuda; BF16 against F32"
run_test test_golden_gpu.py golden.log 600 \
    env MODEL_DIR="$MODEL_DIR" python3 "$SRC/tests/gpu/test_golden_gpu.py"
grep BF16_REPORT "$OUT/golden.log" | tee -a "$REPORT"
fi

# ---- 2b. golden with graphs ----
if want 2b; then
step "2b. golden ids on --device cuda with --cuda-graphs"
run_test "test_golden_gpu.py with --cuda-graphs" golden_graphs.log 600 \
    env PD_TEST_CUDA_GRAPHS=1 MODEL_DIR="$MODEL_DIR" python3 "$SRC/tests/gpu/test_golden_gpu.py"
fi

# ---- 4. end to end: mkmodel 1B, BF16 on the GPU ----
if want 4; then
step "4. pdctl generate, mkmodel 1B (F32 file, --weight-dtype bf16, KV f16)"
M1B=$MODEL_DIR/m1b-f32.gguf
[ -f "$M1B" ] || "$BIN/pdctl" mkmodel --preset 1B --dtype f32 --ctx 4096 -o "$M1B" \
    > /dev/null 2>> "$OUT/e2e.err"
python3 - "$BIN/pdctl" "$M1B" "$OUT" "$QUICK" <<'EOF' 2>> "$OUT/e2e.err" | tee -a "$REPORT"
import json, subprocess, sys
pdctl, model, out, quick = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
common = ["--model", model, "--device", "cuda", "--weight-dtype", "bf16", "--kv-dtype",
          "f16", "--ignore-eos", "--temperature", "0", "--format", "json"]
res = {}
rc = 0
words = "the cat sat on a mat and looked at the sun while a dog ran by".split()
for n in (1, 8, 64, 256):
    path = f"{out}/decode{n}.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            p = " ".join(words[(i + j) % len(words)] for j in range(12))
            fh.write(json.dumps({"prompt": p, "max_tokens": 32 if quick else 128}) + "\n")
    ids = {}
    for graphs in (False, True):
        key = f"decode_{n}" + ("_graphs" if graphs else "")
        p = subprocess.run([pdctl, "generate", *common, "--prompts", path, "--parallel",
                            str(n), "--arrival-steps", "0", "--kv-memory", "8GiB", "--batch",
                            "2048", *(["--cuda-graphs"] if graphs else [])],
                           capture_output=True, timeout=300)
        rows = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
        s = [r["summary"] for r in rows if "summary" in r]
        if p.returncode or not s:
            print(f"{key}: failed rc {p.returncode}: {p.stderr.decode()[-500:]}")
            continue
        s = s[0]
        ids[graphs] = {r["index"]: r["ids"] for r in rows if "index" in r}
        res[key] = {"gen_tokens": s["gen_tokens"], "wall_s": s["wall_s"],
                    "tokens_per_s": s["gen_tokens_per_s"],
                    "steps_per_s": s["decode_steps"] / s["wall_s"]}
    if len(ids) == 2 and ids[False] != ids[True]:
        print(f"FAILED: decode {n}: the ids with --cuda-graphs differ from those without")
        rc = 3
    a, b = res.get(f"decode_{n}"), res.get(f"decode_{n}_graphs")
    if a and b:
        print(f"decode {n:3d} sequences: {a['tokens_per_s']:9.1f} tokens/s op by op, "
              f"{b['tokens_per_s']:9.1f} with --cuda-graphs "
              f"({b['tokens_per_s'] / a['tokens_per_s']:.2f}x)", flush=True)
# sampled decode: every logit row crosses to the host and each sequence draws there,
# on the engine thread alone (--sample-threads 1) or the default pool: the same ids
n = 256
path = f"{out}/sampled{n}.jsonl"
with open(path, "w") as fh:
    for i in range(n):
        p = " ".join(words[(i + j) % len(words)] for j in range(12))
        fh.write(json.dumps({"prompt": p, "max_tokens": 32 if quick else 128,
                             "temperature": 0.8, "top_p": 0.95, "seed": 100 + i}) + "\n")
ids = {}
for st in ("1", "0"):
    key = f"sampled_{n}_threads_{st}"
    p = subprocess.run([pdctl, "generate", *common, "--prompts", path, "--parallel", str(n),
                        "--arrival-steps", "0", "--kv-memory", "8GiB", "--batch", "2048",
                        "--sample-threads", st], capture_output=True, timeout=300)
    rows = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
    s = [r["summary"] for r in rows if "summary" in r]
    if p.returncode or not s:
        print(f"{key}: failed rc {p.returncode}: {p.stderr.decode()[-500:]}")
        rc = 3
        continue
    s = s[0]
    ids[st] = {r["index"]: r["ids"] for r in rows if "index" in r}
    res[key] = {"tokens_per_s": s["gen_tokens_per_s"], "sample_threads": s["sample_threads"],
                "sample_ms_per_step": 1e3 * s["sample_s"] / max(1, s["decode_steps"]),
                "forward_ms_per_step": 1e3 * s["forward_s"] / max(1, s["decode_steps"])}
    r = res[key]
    print(f"sampled decode {n} sequences, {r['sample_threads']} sampling threads: "
          f"{r['tokens_per_s']:9.1f} tokens/s, {r['sample_ms_per_step']:.2f} ms/step "
          f"drawing, {r['forward_ms_per_step']:.2f} ms/step forward", flush=True)
if len(ids) == 2 and ids["1"] != ids["0"]:
    print(f"FAILED: sampled decode {n}: the ids depend on --sample-threads")
    rc = 3
prompt = " ".join(words[j % len(words)] for j in range(1900))
for rep in range(3):
    p = subprocess.run([pdctl, "generate", *common, "--prompt", prompt, "--max-tokens", "1",
                        "--batch", "4096", "--ctx", "4096"], capture_output=True,
                       timeout=300)
    if p.returncode:
        print(f"prefill failed: {p.stderr.decode()[-500:]}")
        break
    j = json.loads(p.stdout)
    res.setdefault("prefill", []).append(
        {"prompt_tokens": len(j["prompt_ids"]),
         "tokens_per_s": j["timings"]["prompt_tokens_per_s"],
         "load_ms": j["timings"]["load_ms"]})
# warm: three different prompts of 1900 tokens one after another in one process (no
# prefix shared: each starts on another word); the second and third are warm prefills
path = f"{out}/prefill_warm.jsonl"
with open(path, "w") as fh:
    for i in range(3):
        p = " ".join(words[(i + j) % len(words)] for j in range(1900))
        fh.write(json.dumps({"prompt": p, "max_tokens": 1}) + "\n")
p = subprocess.run([pdctl, "generate", *common, "--prompts", path, "--parallel", "1",
                    "--batch", "4096", "--ctx", "4096", "--kv-memory", "8GiB"],
                   capture_output=True, timeout=300)
rows = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
warm = [len(r["prompt_ids"]) / (r["timings"]["first_token_ms"] / 1e3)
        for r in rows if r.get("index", 0) >= 1 and "timings" in r]
if p.returncode or len(warm) != 2:
    print(f"warm prefill failed rc {p.returncode}: {p.stderr.decode()[-500:]}")
else:
    res["prefill_warm_tokens_per_s"] = warm
    n_tok = len(rows[1]["prompt_ids"])
    print(f"prefill {n_tok} tokens: {warm[0]:.0f} and {warm[1]:.0f} tokens/s warm, "
          f"{res['prefill'][0]['tokens_per_s']:.0f} cold", flush=True)
print(json.dumps(res, indent=1))
sys.exit(rc)
EOF
[ "${PIPESTATUS[0]}" = 0 ] || fail "end to end (--cuda-graphs or --sample-threads changed the ids, or the script failed)"
fi

# ---- 3. kernel benchmarks ----
if want 3; then
step "3. bench_cuda"
if timeout 300 "$BIN/bench_cuda" $q > "$OUT/bench_cuda.json" 2> "$OUT/bench_cuda.err"; then
    cat "$OUT/bench_cuda.json" | tee -a "$REPORT"
else
    fail "bench_cuda"
    tail -20 "$OUT/bench_cuda.err" | tee -a "$REPORT"
fi
fi

# ---- 5. the PyTorch peer ----
if want 5; then
step "5. PyTorch eager, the same shapes"
if python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
    timeout 400 python3 "$SRC/bench/torch_peer.py" ${q:+--quick} > "$OUT/torch.json" \
        2> "$OUT/torch.err" && cat "$OUT/torch.json" | tee -a "$REPORT" ||
        { fail "torch_peer.py"; tail -20 "$OUT/torch.err" | tee -a "$REPORT"; }
else
    echo "no PyTorch with CUDA here: peer not measured" | tee -a "$REPORT"
fi
fi

step "done: status $STATUS"
exit $STATUS
