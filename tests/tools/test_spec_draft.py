"""Speculative decoding with a draft model (`pdctl generate --prompts --draft-model`):
every stories260K golden line gives its exact greedy_ids with the llama2xs draft (a real
model trained on the same vocabulary; GGUF and llama2.c files) at --spec-k 1, 4 and 8,
alone, 24 in flight and under preemption; the draft's proposals are accepted at a rate
between 0 and 1; the model as its own draft has every proposal accepted (its KV, rolled
back after each verification, stays exact); seeded sampled requests run to their length; a draft with another vocabulary is
refused with a clear error."""
import json
import os
import subprocess
import tempfile

from pdtest import MODELS, PDCTL, Failures, golden_lines, pdctl, require

f = Failures()
lines = [g for g in golden_lines() if g["model"] == "stories260K.bin"]
target = require(os.path.join(MODELS, "stories260K.gguf"))
drafts = {"llama2xs gguf": [require(os.path.join(MODELS, "llama2xs_tok512_280K.gguf"))],
          "llama2xs bin": [require(os.path.join(MODELS, "llama2xs_tok512_280K.bin"))]}


def run(args, rows_in):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for r in rows_in:
            fh.write(json.dumps(r) + "\n")
        path = fh.name
    try:
        _, out, _ = pdctl("generate", "--prompts", path, "--format", "json", *args,
                          timeout=600)
    finally:
        os.unlink(path)
    rows = [json.loads(l) for l in out.decode().splitlines() if l.strip()]
    return rows[:-1], rows[-1]["summary"]


def golden_rows(gs):
    return [{"prompt": g["prompt"], "max_tokens": len(g["greedy_ids"]), "ignore_eos": True}
            for g in gs]


for dname, dpath in drafts.items():
    # the .bin draft needs the tokenizer of its vocabulary (the target is GGUF)
    tok = ["--tokenizer", require(os.path.join(MODELS, "tok512.bin"))] \
        if dpath[0].endswith(".bin") else []
    for k in (1, 4, 8):
        for label, gs, extra in (
                ("alone", lines, ["--parallel", "1"]),
                ("24 in flight", [lines[i % len(lines)] for i in range(24)],
                 ["--parallel", "24", "--arrival-steps", "2"]),
                ("preempted", [lines[i % len(lines)] for i in range(12)],
                 ["--parallel", "12", "--kv-memory", "1MiB", "--block-size", "4"])):
            what = f"draft {dname} k={k} {label}"
            # fixed k: adaptive k decides from measured times, and these checks need
            # the same proposals on every run
            rows, s = run(["--model", target, "--draft-model", dpath[0], *tok,
                           "--spec-k", str(k), "--spec-fixed", "--temperature", "0", *extra],
                          golden_rows(gs))
            for g, r in zip(gs, rows):
                want = g["greedy_ids"][: g["exact_prefix"]]
                f.check(r.get("ids", [])[: len(want)] == want and
                        len(r.get("ids", [])) == len(g["greedy_ids"]),
                        f"{what} {g['prompt']!r}: ids differ ({r.get('error')})")
            sp = s["spec"]
            f.check(sp["mode"] == "draft" and sp["proposed"] > 0 and
                    0 < sp["accepted"] < sp["proposed"],
                    f"{what}: proposed {sp['proposed']} accepted {sp['accepted']}")
            if label == "preempted":
                f.check(s["preemptions"] > 0, f"{what}: no preemption happened")

# the model as its own draft: every proposal is the target's own greedy choice
rows, s = run(["--model", target, "--draft-model", target, "--spec-k", "4", "--spec-fixed",
               "--temperature", "0", "--parallel", "8"], golden_rows(lines * 3))
f.check(s["spec"]["proposed"] > 0 and s["spec"]["accepted"] == s["spec"]["proposed"],
        f"self-draft: {s['spec']}")
for g, r in zip(lines * 3, rows):
    f.check(r.get("ids") == g["greedy_ids"], f"self-draft {g['prompt']!r}: ids differ")

# seeded sampled requests speculate with the draft too
rows, s = run(["--model", target, "--draft-model", drafts["llama2xs gguf"][0],
               "--spec-fixed"],
              [{"prompt": lines[0]["prompt"], "max_tokens": 150, "ignore_eos": True,
                "temperature": 0.8, "seed": 7 + i} for i in range(8)])
f.check(all(len(r.get("ids", [])) == 150 for r in rows) and s["spec"]["accepted"] > 0,
        f"sampled with a draft: {s['spec']}")

# a draft on another vocabulary is refused
with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
    fh.write(json.dumps({"prompt": "Hello", "max_tokens": 4}) + "\n")
    path = fh.name
p = subprocess.run([PDCTL, "generate", "--model",
                    require(os.path.join(MODELS, "llama-2-tiny-random.gguf")),
                    "--draft-model", target, "--prompts", path], capture_output=True,
                   timeout=120)
os.unlink(path)
f.check(p.returncode == 1 and b"vocabulary" in p.stderr,
        f"mismatched draft: status {p.returncode}, {p.stderr[-300:]!r}")
f.finish()
