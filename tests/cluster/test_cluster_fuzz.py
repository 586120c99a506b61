"""Seeded fuzzing of real processes; every loop is bounded in count and time, and the
processes are killed at the end.

test_bad_prefill_peer: a real pd-decode (ZeroMQ KV transport, --local-prefill) behind
the real pd-router, and a FAKE prefill worker that answers each prefill task with a
random script: every layer's rows in order and a KV_DONE whose checksum cannot match
them, or KV_DATA with rows of the right or a wrong size for random layers and
positions (inside and outside the reservation), KV_DONE with random first tokens,
token counts, checksums and block lists, KV_READY (which this transport never
sends), TASK_FAILED, silence, a fifth of the messages with mutated bytes. pd-decode
must refuse what is wrong, fail or finish each task and stay up; afterwards a short
prompt, prefilled on pd-decode itself, gives pdctl generate's greedy ids, and SIGTERM
ends pd-decode with status 0 (under ASan: nothing leaked).

test_bad_decode_peer: a real pd-prefill (UCX) and a FAKE decode worker that answers
each decode task with random KV_TARGET (odd block counts and leases), KV_RELEASE,
TASK_FAILED, TOKEN_CHUNK or silence, a fifth mutated. pd-prefill must stay up and,
once the requests ended (at their deadline at the latest), have every block free
again (released, cancelled or out of its hold); then a real pd-decode gets pdctl
generate's greedy ids from it, and both exit 0 on SIGTERM.

test_garbage_at_cluster: pd-router, pd-prefill and pd-decode (UCX) get random and
mutated envelopes, noise and extra frames on both of the router's sockets from six
peers, while an honest client's greedy requests run among them: every one of those
gives pdctl generate's ids, every process stays up, and all exit cleanly on SIGTERM.

PD_FUZZ_SEED=N replays another seed."""
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "router"))
sys.path.insert(0, os.path.join(HERE, "..", "support"))
import zmq  # noqa: E402
from routerlib import BIN, MODEL, SLOW, Timeout, envelope, pb, run  # noqa: E402
import pdcluster  # noqa: E402
import pdfuzz  # noqa: E402

SEED = int(os.environ.get("PD_FUZZ_SEED", "1"))
PROMPT = "Once upon a time"  # 5 tokens with BOS: local prefill under --local-prefill-max 8


def log_of(path):
    with open(path, errors="replace") as fh:
        return fh.read()


def reference(prompt, n):
    return pdcluster.reference(["--model", MODEL], prompt, n)


class RealWorkers:
    """pd-prefill / pd-decode processes on a routerlib cluster, logging to temp files;
    close() kills what is left and prints the logs when a check failed."""

    def __init__(self, c):
        self.c, self.procs, self.logs = c, [], []

    def start(self, binary, name, transport, *extra):
        """Starts one; whether it registered within 30 s."""
        logf = tempfile.NamedTemporaryFile(prefix=f"{binary}-", suffix=".log", delete=False)
        self.logs.append(logf.name)
        self.procs.append(subprocess.Popen(
            [os.path.join(BIN, binary), "--model", MODEL, "--router", self.c.worker_ep,
             "--threads", "1", "--kv-transport", transport, "--name", name, *extra],
            stdout=logf, stderr=logf))
        logf.close()
        end = time.monotonic() + 30 * SLOW
        while "registered" not in log_of(logf.name) and time.monotonic() < end:
            self.c.sleep(0.05)
        return "registered" in log_of(logf.name)

    def terminate(self):
        """SIGTERM to each; their exit statuses (None: still running after 30 s)."""
        for p in self.procs:
            p.terminate()
        rcs = []
        for p in self.procs:
            try:
                rcs.append(p.wait(30 * SLOW))
            except subprocess.TimeoutExpired:
                rcs.append(None)
        return rcs

    def close(self, f):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for path in self.logs:
            if f.items:
                print(f"---- {path} (tail) ----\n" + log_of(path)[-4000:])
            os.unlink(path)


def collect_ended(cl, done):
    """Adds to done the ids of cl's requests that ended (an ERROR or a last chunk)."""
    cl._recv_some(0)
    for e, _ in cl.inbox:
        if e.method == pb.ERROR or (e.method == pb.CHUNK and e.chunk.finish_reason):
            done.add(e.request_id)
    cl.inbox = [x for x in cl.inbox if x[0].request_id not in done]


def kv_rows(r, p, t, n_ids, row_bytes, n_layers):
    """Every layer's rows in order, in random pieces of random bytes (the shape is
    right, the checksum in the KV_DONE after them cannot be)."""
    for layer in range(n_layers):
        pos = 0
        while pos < n_ids:
            n = min(n_ids - pos, r.choice([1, 7, 256]))
            body = pb.KvData(layer=layer, pos0=pos, n_pos=n)
            p.send_raw(envelope(pb.KV_DATA, t, "kv_data", body).SerializeToString(),
                       bytes([r.randrange(256)]) * (2 * n * row_bytes))
            pos += n


