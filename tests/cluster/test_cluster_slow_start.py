"""Workers whose threads start late: an LD_PRELOAD shim (tests/support/slowthreads.c)
holds every new thread of pd-prefill and pd-decode for a while before it runs, as a
loaded machine may. The main thread registers and sends heartbeats in the meantime, so
the router's STATS must show each worker's real pool (free = total > 0) from its
registration on, never an empty load that a test or an operator would take for a
full worker; once the threads run, requests are exact. Every wait is bounded; the
processes are killed at the end."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))
from pdcluster import Cluster, Failures, golden_lines, model_args, require  # noqa: E402

f = Failures()
g = [x for x in golden_lines() if x["model"].startswith("stories260K")][0]
DELAY_MS = 1500
LIB_DIR = os.environ.get("PD_TEST_LIB_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "tests")
shim = require(os.path.join(LIB_DIR, "pdslowthreads.so"))

env = dict(os.environ, LD_PRELOAD=shim, PD_TEST_THREAD_DELAY_MS=str(DELAY_MS))
# under AddressSanitizer the shim is loaded ahead of its runtime, which it allows
env["ASAN_OPTIONS"] = ":".join(x for x in (os.environ.get("ASAN_OPTIONS"),
                                           "verify_asan_link_order=0") if x)

with Cluster(model_args(g), 0, 0, "ucx", router_args=["--heartbeat-ms", "20"]) as cl:
    cl.env = env  # the workers' environment, not the router's
    cl.add_worker("prefill")
    cl.add_worker("decode")
    names = {p.wname for p in cl.procs if p is not cl.router}
    c = cl.client()
    try:
        seen = {}  # name -> time first seen in STATS
        empty = []
        deadline = time.time() + 60
        # sample STATS from the first registration until every worker has been listed
        # for longer than its threads were held
        while time.time() < deadline:
            st = c.stats(timeout=2)
            now = time.time()
            for w in (st.workers if st else []):
                if not w.alive or w.name not in names:
                    continue
                seen.setdefault(w.name, now)
                if w.load.total_blocks == 0 or w.load.free_blocks != w.load.total_blocks:
                    empty.append((w.name, w.load.free_blocks, w.load.total_blocks))
            if len(seen) == len(names) and now - max(seen.values()) > 2 * DELAY_MS / 1000:
                break
            for p in cl.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            time.sleep(0.01)
        f.check(len(seen) == len(names), f"workers in STATS: {sorted(seen)} of {names}")
        f.check(not empty, f"STATS showed a worker's load before its engine ran: {empty[:4]}")
        cl.wait_ready()
        rid = c.generate(prompt=g["prompt"], max_tokens=len(g["greedy_ids"]))
        (r,) = c.wait_all([rid], timeout=120)
        want = g["greedy_ids"][: g["exact_prefix"]]
        f.check(not r.error and r.ids[: len(want)] == want,
                f"after a slow start: {r.error} {r.ids[:8]} vs {want[:8]}")
    finally:
        c.close()
f.finish()
