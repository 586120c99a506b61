"""llamacpp_bench.py - llama.cpp's side of bench_cpu.py (run with the venv's python,
which has llama-cpp-python; see docs/benchmarks.md).

Loads one GGUF with a fixed thread count and serves timed rounds on request, so
that bench_cpu.py can interleave them with pdserve's runs (a burst of other load on
the machine then hits both engines alike). Protocol, one JSON object per line:
  start-up -> {"ready": true, "n_prompt", "tokenization_matches", "n_vocab", ...}
  "round N" -> {"prompt_tok_s", "gen_tok_s", "ids", "logits_ok"}
  "quit" (or EOF) -> exits.
A round, like llama-bench: eval of the whole prompt (BOS included) in one batch of
n_batch = 512 from an empty KV cache, then N single-token evals, greedy (argmax of
the last logits; EOS is never a stop).
"""
import argparse
import json
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


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
    lg = last_logits(llm)
    return {"prompt_tok_s": len(toks) / (t1 - t0), "gen_tok_s": n_gen / (t2 - t1),
            "ids": ids,
            "logits_ok": bool(np.all(np.isfinite(lg))) and float(np.std(lg)) > 0}


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("--expect-ids", help="JSON file with the expected prompt ids")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    text = open(a.prompt_file, encoding="utf-8").read()
    t_load = time.perf_counter()
    llm = Llama(model_path=a.model, n_ctx=1024, n_batch=512, n_ubatch=512,
                n_threads=a.threads, n_threads_batch=a.threads, verbose=False, seed=1)
    t_load = time.perf_counter() - t_load
    toks = llm.tokenize(text.encode("utf-8"), add_bos=True)
    ready = {"ready": True, "llama_cpp_python": llama_cpp.__version__, "load_s": t_load,
             "n_prompt": len(toks), "n_vocab": llm.n_vocab(), "n_embd": llm.n_embd(),
             "metadata_context_length": llm.metadata.get("llama.context_length")}
    if a.expect_ids:
        with open(a.expect_ids) as f:
            ready["tokenization_matches"] = toks == json.load(f)
    send(ready)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "round" and len(cmd) == 2:
            send(run_round(llm, toks, int(cmd[1])))
        else:
            send({"error": "bad command %r" % line.strip()})


if __name__ == "__main__":
    main()
