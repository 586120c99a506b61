"""llamacpp_server.py - llama.cpp's hand-batched side of bench_batch.py: N sequences
decoded together on libllama (through llama-cpp-python's ctypes binding), one
llama_decode per step. Run with the venv's python (see docs/benchmarks.md).

Why: llama-cpp-python's own server (llama_cpp.server) serves one request at a time;
this is continuous batching done by hand on llama.cpp's own kernels, with no HTTP in
the way, to set beside llama.cpp's C++ `llama-server -np N -cb` (bench_batch.py runs
both). The loop is the one llama-server's update_slots() runs:
  - one context holds the model with n_seq_max = N sequences and a non-unified KV
    cache (one stream of n_ctx / N cells per sequence, as `llama-server -np N` makes
    unless --kv-unified), default n_batch 2048 / n_ubatch 512, flash attention auto;
  - each step builds one llama_batch: first the next token of every generating
    sequence, then prompt tokens of the waiting ones in arrival order while the step
    has room (n_batch tokens); logits only on decode tokens and on a prompt's last
    token; one llama_decode; greedy argmax of each output row; a sequence finishes
    after max_tokens generated tokens (EOS is never a stop);
  - arrival_steps K: request i joins at step i*K (0 = all at once).
Timed: from the first llama_decode to the last token (model loaded, KV cache cleared
before each round). Single-threaded driver; ggml's own threads run the kernels.

Protocol, one JSON object per line on stdin / stdout:
  start-up -> {"ready": true, "llama_cpp_python", "n_ctx", "n_seq_max", ...}
  {"cmd": "tokenize", "texts": [..]} -> {"ids": [[..], ..]} (BOS added)
  {"cmd": "round", "prompts": [[ids], ..], "max_tokens": D, "arrival_steps": K}
      -> {"wall_s", "prompt_tokens", "gen_tokens", "gen_tokens_per_s",
          "prompt_tokens_per_s", "steps", "batch_size_mean", "ids": [[..], ..],
          "first_token_ms": [..], "finish_ms": [..], "logits_ok"}
  {"cmd": "quit"} (or EOF) -> exits.
"""
import argparse
import json
import sys
import time

