"""Speculative decoding by n-gram prompt lookup (`pdctl generate --prompts --spec
ngram`) leaves greedy output unchanged: every golden line (GGUF and llama2.c files) gives
its exact greedy_ids with --spec-k 1, 4 and 8, alone, among 24 requests in flight, and
under preemption (a KV budget too small for all); proposals are made and some accepted,
the per-line and summary counters agree, and acceptance is not more than proposal.
Adaptive k proposes less as the batch grows. Seeded sampled requests speculate as
well and run to their length."""
import json
import os
import tempfile

from pdtest import MODELS, Failures, golden_lines, pdctl, require

f = Failures()
by_model = {}
for g in golden_lines():
    by_model.setdefault(g["model"], []).append(g)


def run(model_args, lines, extra):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for g in lines:
            fh.write(json.dumps({"prompt": g["prompt"], "max_tokens": len(g["greedy_ids"]),
                                 "ignore_eos": True}) + "\n")
        path = fh.name
    try:
        _, out, _ = pdctl("generate", *model_args, "--prompts", path, "--temperature", 0,
                          "--format", "json", *extra, timeout=600)
    finally:
        os.unlink(path)
    rows = [json.loads(l) for l in out.decode().splitlines() if l.strip()]
    return rows[:-1], rows[-1]["summary"]


for model, glines in by_model.items():
    stem = os.path.splitext(model)[0]
    variants = [["--model", require(os.path.join(MODELS, stem + ".gguf"))],
                ["--model", require(os.path.join(MODELS, model)), "--tokenizer",
                 require(os.path.join(MODELS, glines[0]["tokenizer"]))]]
    for margs in variants:
        for k in (1, 4, 8):
            for label, lines, extra in (
                    ("alone", glines, ["--parallel", "1"]),
                    ("24 in flight", [glines[i % len(glines)] for i in range(24)],
                     ["--parallel", "24", "--arrival-steps", "3"]),
                    ("preempted", [glines[i % len(glines)] for i in range(12)],
                     ["--parallel", "12", "--kv-memory", "1MiB", "--block-size", "4"])):
                what = f"{model} ({margs[1].rsplit('.', 1)[1]}) k={k} {label}"
                rows, summ = run(margs, lines, ["--spec", "ngram", "--spec-k", str(k),
                                                *extra])
                prop = acc = 0
                for g, r in zip(lines, rows):
                    want = g["greedy_ids"][: g["exact_prefix"]]
                    f.check(r.get("ids", [])[: len(want)] == want and
                            len(r.get("ids", [])) == len(g["greedy_ids"]),
                            f"{what} {g['prompt']!r}: ids differ from golden "
                            f"({r.get('error')})")
                    f.check(0 <= r["spec"]["accepted"] <= r["spec"]["proposed"],
                            f"{what}: accepted {r['spec']}")
                    prop += r["spec"]["proposed"]
                    acc += r["spec"]["accepted"]
                s = summ["spec"]
                f.check(s["mode"] == "ngram" and s["proposed"] == prop and
                        s["accepted"] == acc, f"{what}: summary {s} vs lines {prop}/{acc}")
                f.check(prop > 0 and acc > 0, f"{what}: nothing proposed or accepted {s}")
                f.check(s["verify_steps"] > 0 and
                        abs(s["acceptance_rate"] - acc / prop) < 1e-9 and
                        abs(s["mean_accepted_length"] - acc / s["verify_steps"]) < 1e-9,
                        f"{what}: rates {s}")
                if label == "preempted":
                    f.check(summ["preemptions"] > 0, f"{what}: no preemption happened")
# one prompt (--prompt, not --prompts) runs through the engine when speculating
for g in golden_lines():
    stem = os.path.splitext(g["model"])[0]
    for spec in (["--spec", "ngram"],) + ((["--draft-model", require(os.path.join(
            MODELS, "llama2xs_tok512_280K.gguf"))],) if stem == "stories260K" else ()):
        _, out, err = pdctl("generate", "--model", require(os.path.join(MODELS, stem + ".gguf")),
                            "--prompt", g["prompt"], "--max-tokens", len(g["greedy_ids"]),
                            "--temperature", 0, "--ignore-eos", "--format", "json", *spec)
        o = json.loads(out)
        want = g["greedy_ids"][: g["exact_prefix"]]
        f.check(o["ids"][: len(want)] == want and len(o["ids"]) == len(g["greedy_ids"]),
                f"--prompt {spec[0]} {g['model']} {g['prompt']!r}: ids differ")

# adaptive k: alone a sequence proposes; among 64 the cost of a verified row outweighs
# what n-gram lookup gets accepted here, and proposals mostly stop
glines = by_model["stories260K.bin"]
per = {}
for par in (1, 64):
    gs = [glines[i % len(glines)] for i in range(64)]
    rows, summ = run(["--model", require(os.path.join(MODELS, "stories260K.gguf"))], gs,
                     ["--spec", "ngram", "--spec-k", "4", "--parallel", str(par),
                      "--arrival-steps", "0"])
    for g, r in zip(gs, rows):
        f.check(r.get("ids") == g["greedy_ids"], f"adaptive k, {par} in flight: ids differ")
    per[par] = summ["spec"]["proposed"] / summ["gen_tokens"]
f.check(per[1] > 0.2 and per[64] < 0.5 * per[1],
        f"adaptive k: proposals per generated token {per}")

# sampled requests speculate too (rejection sampling; their distribution is checked
# in tests/common/test_sampler.c): they run to their length, propose and accept
g0 = by_model["stories260K.bin"][0]
stem = os.path.join(MODELS, "stories260K.gguf")
with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
    for i in range(16):
        fh.write(json.dumps({"prompt": g0["prompt"], "max_tokens": 200, "ignore_eos": True,
                             "temperature": 0.8, "top_p": 0.95, "seed": 100 + i}) + "\n")
    path = fh.name
try:
    _, out, _ = pdctl("generate", "--model", require(stem), "--prompts", path, "--spec",
                      "ngram", "--format", "json", timeout=600)
finally:
    os.unlink(path)
rows = [json.loads(l) for l in out.decode().splitlines() if l.strip()]
for r in rows[:-1]:
    f.check(len(r.get("ids", [])) == 200 and r.get("finish_reason") == "length",
            f"sampled with spec: {r.get('error')} {len(r.get('ids', []))}")
s = rows[-1]["summary"]["spec"]
f.check(s["proposed"] > 0 and 0 < s["accepted"] <= s["proposed"],
        f"sampled with spec: nothing proposed or accepted {s}")
f.finish()
