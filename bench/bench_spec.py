#!/usr/bin/python3
"""bench_spec.py - speculative decoding against --spec off, with `pdctl generate
--prompts` (one engine, the same code the decode workers run):

  pair    stories260K with the llama2xs draft (a real pair on one vocabulary)
  ngram   stories260K with n-gram lookup, prompts that repeat text
  110m    mkmodel 110M F32 with its own Q8_0 copy (same seed) as the draft,
          at 1, 8 and 32 concurrent sequences

For each: acceptance rate, mean accepted length (accepted per verification), generated
tokens/s on and off (the same prompts, greedy, EOS ignored, runs alternating, medians
of --rounds) and the speedup. At one sequence it also predicts the ideal speedup of
speculative decoding from the measured acceptance (mean accepted tokens per
verification, m), the mean proposal length k, and the measured costs of a draft step
(c: the draft decoding alone, per token, over the target's) and of a verification
step (v: the target's pass time per step in the speculative run, over its decode step
alone):
    ideal = (1 + m) / (k*c + v)
(the tokens a verification yields over what it costs in target decode steps; the
i.i.d. form (1 - a^(k+1)) / ((1 - a)(k*c + v)) underestimates, since acceptances come
in runs) and reports measured / ideal. Speed is compared only within one run.
Writes bench/out/bench_spec.json and prints a table.
Usage: /usr/bin/python3 bench/bench_spec.py [--build-dir build] [--rounds 3] [--quick]"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(ROOT, "..", "shared")
MODELS = os.path.join(SHARED, "models")


def log(m):
    print(m, file=sys.stderr, flush=True)


def run(pdctl, model, rows, extra, threads):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        path = fh.name
    try:
        p = subprocess.run([pdctl, "generate", "--model", model, "--prompts", path,
                            "--temperature", "0", "--format", "json", "--threads",
                            str(threads), "--arrival-steps", "0", *extra],
                           capture_output=True, timeout=3600)
    finally:
        os.unlink(path)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode(errors="replace")[-800:])
    lines = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
    return lines[-1]["summary"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec-k", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    a = ap.parse_args()
    pdctl = os.path.join(a.build_dir, "bin", "pdctl")
    os.makedirs(a.out_dir, exist_ok=True)
    stories = os.path.join(MODELS, "stories260K.gguf")
    xs = os.path.join(MODELS, "llama2xs_tok512_280K.gguf")
    m110 = {}
    for dt in ("f32", "q8_0"):
        m110[dt] = os.path.join(a.out_dir, f"m110-{dt}-ctx4096.gguf")
        if not os.path.exists(m110[dt]):
            log("writing " + m110[dt])
            subprocess.run([pdctl, "mkmodel", "--preset", "110M", "--dtype", dt, "--ctx",
                            "4096", "--seed", "1", "-o", m110[dt]], check=True)
    rng = random.Random(5)
    n_small = 64 if a.quick else 200
    n_big = 32 if a.quick else 96
    story = ("Once upon a time, there was a little girl named Lily. She loved to play "
             "outside in the park. One day, she saw a big, red ball. ")
    cases = []
    # (name, model, draft args, rows, parallel)
    pair_rows = [{"prompt": p, "max_tokens": n_small, "ignore_eos": True}
                 for p in ("Once upon a time", "Tom and his dog", "The sun was")]
    cases.append(("pair", stories, ["--draft-model", xs], pair_rows, 1))
    ngram_rows = [{"prompt": story * 3, "max_tokens": n_small, "ignore_eos": True},
                  {"prompt": story * 2 + "Lily", "max_tokens": n_small, "ignore_eos": True}]
    cases.append(("ngram", stories, ["--spec", "ngram"], ngram_rows, 1))
    for n in (1, 8, 32):
        rows = [{"prompt_ids": [1] + [rng.randrange(3, 32000) for _ in range(16)],
                 "max_tokens": n_big, "ignore_eos": True} for _ in range(n)]
        cases.append((f"110m x{n}", m110["f32"], ["--draft-model", m110["q8_0"]], rows, n))
    res = {}
    for rnd in range(a.rounds):
        for name, model, spec, rows, par in cases:
            for mode in ("off", "on"):
                log(f"round {rnd + 1}: {name} {mode}")
                extra = ["--parallel", str(par)]
                if mode == "on":
                    extra += spec + ["--spec-k", str(a.spec_k)]
                s = run(pdctl, model, rows, extra, a.threads)
                res.setdefault((name, mode), []).append(s)
    # the cost of a draft step relative to a target step: each model decoding alone
    costs = {}
    for name, target, draft in (("pair", stories, xs), ("110m x1", m110["f32"], m110["q8_0"])):
        rows = [{"prompt_ids": [1, 400, 300], "max_tokens": n_small, "ignore_eos": True}]
        t = statistics.median(run(pdctl, target, rows, ["--parallel", "1"], a.threads)
                              ["forward_s"] / n_small for _ in range(a.rounds))
        d = statistics.median(run(pdctl, draft, rows, ["--parallel", "1"], a.threads)
                              ["forward_s"] / n_small for _ in range(a.rounds))
        costs[name] = (t, d)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
           "threads": a.threads, "spec_k": a.spec_k, "cases": {}}
    print(f"# speculative decoding, spec-k {a.spec_k}, {a.threads} threads "
          f"({out['machine']}), medians of {a.rounds}")
    print("| case | off tok/s | on tok/s | speedup | acceptance | mean accepted | ideal | "
          "measured/ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, *_ in cases:
        off = statistics.median(s["gen_tokens_per_s"] for s in res[(name, "off")])
        on = statistics.median(s["gen_tokens_per_s"] for s in res[(name, "on")])
        sp = [s["spec"] for s in res[(name, "on")]]
        acc = statistics.median(x["acceptance_rate"] for x in sp)
        mal = statistics.median(x["mean_accepted_length"] for x in sp)
        ideal = None
        if name in costs:
            t, d = costs[name]
            ons = res[(name, "on")]
            kk = statistics.median(x["proposed"] / max(1, x["verify_steps"]) for x in sp)
            # a verification step's target time (forward_s counts the target passes)
            v = statistics.median(s["forward_s"] / max(1, s["decode_steps"]) for s in ons) / t
            c = d / t if name != "ngram" else 0.0
            # tokens per verification (measured) over its cost in target decode steps
            ideal = (1 + mal) / (kk * c + v)
        case = {"off_tok_s": off, "on_tok_s": on, "speedup": on / off, "acceptance": acc,
                "mean_accepted_length": mal, "ideal_speedup": ideal}
        out["cases"][name] = case
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {acc:.3f} | {mal:.2f} | "
              + (f"{ideal:.2f}x | {on / off / ideal:.2f} |" if ideal else "- | - |"))
    out["step_costs_s"] = costs
    with open(os.path.join(a.out_dir, "bench_spec.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
