"""Every golden line through the whole cluster yields its exact greedy_ids: 1 prefill +
1 decode worker over UCX, 2 + 2 over the ZeroMQ transport, the llama2.c pair and the
GGUF copy, one request at a time and with 64 requests in flight; prompts long enough
to stream their KV layer by layer (--kv-layerwise-min 1) as well as in bulk; seeded
sampled requests equal `pdctl generate` with the same seed (the prefill worker draws
the first token and hands its random state on); and after every run each worker's
free KV blocks are back to their starting count. One configuration runs the decode
workers with speculative decoding (--spec ngram), one the workers with
--sample-threads 3, whose STATS then report 3 sampling threads and their steps' time."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))
from pdcluster import (MODELS, Cluster, Failures, golden_lines, model_args, pb,  # noqa
                       reference, wait_blocks_back)

f = Failures()
lines = golden_lines()
by_model = {}
for g in lines:
    by_model.setdefault(g["model"], []).append(g)


def check_line(what, g, r):
    want = g["greedy_ids"][: g["exact_prefix"]]
    if r.error:
        f.check(False, f"{what}: error {r.error}")
        return
    f.check(r.done, f"{what}: never finished")
    f.check(r.indices == list(range(len(r.ids))), f"{what}: indices not 0..n-1 once each")
    got = r.ids[: len(want)]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
        f.check(False, f"{what}: ids differ from golden at {first} (got {len(r.ids)} ids)")
    else:
        f.check(len(r.ids) == len(g["greedy_ids"]), f"{what}: {len(r.ids)} ids")
    f.check(r.finish == "length", f"{what}: finish {r.finish}")
    f.check(r.usage is not None and list(r.usage.prompt_ids) == g["prompt_ids"],
            f"{what}: prompt_ids {list(r.usage.prompt_ids) if r.usage else None}")


configs = [
    # (label, prefill, decode, transport, gguf, extra worker args)
    ("1P+1D ucx gguf", 1, 1, "ucx", True, []),
    ("1P+1D ucx llama2.c layerwise", 1, 1, "ucx", False, ["--kv-layerwise-min", "1"]),
    # the workers draw on their own pools of 3 sampling threads
    ("2P+2D zmq gguf", 2, 2, "zmq", True, ["--sample-threads", "3"]),
    ("2P+2D ucx gguf layerwise small steps", 2, 2, "ucx", True,
     ["--kv-layerwise-min", "1", "--batch", "64"]),
    # speculative decoding (n-gram lookup) on the decode workers: greedy unchanged
    ("1P+2D ucx gguf spec ngram", 1, 2, "ucx", True, ["--spec", "ngram", "--spec-k", "4"]),
    # a draft model on the decode workers (the other tok512 model of the pair)
    ("1P+1D ucx gguf spec draft", 1, 1, "ucx", True, ["--draft-model", "DRAFT", "--spec-k", "3"]),
]
DRAFT_FOR = {"stories260K.bin": "llama2xs_tok512_280K.gguf",
             "llama2xs_tok512_280K.bin": "stories260K.gguf"}

for label, n_p, n_d, transport, gguf, wargs in configs:
    for model, glines in by_model.items():
        what0 = f"[{label}] {model}"
        margs = [os.path.join(MODELS, DRAFT_FOR[model]) if a == "DRAFT" else a for a in wargs]
        with Cluster(model_args(glines[0], gguf), n_p, n_d, transport,
                     prefill_args=margs, decode_args=margs) as cl:
            cl.wait_ready()
            c = cl.client()
            start = None
            try:
                from pdcluster import free_blocks
                start = free_blocks(c)
                f.check(len(start) == n_p + n_d, f"{what0}: {len(start)} workers in STATS")
                # one at a time
                alone = []
                for g in glines:
                    rid = c.generate(prompt=g["prompt"], max_tokens=len(g["greedy_ids"]))
                    (r,) = c.wait_all([rid], timeout=120)
                    check_line(f"{what0} alone {g['prompt']!r}", g, r)
                    alone.append(r)
                # 64 in flight
                rids = []
                for i in range(64):
                    g = glines[i % len(glines)]
                    rids.append((g, c.generate(prompt=g["prompt"],
                                               max_tokens=len(g["greedy_ids"]))))
                res = c.wait_all([r for _, r in rids], timeout=300)
                for (g, _), r in zip(rids, res):
                    check_line(f"{what0} 64 in flight {g['prompt']!r}", g, r)
                # seeded sampling equals the single process
                samp = []
                # (with speculation a sampled request's draws depend on what was proposed,
                # so only its distribution matches: tests/common/test_sampler.c)
                for i, g in enumerate(glines if "--spec-k" not in wargs else []):
                    seed = 1000 + i
                    want = reference(model_args(g, gguf), g["prompt"], 64, 0.9, 0.95, seed)
                    samp.append((g, want, c.generate(prompt=g["prompt"], max_tokens=64,
                                                     temperature=0.9, top_p=0.95,
                                                     seed=seed)))
                for (g, want, rid), r in zip(samp, c.wait_all([x[2] for x in samp])):
                    f.check(not r.error and r.ids == want,
                            f"{what0} sampled {g['prompt']!r}: {r.error} {r.ids[:8]} vs "
                            f"{want[:8]}")
                if "--sample-threads" in wargs:
                    # every worker reports its sampling threads, and each one that ran
                    # steps their time (the heartbeat carries them: wait a little for
                    # both roles' counters; a prefill worker may have had no request)
                    ws = []
                    for _ in range(50):
                        st = c.stats()
                        ws = list(st.workers) if st else []
                        if all(any(w.load.steps > 0 for w in ws if w.role == role)
                               for role in (pb.PREFILL, pb.DECODE)):
                            break
                        time.sleep(0.1)
                    f.check(len(ws) == n_p + n_d and
                            all(w.load.sample_threads == 3 for w in ws),
                            f"{what0}: sample_threads {[w.load.sample_threads for w in ws]}")
                    times = [(w.role, w.load.steps, w.load.forward_s, w.load.sample_s)
                             for w in ws]
                    f.check(all(any(t[0] == role and t[1] > 0 for t in times)
                                for role in (pb.PREFILL, pb.DECODE)) and
                            all(t[1] == 0 or (t[2] > 0 and t[3] > 0) for t in times),
                            f"{what0}: (role, steps, forward_s, sample_s) {times}")
                if "--spec-k" in wargs:
                    # per request, in usage (adaptive k proposes mostly when few run)
                    up = sum(r.usage.spec_proposed for r in alone + res if r.usage)
                    ua = sum(r.usage.spec_accepted for r in alone + res if r.usage)
                    f.check(up > 0 and 0 < ua <= up, f"{what0}: usage spec {up}/{ua}")
                    # a request may turn speculation off
                    g = glines[0]
                    rid = c.generate(prompt=g["prompt"], max_tokens=len(g["greedy_ids"]),
                                     spec_k=-1)
                    (r,) = c.wait_all([rid], timeout=120)
                    check_line(f"{what0} spec off", g, r)
                    f.check(r.usage is not None and r.usage.spec_proposed == 0,
                            f"{what0}: spec_k -1 still proposed")
                    # the decode workers' counters, as their heartbeats report them
                    st = c.stats()
                    prop = sum(w.load.spec_proposed for w in st.workers) if st else 0
                    acc = sum(w.load.spec_accepted for w in st.workers) if st else 0
                    f.check(prop > 0 and 0 < acc <= prop,
                            f"{what0}: speculation proposed {prop}, accepted {acc}")
                ok, now = wait_blocks_back(c, start)
                f.check(ok, f"{what0}: free blocks {now} != start {start}")
            finally:
                c.close()
f.finish()
