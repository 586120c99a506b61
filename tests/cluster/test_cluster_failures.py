"""Failures through the real cluster, every wait bounded:
- a decode worker SIGKILLed in the middle of streams: every request still completes
  with its exact golden ids, each index exactly once (re-run on the other decode worker
  from the prompt plus the tokens already sent);
- a prefill worker SIGKILLed with prefills assigned: they are retried on the other one;
  the decode worker then closes its idle peers (the dead worker's among them) and
  connects again for the next request;
- a reservation whose prefill never arrives (the only prefill worker frozen) is
  released by the decode worker at the end of its lease, and the request completes once
  the prefill worker is back (it registers again, having dropped its stale work);
- a prefill worker frozen (SIGSTOP) in the middle of layer-by-layer transfers and
  resumed after the leases ended corrupts nothing: every request's output stays exact
  while the blocks it held are reused by others;
- a cancelled request (before and after its first token) and a client that goes away
  free their blocks on every worker;
- SIGTERM drains a decode worker (its requests finish, exit status 0) and the router
  (exit status 0).
After each scenario every surviving worker's free-block count is back to its start."""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))
from pdcluster import (Cluster, Failures, free_blocks, golden_lines, model_args,  # noqa
                       reference, wait_blocks_back)

f = Failures()
lines = [g for g in golden_lines() if g["model"].startswith("stories260K")]
MODEL = model_args(lines[0])
FAST = ["--heartbeat-ms", "50", "--dead-ms", "2000"]


def check_exact(what, g, r):
    want = g["greedy_ids"][: g["exact_prefix"]]
    if r.error:
        return f.check(False, f"{what}: error {r.error}")
    ok = f.check(r.done, f"{what}: not finished")
    ok &= f.check(r.indices == list(range(len(r.ids))),
                  f"{what}: indices are not 0..{len(r.ids) - 1} exactly once")
    ok &= f.check(r.ids[: len(want)] == want and len(r.ids) == len(g["greedy_ids"]),
                  f"{what}: ids differ from golden ({len(r.ids)} ids)")
    return ok


def send_golden(c, n):
    reqs = []
    for i in range(n):
        g = lines[i % len(lines)]
        reqs.append((g, c.generate(prompt=g["prompt"], max_tokens=len(g["greedy_ids"]))))
    return reqs