def kv_script(r, p, t, n_ids, row_bytes, n_layers):
    """One random answer of the fake prefill worker to task t (n_ids prompt tokens)."""
    if r.random() < 0.4:
        kv_rows(r, p, t, n_ids, row_bytes, n_layers)
        if r.random() < 0.8:
            body = pb.KvDone(first_token=r.randrange(512), n_tokens=n_ids,
                             checksum=r.randrange(2 ** 64),
                             rng_state=[r.randrange(2 ** 64) for _ in range(4)])
            p.task_msg(pb.KV_DONE, t, "kv_done", body)
            return
    for _ in range(r.randrange(1, 9)):
        x = r.random()
        if x < 0.45:
            n_pos = r.choice([1, n_ids, r.randrange(1, 300), 0, 257])
            pos0 = r.choice([0, 0, r.randrange(0, n_ids + 1), n_ids, 2 ** 31, 2 ** 32 - 1])
            layer = r.choice([0, r.randrange(n_layers), n_layers - 1, n_layers, 2 ** 32 - 1])
            size = r.choice([2 * n_pos * row_bytes] * 3 +
                            [0, 2 * n_pos * row_bytes - 1, 2 * n_pos * row_bytes + 4,
                             n_pos * row_bytes])
            data = bytes(r.randrange(256) for _ in range(min(size, 64))) * (size // 64 + 1)
            body = pb.KvData(layer=layer % 2 ** 32, pos0=pos0 % 2 ** 32, n_pos=n_pos)
            frames = [envelope(pb.KV_DATA, t, "kv_data", body).SerializeToString(),
                      data[:size]]
        elif x < 0.7:
            body = pdfuzz.fill(r, pb.KvDone())
            if r.random() < 0.5:
                body.first_token = r.randrange(512)
                body.n_tokens = n_ids
                body.ClearField("rng_state")
                body.rng_state.extend(r.randrange(2 ** 64) for _ in range(4))
            frames = [envelope(pb.KV_DONE, t, "kv_done", body).SerializeToString()]
        elif x < 0.8:
            body = pdfuzz.fill(r, pb.KvReady())
            frames = [envelope(pb.KV_READY, t, "kv_ready", body).SerializeToString()]
        elif x < 0.9:
            body = pdfuzz.fill(r, pb.TaskFailed())
            frames = [envelope(pb.TASK_FAILED, t, "task_failed", body).SerializeToString()]
        else:
            return  # silence: the reservation's lease runs out on pd-decode
        if r.random() < 0.2:
            frames[0] = pdfuzz.mutate(r, frames[0])
        p.send_raw(*frames)


def test_bad_prefill_peer(f, make):
    r = random.Random(SEED)
    c = make("--kv-transport", "zmq", "--local-prefill-max", "8", "--lease-ms", "1500",
             "--max-retries", "1")
    p = c.worker(pb.PREFILL, "p0", transport=pb.ZMQ)
    f.check(p.register(no_ucx=True).accepted, "the fake prefill worker registers")
    real = RealWorkers(c)
    try:
        f.check(real.start("pd-decode", "d0", "zmq", "--local-prefill", "--kv-blocks", "64"),
                "pd-decode registered")
        d = real.procs[0]
        row_bytes = c.layout["n_kv_heads"] * c.layout["head_dim"] * 4  # f32 KV
        cl = c.client()
        n_req, tasks = 24, 0
        for rid in range(1, n_req + 1):  # prompts past --local-prefill-max: to p0
            ids = [1] + [r.randrange(3, 512) for _ in range(r.randrange(9, 60))]
            cl.generate(rid, prompt_ids=ids, max_tokens=r.choice([1, 4, 16]))
        end = time.monotonic() + 120 * SLOW
        done, waiting = set(), {}
        while len(done) < n_req and time.monotonic() < end and d.poll() is None:
            c.tick()
            p._recv_some(0.02)
            for e, _ in p.inbox:  # TASK_CANCEL needs no answer
                t = e.request_id
                if e.method == pb.PREFILL_TASK:
                    tasks += 1
                    waiting[t] = len(e.prefill_task.ids)
                    if r.random() < 0.2:  # before pd-decode's reservation
                        kv_script(r, p, t, waiting.pop(t), row_bytes, c.layout["n_layers"])
                elif e.method == pb.KV_TARGET and t in waiting:  # D reserved: answer
                    kv_script(r, p, t, waiting.pop(t), row_bytes, c.layout["n_layers"])
            p.inbox = []
            collect_ended(cl, done)
        f.check(d.poll() is None, f"pd-decode is up after {tasks} fuzzed prefill tasks "
                f"(status {d.poll()})")
        f.check(len(done) == n_req, f"every fuzzed request ended: {len(done)} of {n_req}")
        print(f"seed {SEED}: {tasks} prefill tasks answered at random, "
              f"{len(done)} requests ended", flush=True)
        # pd-decode still serves: a short prompt is prefilled on it, greedy, exact
        want = reference(PROMPT, 12)
        cl.generate(1000, prompt=PROMPT, max_tokens=12)
        chunks, err = cl.stream(1000, timeout=60)
        ids = [i for ch in chunks for i in ch.ids]
        f.check(err is None and ids == want, f"local prefill after the fuzz: {ids} == {want}"
                f" ({err and err.error.message})")
        rcs = real.terminate()
        f.check(rcs == [0], f"pd-decode exits 0 on SIGTERM: {rcs}")
        f.check(c.stop() == 0, "pd-router exits 0")
    except Timeout as e:
        f.check(False, f"timeout: {e}")
    finally:
        real.close(f)


def d_script(r, d, t):
    """One random answer of the fake decode worker to task t."""
    for _ in range(r.randrange(1, 5)):
        x = r.random()
        if x < 0.4:
            body = pb.KvTarget(n_blocks=r.choice([0, 1, 4, 2 ** 32 - 1]),
                               lease_until_ms=r.choice([0, 1, 2 ** 64 - 1]))
            method, field = pb.KV_TARGET, "kv_target"
        elif x < 0.65:
            body, method, field = pb.KvRelease(ok=r.random() < 0.5), pb.KV_RELEASE, "kv_release"
        elif x < 0.8:
            body, method, field = pdfuzz.fill(r, pb.TaskFailed()), pb.TASK_FAILED, "task_failed"
        elif x < 0.9:
            body, method, field = (pdfuzz.fill(r, pb.TokenChunk()), pb.TOKEN_CHUNK,
                                   "token_chunk")
        else:
            return  # silence: the prefill worker's hold on its blocks must run out
        frames = [envelope(method, t, field, body).SerializeToString()]
        if r.random() < 0.2:
            frames[0] = pdfuzz.mutate(r, frames[0])
        d.send_raw(*frames)


def prefill_load(c, name):
    st = c.client().call(pb.STATS, "stats", pb.STATS_REPLY).stats_reply
    for w in st.workers:
        if w.name == name and w.alive:
            return w.load
    return None


def test_bad_decode_peer(f, make):
    r = random.Random(SEED)
    c = make("--lease-ms", "1500", "--max-retries", "1")
    real = RealWorkers(c)
    try:
        f.check(real.start("pd-prefill", "p0", "ucx", "--kv-blocks", "256"),
                "pd-prefill registered")
        d = c.worker(pb.DECODE, "fd0")
        f.check(d.register().accepted, "the fake decode worker registers")
        total = prefill_load(c, "p0").total_blocks
        cl = c.client()
        n_req, tasks, done = 24, 0, set()
        # a decode worker that heartbeats but never finishes holds a request until its
        # client's deadline (the router has no progress timeout of its own)
        deadline = int(time.time() * 1000) + 10000 * SLOW
        for rid in range(1, n_req + 1):
            ids = [1] + [r.randrange(3, 512) for _ in range(r.randrange(1, 80))]
            cl.generate(rid, prompt_ids=ids, max_tokens=r.choice([1, 4]),
                        deadline_ms=deadline)
        end = time.monotonic() + 120 * SLOW
        while len(done) < n_req and time.monotonic() < end and real.procs[0].poll() is None:
            c.tick()
            d._recv_some(0.02)
            for e, _ in d.inbox:  # KV_READY, KV_DONE, TASK_CANCEL need no answer
                if e.method == pb.DECODE_TASK:
                    tasks += 1
                    d_script(r, d, e.request_id)
            d.inbox = []
            collect_ended(cl, done)
        f.check(real.procs[0].poll() is None, f"pd-prefill is up after {tasks} fuzzed "
                f"decode tasks (status {real.procs[0].poll()})")
        f.check(len(done) == n_req, f"every fuzzed request ended: {len(done)} of {n_req}")
        # every block comes back: released, cancelled or out of its hold (lease)
        d.auto_hb = False
        d.send(envelope(pb.DEREGISTER, 0, "deregister", pb.Deregister(worker_id=d.id)))
        end = time.monotonic() + 30 * SLOW
        load = prefill_load(c, "p0")
        while (load is None or load.free_blocks != total) and time.monotonic() < end:
            c.sleep(0.2)
            load = prefill_load(c, "p0")
        f.check(load is not None and load.free_blocks == total and load.held_blocks == 0,
                f"pd-prefill has all {total} blocks back: {load}")
        print(f"seed {SEED}: {tasks} decode tasks answered at random, {len(done)} requests "
              f"ended", flush=True)
        # pd-prefill still serves: with a real decode worker the request is exact
        f.check(real.start("pd-decode", "d0", "ucx"), "pd-decode registered")
        want = reference(PROMPT, 12)
        cl.generate(1000, prompt=PROMPT, max_tokens=12)
        chunks, err = cl.stream(1000, timeout=60)
        ids = [i for ch in chunks for i in ch.ids]
        f.check(err is None and ids == want, f"after the fuzz: {ids} == {want}"
                f" ({err and err.error.message})")
        f.check(chunks and chunks[-1].usage.prefill_worker == "p0",
                "prefilled by pd-prefill, not locally")
        rcs = real.terminate()
        f.check(rcs == [0, 0], f"pd-prefill and pd-decode exit 0 on SIGTERM: {rcs}")
        f.check(c.stop() == 0, "pd-router exits 0")
    except Timeout as e:
        f.check(False, f"timeout: {e}")
    finally:
        real.close(f)


def garbage_frames(r):
    env = pb.Envelope(version=r.choice([1, 1, 1, 0, 2]), method=r.choice(
        [v.number for v in pb.Method.DESCRIPTOR.values] + [77]),
        request_id=r.choice([r.randrange(1, 50), r.randrange(2 ** 64)]))
    if r.random() < 0.3:
        env.method, env.version = pb.GENERATE, 1
        pdfuzz.fill(r, env.generate)
        env.generate.SetInParent()
    else:
        field = r.choice([fd.name for fd in pb.Envelope.DESCRIPTOR.oneofs[0].fields])
        if r.random() < 0.7 and field.upper() in pb.Method.keys():
            env.method = pb.Method.Value(field.upper())  # the body the method wants
        pdfuzz.fill(r, getattr(env, field))
        getattr(env, field).SetInParent()
    data = env.SerializeToString()
    x = r.random()
    if x < 0.35:
        data = pdfuzz.mutate(r, data)
    elif x < 0.45:
        data = pdfuzz.noise(r)
    frames = [data]
    if r.random() < 0.15:
        frames.append(pdfuzz.noise(r, 100) * r.choice([1, 700]))
    if r.random() < 0.05:
        frames.insert(0, b"")
    return frames


def test_garbage_at_cluster(f, make):
    del make  # this test runs the whole cluster (tests/support/pdcluster.py)
    r = random.Random(SEED)
    n_events = 6000
    with pdcluster.Cluster(["--model", MODEL]) as cl:
        cl.wait_ready()
        want = reference(PROMPT, 16)
        peers = []
        for ep in (cl.client_endpoint, cl.worker_endpoint):
            for _ in range(3):
                s = cl.ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(ep)
                peers.append(s)
        honest = cl.client()
        rids = []
        end = time.monotonic() + 120 * SLOW
        sent = 0
        try:
            for i in range(n_events):
                if time.monotonic() > end:
                    break
                if i % 400 == 0:
                    rids.append(honest.generate(prompt=PROMPT, max_tokens=16))
                r.choice(peers).send_multipart(garbage_frames(r))
                sent += 1
                for s in peers:
                    while s.poll(0):
                        s.recv_multipart()
                honest.poll(0)
                if i % 500 == 0 and not all(p.alive() for p in cl.procs):
                    break
            f.check(all(p.alive() for p in cl.procs),
                    f"every process is up after {sent} garbage messages:\n"
                    + "".join(p.name + " " for p in cl.procs if not p.alive()))
            honest.wait_all(rids, timeout=120 * SLOW)
            bad = [(q, honest.results[q].ids, honest.results[q].error) for q in rids
                   if honest.results[q].ids != want]
            f.check(not bad, f"the honest client's {len(rids)} requests give pdctl generate's "
                    f"ids among the garbage: {bad[:2]}")
            h = honest.health(timeout=5 * SLOW)
            f.check(h is not None and h.ok, f"HEALTH ok after the garbage: {h}")
            st = honest.stats(timeout=5 * SLOW)
            # the garbage arrived: mutated, noise and wrong-version frames are a third
            f.check(st is not None and st.bad_frames >= sent // 5,
                    f"the router counted {st and st.bad_frames} of {sent} as bad frames")
            print(f"seed {SEED}: {sent} garbage messages ({st and st.bad_frames} bad frames),"
                  f" {len(rids)} honest requests", flush=True)
        finally:
            for s in peers:
                s.close(0)
            honest.close()
        why = None
        try:
            cl.shutdown()
        except RuntimeError as e:
            why = str(e)
        f.check(why is None, f"every process exits cleanly on SIGTERM: {why}")


if __name__ == "__main__":
    run([test_bad_prefill_peer, test_bad_decode_peer, test_garbage_at_cluster])
