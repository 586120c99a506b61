#!/usr/bin/python3
"""bench_sample_threads.py - the engine's host draws of sampled tokens on one thread
against several (--sample-threads), with `pdctl generate --prompts` (one engine, the
code the workers run).

The model is llama-2-tiny-random.gguf: a 32000-token vocabulary on a model so small
(dim 8, one layer) that a step is almost all sampling, which is what a GPU step with
sampled sequences leaves to the host (the forward pass is on the device; the logits
come back and every sequence draws from its row). For each batch size N: N prompts
arrive together, each samples --max-tokens tokens (temperature 0.8, top-p 0.95, EOS
ignored, a seed each), with --sample-threads 1 and with each count of --threads-list;
the summary's sample_s over its steps is the host sampling time of a step, and
gen_tokens_per_s the throughput. Runs alternate the thread counts, medians of
--rounds. The tokens must be the same for every count (the script fails otherwise).
Writes bench/out/bench_sample_threads.json and prints a markdown table.
Usage: /usr/bin/python3 bench/bench_sample_threads.py [--build-dir build] [--rounds 5]
       [--batches 8,64,256] [--threads-list 2] [--max-tokens 32]"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(ROOT, "..", "shared")
MODEL = os.path.join(SHARED, "models", "llama-2-tiny-random.gguf")


def log(m):
    print(m, file=sys.stderr, flush=True)


def run(pdctl, path, n, sample_threads, kernel_threads):
    p = subprocess.run([pdctl, "generate", "--model", MODEL, "--prompts", path,
                        "--format", "json", "--parallel", str(n), "--arrival-steps", "0",
                        "--threads", str(kernel_threads), "--sample-threads",
                        str(sample_threads)], capture_output=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode(errors="replace")[-800:])
    rows = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
    return [r["ids"] for r in rows[:-1]], rows[-1]["summary"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="8,64,256")
    ap.add_argument("--threads-list", default="2")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    pdctl = os.path.join(a.build_dir, "bin", "pdctl")
    counts = [1] + [int(x) for x in a.threads_list.split(",")]
    kernel_threads = max(counts)
    results = []
    for n in (int(x) for x in a.batches.split(",")):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as fh:
            for i in range(n):
                fh.write(json.dumps({"prompt": f"Once upon a time {i}",
                                     "max_tokens": a.max_tokens, "ignore_eos": True,
                                     "temperature": 0.8, "top_p": 0.95,
                                     "seed": 1000 + i}) + "\n")
            path = fh.name
        try:
            per = {c: {"step_ms": [], "tok_s": [], "par": 0} for c in counts}
            ref = None
            for rnd in range(a.rounds + 1):  # round 0 warms the page cache
                order = counts if rnd % 2 == 0 else counts[::-1]
                for c in order:
                    ids, s = run(pdctl, path, n, c, kernel_threads)
                    if ref is None:
                        ref = ids
                    elif ids != ref:
                        raise SystemExit(f"batch {n}: --sample-threads {c} changed the "
                                         "tokens")
                    if rnd == 0:
                        continue
                    per[c]["step_ms"].append(1e3 * s["sample_s"] / max(1, s["decode_steps"]))
                    per[c]["tok_s"].append(s["gen_tokens_per_s"])
                    per[c]["par"] = s["sample_parallel_steps"]
        finally:
            os.unlink(path)
        base = statistics.median(per[1]["step_ms"])
        for c in counts:
            ms = statistics.median(per[c]["step_ms"])
            row = {"batch": n, "sample_threads": c, "sample_ms_per_step": ms,
                   "speedup": base / ms if ms > 0 else 0.0,
                   "gen_tokens_per_s": statistics.median(per[c]["tok_s"]),
                   "parallel_steps": per[c]["par"]}
            results.append(row)
            log(f"batch {n:4d} sample-threads {c}: {ms:8.3f} ms/step sampling "
                f"({row['speedup']:.2f}x), {row['gen_tokens_per_s']:9.1f} tok/s")
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "bench_sample_threads.json"), "w") as fh:
        json.dump({"machine": platform.processor() or platform.machine(),
                   "ncpu": os.cpu_count(), "rounds": a.rounds,
                   "max_tokens": a.max_tokens, "results": results}, fh, indent=1)
    print("| batch | sample threads | host sampling ms/step | vs 1 thread | gen tok/s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['sample_threads']} | {r['sample_ms_per_step']:.2f} | "
              f"{r['speedup']:.2f}x | {r['gen_tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