def wait_any_partial(c, reqs, timeout=30, want=4):
    """Polls until at least `want` requests (or all there are) have streamed tokens
    but not finished."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        c.poll(5)
        n = sum(1 for g, r in reqs if 0 < len(c.results[r].ids) < len(g["greedy_ids"]))
        if n >= min(want, len(reqs)):
            return True
    return False


def blocks_back(what, c, start, names=None):
    start = {k: v for k, v in start.items() if names is None or k in names}
    ok, now = wait_blocks_back(c, start)
    f.check(ok, f"{what}: free blocks {now} != start {start}")


def alive_names(c):
    return set(free_blocks(c))


# ---- a decode worker killed mid-stream ------------------------------------------------
# Killed once every request is past its KV transfer (two tokens streamed): with UCX
# 1.13.1, a decode worker killed while its reads are in flight can abort the prefill
# worker that answers them (docs/architecture.md, "A UCX 1.13.1 assertion").
def all_admitted(c, reqs, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        c.poll(5)
        if all(len(c.results[r].ids) >= 2 for _, r in reqs):
            return True
    return False


for transport in ("ucx", "zmq"):
    with Cluster(MODEL, 1, 2, transport, router_args=FAST) as cl:
        cl.wait_ready()
        c = cl.client()
        # warm up: every decode worker connects its UCX endpoint to the prefill worker (a
        # decode worker killed while that first handshake is in flight trips an assertion
        # in UCX 1.13.1's prefill side, removed upstream: docs/architecture.md)
        warm = send_golden(c, 8)
        c.wait_all([r for _, r in warm], timeout=120)
        # idle again: every block free (cached prefixes count as free)
        start = {k: (t, t) for k, (_, t) in free_blocks(c).items()}
        blocks_back(f"{transport} decode kill warm-up", c, start)
        # seeded sampled requests too: a re-run continues their random stream (references
        # first: under ASan they take a while, and everything must be in flight together)
        refs = [reference(MODEL, lines[i % len(lines)]["prompt"], 200, 0.8, 0.95, 77 + i)
                for i in range(8)]
        reqs = send_golden(c, 48)
        sampled = []
        for i in range(8):
            g = lines[i % len(lines)]
            sampled.append((refs[i], c.generate(prompt=g["prompt"], max_tokens=200,
                                                temperature=0.8, top_p=0.95, seed=77 + i)))
        f.check(all_admitted(c, reqs + [(None, r) for _, r in sampled]),
                f"{transport} decode kill: requests not all streaming")
        f.check(wait_any_partial(c, reqs), f"{transport} decode kill: no request was mid-stream")
        # the decode worker running the most requests (STATS lags by a heartbeat)
        st = c.stats()
        running = {w.name: w.load.running for w in st.workers} if st else {}
        victim = max(cl.decode, key=lambda p: running.get(p.wname, 0))
        print(f"{transport} decode kill: running per worker {running}; killing {victim.wname}", flush=True)
        victim.signal(signal.SIGKILL)
        partial = sum(1 for g, r in reqs if 0 < len(c.results[r].ids) < len(g["greedy_ids"]))
        print(f"{transport} decode kill: {partial} requests mid-stream at the kill", flush=True)
        res = c.wait_all([r for _, r in reqs], timeout=180)
        retried = 0
        for (g, _), r in zip(reqs, res):
            check_exact(f"{transport} decode kill {g['prompt']!r}", g, r)
            retried += bool(r.usage and r.usage.retries)
        f.check(retried > 0, f"{transport} decode kill: no request was re-run")
        rerun = 0
        for i, (want, rid) in enumerate(sampled):
            r = c.wait_all([rid], timeout=60)[0]
            rerun += bool(r.usage and r.usage.retries)
            f.check(not r.error and r.ids == want and r.indices == list(range(len(r.ids))),
                    f"{transport} decode kill: sampled request {i} differs from pdctl generate "
                    f"(retries {r.usage.retries if r.usage else None}, error {r.error})")
        print(f"{transport} decode kill: {rerun} of {len(sampled)} sampled requests were re-run", flush=True)
        survivors = alive_names(c)
        f.check(len(survivors) == 2, f"{transport} decode kill: alive workers {survivors}")
        blocks_back(f"{transport} decode kill", c, start, survivors)
        c.close()

# ---- a prefill worker killed with work assigned ----------------------------------------
def peer_closes(proc):
    with open(proc.log_path, "rb") as fh:
        return fh.read().decode(errors="replace").count("closed the peer of prefill worker")


with Cluster(MODEL, 2, 1, "ucx", router_args=FAST + ["--policy", "round-robin"],
             decode_args=["--kv-peer-idle-ms", "300"]) as cl:
    cl.wait_ready()
    c = cl.client()
    start = free_blocks(c)
    victim = cl.prefill[0]
    victim.signal(signal.SIGSTOP)  # frozen: its prefills cannot finish before the kill
    reqs = send_golden(c, 16)
    time.sleep(0.2)
    victim.signal(signal.SIGKILL)
    res = c.wait_all([r for _, r in reqs], timeout=120)
    retried = 0
    for (g, _), r in zip(reqs, res):
        check_exact(f"prefill kill {g['prompt']!r}", g, r)
        retried += bool(r.usage and r.usage.retries)
    f.check(retried > 0, "prefill kill: no prefill was retried")
    blocks_back("prefill kill", c, start, alive_names(c))
    # the decode worker closes the peers no task holds (the dead worker's too, whose
    # endpoint, or on a GPU its pool mapping, would otherwise stay for good), and a
    # later request from the surviving worker connects again
    deadline = time.time() + 10
    while time.time() < deadline and peer_closes(cl.decode[0]) < 2:
        time.sleep(0.1)
    f.check(peer_closes(cl.decode[0]) >= 2,
            f"prefill kill: {peer_closes(cl.decode[0])} idle peers closed, not 2")
    (r,) = c.wait_all([c.generate(prompt=lines[0]["prompt"],
                                  max_tokens=len(lines[0]["greedy_ids"]))], timeout=60)
    check_exact("prefill kill, after the idle peers closed", lines[0], r)
    c.close()

# ---- a reservation whose prefill never arrives -----------------------------------------
with Cluster(MODEL, 1, 1, "ucx",
             router_args=["--heartbeat-ms", "50", "--dead-ms", "5000", "--lease-ms", "800"]
             ) as cl:
    cl.wait_ready()
    c = cl.client()
    start = free_blocks(c)
    dname = [k for k in start if k.startswith("decode")][0]
    p = cl.prefill[0]
    p.signal(signal.SIGSTOP)
    g = lines[0]
    rid = c.generate(prompt=g["prompt"] * 20, max_tokens=8)  # several blocks reserved
    # the decode worker reserves, then releases at the end of the lease
    saw_reserved = False
    deadline = time.time() + 10
    while time.time() < deadline:
        now = free_blocks(c).get(dname, (None,))[0]
        if now is not None and now < start[dname][0]:
            saw_reserved = True
        if saw_reserved and now == start[dname][0]:
            break
        time.sleep(0.05)
    f.check(saw_reserved, "lease: the decode worker never reserved blocks")
    f.check(free_blocks(c).get(dname, (None,))[0] == start[dname][0],
            "lease: the reservation was not released after the lease")
    p.signal(signal.SIGCONT)
    # the router re-ran it at each expired lease; with the prefill worker frozen
    # throughout, it ends with an error once the re-runs are spent (or completes, if
    # the worker came back in time): either way it ends, and nothing stays reserved
    (r,) = c.wait_all([rid], timeout=60)
    f.check(r.done and (len(r.ids) == 8 or (r.error and r.error[0] == 13)),
            f"lease: the request ended with {r.error} after {len(r.ids)} ids")
    blocks_back("lease", c, start)
    c.close()

# ---- a prefill worker frozen mid-transfer, resumed after the leases ended ---------------
with Cluster(MODEL, 2, 1, "ucx",
             router_args=["--heartbeat-ms", "50", "--dead-ms", "400", "--lease-ms", "600",
                          "--policy", "round-robin"],
             prefill_args=["--kv-layerwise-min", "1", "--batch", "16"],
             decode_args=["--kv-blocks", "160"]) as cl:
    cl.wait_ready()
    c = cl.client()
    start = free_blocks(c)
    slow = cl.prefill[0]
    reqs = send_golden(c, 24)
    time.sleep(0.01)
    slow.signal(signal.SIGSTOP)
    more = send_golden(c, 24)  # these reuse blocks the frozen worker's readers held
    time.sleep(1.5)  # leases over, the frozen worker declared dead
    slow.signal(signal.SIGCONT)
    res = c.wait_all([r for _, r in reqs + more], timeout=180)
    for (g, _), r in zip(reqs + more, res):
        check_exact(f"sigstop {g['prompt']!r}", g, r)
    # the resumed worker registers again and serves exactly as well
    cl.wait_ready(2, 1)
    after = send_golden(c, 8)
    for (g, _), r in zip(after, c.wait_all([r for _, r in after], timeout=60)):
        check_exact(f"after sigcont {g['prompt']!r}", g, r)
    blocks_back("sigstop", c, start)
    c.close()

# ---- cancellation and a client that goes away --------------------------------------------
with Cluster(MODEL, 1, 1, "zmq", router_args=["--dead-ms", "20000"]) as cl:
    cl.wait_ready()
    c = cl.client()
    start = free_blocks(c)
    g = lines[0]
    # the prefill worker is frozen while the request goes in and is cancelled, so the
    # cancel lands before the first token however the test process is scheduled (a
    # loaded machine once let all 250 tokens out between the two sends)
    pw = cl.prefill[0]
    pw.signal(signal.SIGSTOP)
    early = c.generate(prompt=g["prompt"], max_tokens=250)
    c.cancel(early)
    deadline = time.time() + 10
    while time.time() < deadline and not any(
            e.HasField("cancel_reply") and e.request_id == early for e in c.inbox):
        c.poll(50)
    pw.signal(signal.SIGCONT)
    # among 31 others, so that its 250 tokens take seconds
    others = [c.generate(prompt=g["prompt"], max_tokens=250) for _ in range(31)]
    late = c.generate(prompt=g["prompt"], max_tokens=250)
    deadline = time.time() + 10
    while time.time() < deadline and not c.results[late].ids:
        c.poll(2)
    c.cancel(late)
    c.wait_all(others + [early, late], timeout=120)
    deadline = time.time() + 5
    while time.time() < deadline and sum(e.HasField("cancel_reply") for e in c.inbox) < 2:
        c.poll(50)
    replies = [e for e in c.inbox if e.HasField("cancel_reply") and e.cancel_reply.found]
    for name, rid in (("before the first token", early), ("mid-stream", late)):
        r = c.results[rid]
        most = 0 if rid == early else 249
        f.check(r.done and r.finish == "cancelled" and len(r.ids) <= most,
                f"cancel {name}: finish {r.finish} error {r.error} ids {len(r.ids)}")
    f.check(len(replies) == 2, f"cancel: {len(replies)} CANCEL_REPLYs")
    blocks_back("cancel", c, start)
    # a client that disappears with requests in flight
    gone = cl.client()
    for _ in range(4):
        gone.generate(prompt=g["prompt"], max_tokens=250)
    time.sleep(0.05)
    gone.close()
    blocks_back("client gone", c, start)
    # and the cluster still serves
    rid = c.generate(prompt=g["prompt"], max_tokens=len(g["greedy_ids"]))
    check_exact("after cancels", g, c.wait_all([rid], timeout=60)[0])
    c.close()

# ---- SIGTERM drains ------------------------------------------------------------------------
with Cluster(MODEL, 1, 2, "ucx", router_args=FAST) as cl:
    cl.wait_ready()
    c = cl.client()
    reqs = send_golden(c, 16)
    f.check(wait_any_partial(c, reqs), "drain: nothing was streaming")
    d = cl.decode[0]
    d.signal(signal.SIGTERM)
    res = c.wait_all([r for _, r in reqs], timeout=120)
    for (g, _), r in zip(reqs, res):
        check_exact(f"drain {g['prompt']!r}", g, r)
    f.check(d.wait(30) == 0, f"drain: the decode worker exited with {d.p.returncode}")
    h = c.health()
    f.check(h is not None and h.decode_workers == 1,
            f"drain: the router still counts {h.decode_workers if h else None} decode workers")
    cl.router.signal(signal.SIGTERM)
    f.check(cl.router.wait(30) == 0, f"drain: the router exited with {cl.router.p.returncode}")
    c.close()

f.finish()
