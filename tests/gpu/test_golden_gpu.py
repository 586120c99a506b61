"""On a GPU (run by tests/gpu/run.sh; CTest runs it on cudasim): every golden line
through `pdctl generate --device cuda` with F32 weights gives its exact greedy ids: alone
(whole prompt in one pass, and in chunks of 3), GGUF and llama2.c, then all lines of a
model batched (--prompts, 16 in flight, twice each, staggered), and batched with
speculative decoding (n-gram, and the llama2xs draft for stories260K). Then the BF16
report: `mkmodel` 110M (F32) greedy on the GPU in F32 and with --weight-dtype bf16;
the first tokens must agree on at least half the prompts, and the disagreement rate
(first token, and the mean position of the first difference) is printed as JSON for
the report. PD_BIN_DIR and PD_SHARED_DIR as for the CPU tests; MODEL_DIR (optional)
where to write the generated model. PD_TEST_CUDA_GRAPHS=1: every golden run (alone,
batched, speculative) with --cuda-graphs, which must not change a single id; the BF16
report is left out then. PD_TEST_BF16_PRESET: the mkmodel preset of the BF16 report
(default 110M; the cudasim run in CI uses 15M, as the CPU emulation is slow)."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from pdtest import MODELS, PDCTL, Failures, generate_json, golden_lines, pdctl, require  # noqa

f = Failures()
DEV = os.environ.get("PD_TEST_DEVICE", "cuda")
GRAPHS = os.environ.get("PD_TEST_CUDA_GRAPHS") == "1"
GOPT = ["--cuda-graphs"] if GRAPHS else []
TMP = tempfile.mkdtemp(prefix="pd_gpu_golden_")
lines = golden_lines()


def check_ids(what, g, ids):
    want = g["greedy_ids"][: g["exact_prefix"]]
    got = ids[: len(want)]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                      if a != b), 0)
        return f.check(False, f"{what}: ids differ from golden at position {first}")
    return f.check(len(ids) == len(g["greedy_ids"]), f"{what}: {len(ids)} ids")


def model_variants(g):
    stem = os.path.splitext(g["model"])[0]
    gguf = require(os.path.join(MODELS, stem + ".gguf"))
    pair = [require(os.path.join(MODELS, g["model"])), "--tokenizer",
            require(os.path.join(MODELS, g["tokenizer"]))]
    return [([gguf], "gguf"), (pair, "llama2.c")]


# alone
for g in lines:
    n = len(g["greedy_ids"])
    for margs, label in model_variants(g):
        for batch in (512, 3):
            what = f"{g['model']} {g['prompt']!r} {label} batch={batch}"
            if GRAPHS:
                what += " graphs"
            out = generate_json("--model", *margs, "--prompt", g["prompt"], "--max-tokens",
                                n, "--temperature", 0, "--ignore-eos", "--device", DEV,
                                "--batch", batch, *GOPT)
            f.check(out["prompt_ids"] == g["prompt_ids"], f"{what}: prompt_ids")
            check_ids(what, g, out["ids"])

# batched, per model, optionally speculative
by_model = {}
for g in lines:
    by_model.setdefault(g["model"], []).append(g)
for model, gs in by_model.items():
    margs, _ = model_variants(gs[0])[0]
    path = os.path.join(TMP, os.path.basename(model) + ".jsonl")
    with open(path, "w") as fh:
        for rep in range(2):
            for g in gs:
                fh.write(json.dumps({"prompt": g["prompt"],
                                     "max_tokens": len(g["greedy_ids"])}) + "\n")
    modes = [("plain", []), ("ngram", ["--spec", "ngram", "--spec-k", "4", "--spec-fixed"])]
    if model.startswith("stories260K"):
        modes.append(("draft", ["--draft-model",
                                require(os.path.join(MODELS, "llama2xs_tok512_280K.gguf")),
                                "--spec-k", "4", "--spec-fixed"]))
    for mode, extra in modes:
        _, out, err = pdctl("generate", "--model", *margs, "--prompts", path, "--parallel",
                            16, "--arrival-steps", 2, "--ignore-eos", "--temperature", 0,
                            "--format", "json", "--device", DEV, *extra, *GOPT, timeout=600)
        rows = [json.loads(l) for l in out.decode().splitlines() if l.strip()]
        res = [r for r in rows if "index" in r]
        label = mode + (" graphs" if GRAPHS else "")
        f.check(len(res) == 2 * len(gs), f"{model} {label}: {len(res)} results")
        for r in res:
            g = gs[r["index"] % len(gs)]
            check_ids(f"{model} batched {label} #{r['index']}", g, r["ids"])
        summ = [r["summary"] for r in rows if "summary" in r]
        if summ and mode != "plain":
            f.check(summ[0]["spec"]["proposed"] > 0, f"{model} {label}: nothing proposed")

if GRAPHS:  # the BF16 report does not change with graphs (test_cuda_graphs checks that)
    f.finish()  # exits

# BF16 against F32 on a random mkmodel model, 110M unless PD_TEST_BF16_PRESET says
# otherwise (no golden: agreement is reported)
mdir = os.environ.get("MODEL_DIR", TMP)
preset = os.environ.get("PD_TEST_BF16_PRESET", "110M")
mpath = os.path.join(mdir, f"m{preset.lower()}-f32.gguf")
if not os.path.exists(mpath):
    pdctl("mkmodel", "--preset", preset, "--dtype", "f32", "-o", mpath, timeout=600)
prompts = ["Once upon a time", "The capital of France is", "def fib(n):",
           "In the beginning", "Hello, my name is", "1, 2, 3, 4,", "The quick brown fox",
           "It was a dark and stormy night"]
path = os.path.join(TMP, "bf16.jsonl")
with open(path, "w") as fh:
    for p in prompts:
        fh.write(json.dumps({"prompt": p, "max_tokens": 32}) + "\n")
res = {}
for label, extra in (("f32", []), ("bf16", ["--weight-dtype", "bf16"])):
    _, out, _ = pdctl("generate", "--model", mpath, "--prompts", path, "--ignore-eos",
                      "--temperature", 0, "--format", "json", "--device", DEV, *extra,
                      timeout=600)
    res[label] = {r["index"]: r["ids"] for r in map(json.loads, out.decode().splitlines())
                  if "index" in r}
first_same = sum(res["f32"][i][0] == res["bf16"][i][0] for i in res["f32"])
diverge = []
for i in res["f32"]:
    a, b = res["f32"][i], res["bf16"][i]
    diverge.append(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
report = {"preset": preset, "prompts": len(prompts), "first_token_agree": first_same,
          "first_token_disagreement_rate": 1 - first_same / len(prompts),
          "mean_first_difference_position": sum(diverge) / len(diverge),
          "tokens_compared": 32}
print("BF16_REPORT " + json.dumps(report), flush=True)
f.check(first_same * 2 >= len(prompts),
        f"bf16: the first token agrees with f32 on only {first_same}/{len(prompts)}")
f.finish()
