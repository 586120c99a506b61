"""pd-router under seeded random traffic from registered FAKE workers: while a client
sends requests and cancels, the workers answer the tasks they get (and task ids they
never got) with random task messages (KV_TARGET, KV_READY, KV_DONE, KV_RELEASE,
KV_DATA with or without a data frame, TOKEN_CHUNK, TASK_FAILED, heartbeats), a fifth
of them with mutated bytes, and now and then register again or deregister. The
router must stay up through all of it and then still be correct: with the fuzzing
workers gone and the client's requests cancelled, an honest prefill and decode worker
carry a fresh request through the whole flow (every token once, in order, no error),
HEALTH and STATS answer, and SIGTERM ends the router with status 0 (under ASan: no
leak). Bounded in messages and time; PD_FUZZ_SEED picks other seeds."""
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))
from routerlib import SLOW, envelope, pb, run, _BODY_TYPES  # noqa: E402
import pdfuzz  # noqa: E402

SEEDS = [int(s) for s in os.environ.get("PD_FUZZ_SEED", "1,2").split(",")]
N_EVENTS = 3000
TIME_CAP_S = 60 * SLOW

# task messages a worker sends, DEREGISTER rare (it ends the worker's part)
TASK_METHODS = [(pb.KV_TARGET, "kv_target"), (pb.KV_READY, "kv_ready"),
                (pb.KV_DONE, "kv_done"), (pb.KV_RELEASE, "kv_release"),
                (pb.KV_DATA, "kv_data"), (pb.TOKEN_CHUNK, "token_chunk"),
                (pb.TASK_FAILED, "task_failed"), (pb.HEARTBEAT, "heartbeat")]


def drain(peers, tasks):
    """Reads what the router sent the fuzzing peers; remembers the task ids."""
    for p in peers:
        while p.sock.poll(0):
            frames = p.sock.recv_multipart()
            try:
                env = pb.Envelope.FromString(frames[0])
            except Exception:
                continue
            if env.request_id and env.method in (pb.PREFILL_TASK, pb.DECODE_TASK,
                                                 pb.KV_TARGET, pb.KV_READY, pb.KV_DONE,
                                                 pb.KV_RELEASE, pb.KV_DATA):
                tasks.append(env.request_id)
                del tasks[:-64]


def fuzz_phase(f, c, r, seed):
    ws = [c.worker(pb.PREFILL, "fp0"), c.worker(pb.DECODE, "fd0", can_prefill=True),
          c.worker(pb.DECODE, "fd1")]
    for w in ws:
        f.check(w.register().accepted, f"seed {seed}: {w.name} registers")
    cl = c.client()
    tasks, rid, sent = [], 0, 0
    end = time.monotonic() + TIME_CAP_S
    for i in range(N_EVENTS):
        if time.monotonic() > end:
            break
        c.tick()
        x = r.random()
        if x < 0.08:
            rid += 1
            cl.generate(rid, prompt=r.choice(["Once upon a time", "x", "The cat " * 30]),
                        max_tokens=r.choice([0, 1, 5, 50]),
                        temperature=r.choice([0.0, 0.7]))
        elif x < 0.10 and rid:
            cl.send(envelope(pb.CANCEL, r.randrange(1, rid + 2), "cancel"))
        elif x < 0.12:
            r.choice(ws).register()
        elif x < 0.125:
            w = r.choice(ws)
            w.send(envelope(pb.DEREGISTER, 0, "deregister", pb.Deregister(worker_id=w.id)))
        else:
            w = r.choice(ws)
            method, field = r.choice(TASK_METHODS)
            task = r.choice(tasks) if tasks and r.random() < 0.8 else r.randrange(1000)
            body = pdfuzz.fill(r, getattr(pb, _BODY_TYPES[field])())
            if field == "heartbeat" and r.random() < 0.7:
                body.worker_id = w.id
            frames = [envelope(method, task, field, body).SerializeToString()]
            if r.random() < 0.2:
                frames[0] = pdfuzz.mutate(r, frames[0])
            if r.random() < 0.3:
                frames.append(bytes(r.randrange(256) for _ in
                                    range(r.choice([0, 4, 640, 5000]))))
            w.send_raw(*frames)
        sent += 1
        drain(ws + [cl], tasks)
        if c.proc.poll() is not None:
            break
    f.check(c.proc.poll() is None,
            f"seed {seed}: the router is up after {sent} fuzz events "
            f"(exit {c.proc.poll()})")
    # end the fuzzing peers' part: workers leave, the client's requests are cancelled
    for w in ws:
        w.auto_hb = False
        w.send(envelope(pb.DEREGISTER, 0, "deregister", pb.Deregister(worker_id=w.id)))
    for q in range(1, rid + 1):
        cl.send(envelope(pb.CANCEL, q, "cancel"))
    probe = c.client()
    deadline = time.monotonic() + 20 * SLOW
    while True:
        drain(ws + [cl], tasks)
        c.sleep(0.05)
        st = probe.call(pb.STATS, "stats", pb.STATS_REPLY).stats_reply
        gone = not any(wi.alive for wi in st.workers)
        if (st.requests_in_flight == 0 and gone) or time.monotonic() > deadline:
            break
    f.check(st.requests_in_flight == 0,
            f"seed {seed}: every fuzz request ended ({st.requests_in_flight} in flight)")
    f.check(gone, f"seed {seed}: the fuzzing workers are gone")
    return sent


def honest_phase(f, c, seed):
    p = c.worker(pb.PREFILL, "p0")
    d = c.worker(pb.DECODE, "d0")
    f.check(p.register().accepted and d.register().accepted,
            f"seed {seed}: honest workers register after the fuzz")
    cl = c.client()
    cl.generate(7, prompt="Once upon a time", max_tokens=3, temperature=0.0)
    dt = d.expect(pb.DECODE_TASK, timeout=10)
    t = dt.request_id
    f.check(p.expect(pb.PREFILL_TASK, timeout=10).request_id == t,
            f"seed {seed}: one task id for P and D")
    prompt = list(dt.decode_task.ids)
    gen = (prompt[1:] * 3)[:3]
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=gen[0], n_tokens=len(prompt)))
    d.expect(pb.KV_DONE)
    d.task_msg(pb.KV_RELEASE, t, "kv_release", pb.KvRelease(ok=True))
    p.expect(pb.KV_RELEASE)
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=0, ids=gen, finish_reason="length"))
    chunks, err = cl.stream(7)
    ids = [i for ch in chunks for i in ch.ids]
    f.check(err is None, f"seed {seed}: the honest request has no error ({err})")
    f.check(ids == gen and chunks and chunks[-1].finish_reason == "length",
            f"seed {seed}: every token once, in order: {ids} == {gen}")
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY).health_reply
    f.check(h.ok and h.prefill_workers == 1 and h.decode_workers == 1,
            f"seed {seed}: health {h}")


def test_fuzz_workers(f, make):
    for seed in SEEDS:
        c = make("--lease-ms", "2000")
        r = random.Random(seed)
        sent = fuzz_phase(f, c, r, seed)
        honest_phase(f, c, seed)
        s = c.client().call(pb.STATS, "stats", pb.STATS_REPLY).stats_reply
        print(f"seed {seed}: {sent} fuzz events, {s.requests_total} requests, "
              f"{s.bad_frames} bad frames, {s.retries} retries", flush=True)
        f.check(s.bad_frames > 0, f"seed {seed}: the mutated frames were counted bad")
        f.check(c.stop() == 0, f"seed {seed}: the router exits 0 after {sent} fuzz events")


if __name__ == "__main__":
    run([test_fuzz_workers])
