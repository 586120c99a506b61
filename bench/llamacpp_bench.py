"""llamacpp_bench.py - llama.cpp's side of bench_cpu.py (run with the venv's python,
which has llama-cpp-python; see docs/benchmarks.md).

Loads a GGUF once per thread count and measures, like llama-bench:
  prompt: eval of the whole prompt (n_prompt tokens incl. BOS) in one batch of
          n_batch=512, from an empty KV cache, tokens/s;
  gen:    n_gen single-token evals after that prompt, greedy (argmax of the last
          logits; EOS is never a stop), tokens/s.
One warm-up round, then --reps timed rounds. Prints one JSON object on stdout.
Also verifies that llama.cpp loaded the file with the expected vocabulary and
that its tokenization of the prompt equals the expected ids (--expect-ids).
"""
import argparse
import json
import sys
import time

import numpy as np
from llama_cpp import Llama
import llama_cpp


def last_logits(llm):
    """The logits of the last evaluated token (llama-cpp-python no longer copies them
    into llm.scores unless logits_all is set)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def run_round(llm, toks, n_gen):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    t1 = time.perf_counter()
    ids = []
    for _ in range(n_gen):
        nxt = int(np.argmax(last_logits(llm)))
        ids.append(nxt)
        llm.eval([nxt])
    t2 = time.perf_counter()
    return len(toks) / (t1 - t0), n_gen / (t2 - t1), ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--expect-ids", help="JSON file with the expected prompt ids")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-gen", type=int, default=128)
    a = ap.parse_args()
    text = open(a.prompt_file, encoding="utf-8").read()
    out = {"llama_cpp_python": llama_cpp.__version__, "model": a.model, "runs": []}
    for t in [int(x) for x in a.threads.split(",")]:
        t_load = time.perf_counter()
        llm = Llama(model_path=a.model, n_ctx=1024, n_batch=512, n_ubatch=512,
                    n_threads=t, n_threads_batch=t, verbose=False, seed=1)
        t_load = time.perf_counter() - t_load
        toks = llm.tokenize(text.encode("utf-8"), add_bos=True)
        if a.expect_ids:
            want = json.load(open(a.expect_ids))
            out["tokenization_matches"] = toks == want
        out["n_vocab"] = llm.n_vocab()
        out["n_embd"] = llm.n_embd()
        out["metadata_context_length"] = llm.metadata.get("llama.context_length")
        out["n_prompt"] = len(toks)
        run_round(llm, toks, 4)  # warm-up
        pp, tg = [], []
        for _ in range(a.reps):
            p, g, ids = run_round(llm, toks, a.n_gen)
            pp.append(p)
            tg.append(g)
        lg = last_logits(llm)
        finite = bool(np.all(np.isfinite(lg))) and float(np.std(lg)) > 0
        out["runs"].append({"threads": t, "load_s": t_load, "prompt_tok_s": pp,
                            "gen_tok_s": tg, "logits_finite": finite,
                            "gen_ids": ids})
        del llm
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