import numpy as np
import llama_cpp
import llama_cpp._logger  # noqa: F401  (installs the log callback that set_verbose mutes)


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Batched:
    def __init__(self, a):
        llama_cpp._logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(a.model.encode(), mp)
        if not self.model:
            raise RuntimeError("cannot load %s" % a.model)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = a.n_seq * a.ctx_per_seq
        cp.n_batch = a.batch
        cp.n_ubatch = min(a.ubatch, a.batch)
        cp.n_seq_max = a.n_seq
        cp.n_threads = cp.n_threads_batch = a.threads
        cp.kv_unified = a.kv_unified
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("cannot create a context (n_ctx %d, n_seq_max %d)"
                               % (cp.n_ctx, cp.n_seq_max))
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_seq, self.cap = a.n_seq, max(a.batch, a.n_seq)
        self.budget = a.batch
        self.batch = llama_cpp.llama_batch_init(self.cap, 0, 1)
        b = self.batch
        self.tok = np.ctypeslib.as_array(b.token, shape=(self.cap,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(self.cap,))
        self.nsq = np.ctypeslib.as_array(b.n_seq_id, shape=(self.cap,))
        self.lgt = np.ctypeslib.as_array(b.logits, shape=(self.cap,))
        self.sq = [np.ctypeslib.as_array(b.seq_id[i], shape=(1,))
                   for i in range(self.cap)]
        self.nsq[:] = 1
        self.info = {"ready": True, "llama_cpp_python": llama_cpp.__version__,
                     "n_ctx": llama_cpp.llama_n_ctx(self.ctx), "n_seq_max": a.n_seq,
                     "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch,
                     "kv_unified": bool(a.kv_unified), "n_vocab": self.n_vocab,
                     "threads": a.threads,
                     "system_info": llama_cpp.llama_print_system_info().decode()}

    def tokenize(self, text):
        raw = text.encode("utf-8")
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True,
                                     False)
        if n < 0:
            raise RuntimeError("tokenize: %d" % n)
        return list(buf[:n])

    def round(self, prompts, max_tokens, arrival_steps):
        """Continuous batching over all prompts; see the file comment."""
        n = len(prompts)
        if n > self.n_seq:
            raise RuntimeError("%d prompts > n_seq_max %d" % (n, self.n_seq))
        llama_cpp.llama_memory_clear(self.mem, True)
        done = [0] * n       # prompt tokens already decoded
        gen = [[] for _ in range(n)]
        first_ms, finish_ms = [None] * n, [None] * n
        step, sizes, finished, ok = 0, [], 0, True
        t0 = time.perf_counter()
        while finished < n:
            k = 0
            rows = []  # (sequence, is_decode) per output row, in batch order
            for i in range(n):  # generating sequences: one token each
                if done[i] == len(prompts[i]) and gen[i] and len(gen[i]) < max_tokens:
                    self.tok[k], self.pos[k] = gen[i][-1], done[i] + len(gen[i]) - 1
                    self.sq[k][0] = i
                    self.lgt[k] = 1
                    rows.append(i)
                    k += 1
            for i in range(n):  # then prompt chunks of the arrived, waiting ones
                if k >= self.budget:
                    break
                if done[i] == len(prompts[i]) or step < i * arrival_steps:
                    continue
                take = min(len(prompts[i]) - done[i], self.budget - k)
                p = prompts[i]
                for j in range(take):
                    self.tok[k], self.pos[k] = p[done[i] + j], done[i] + j
                    self.sq[k][0] = i
                    self.lgt[k] = 0
                    k += 1
                done[i] += take
                if done[i] == len(p):
                    self.lgt[k - 1] = 1
                    rows.append(i)
            step += 1
            if k == 0:
                continue  # nothing has arrived yet
            self.batch.n_tokens = k
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError("llama_decode returned %d at step %d (%d tokens)"
                                   % (rc, step, k))
            sizes.append(k)
            lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx),
                                       shape=(len(rows), self.n_vocab))
            nxt = np.argmax(lg, axis=1)
            now = (time.perf_counter() - t0) * 1e3
            for r, i in enumerate(rows):
                gen[i].append(int(nxt[r]))
                if len(gen[i]) == 1:
                    first_ms[i] = now
                if len(gen[i]) == max_tokens:
                    finish_ms[i] = now
                    finished += 1
            if step == 1 or finished == n:
                ok = ok and bool(np.all(np.isfinite(lg))) and float(np.std(lg[0])) > 0
        wall = time.perf_counter() - t0
        n_prompt = sum(len(p) for p in prompts)
        n_gen = sum(len(g) for g in gen)
        return {"wall_s": wall, "prompt_tokens": n_prompt, "gen_tokens": n_gen,
                "gen_tokens_per_s": n_gen / wall, "prompt_tokens_per_s": n_prompt / wall,
                "steps": len(sizes), "batch_size_mean": sum(sizes) / max(1, len(sizes)),
                "batch_size_max": max(sizes) if sizes else 0, "ids": gen,
                "first_token_ms": first_ms, "finish_ms": finish_ms, "logits_ok": ok}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-seq", type=int, required=True, help="sequences (n_seq_max)")
    ap.add_argument("--ctx-per-seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2048, help="n_batch: tokens per step "
                    "(llama-server's default)")
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--kv-unified", action="store_true")
    a = ap.parse_args()
    eng = Batched(a)
    send(eng.info)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["cmd"] == "quit":
                break
            if req["cmd"] == "tokenize":
                send({"ids": [eng.tokenize(t) for t in req["texts"]]})
            elif req["cmd"] == "round":
                send(eng.round(req["prompts"], int(req["max_tokens"]),
                               int(req.get("arrival_steps", 0))))
            else:
                send({"error": "bad command %r" % req["cmd"]})
        except (RuntimeError, KeyError, ValueError) as e:
            send({"error": str(e)})


if __name__ == "__main__":
    main()
