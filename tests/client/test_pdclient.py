"""libpdclient, `pdctl complete`, `pdctl bench` and the Python example client against a
FAKE router: a pyzmq ROUTER in a thread of this process that speaks the client side of
docs/protocol.md (GENERATE -> CHUNK stream or ERROR, CANCEL, HEALTH, STATS).

The fake router streams one token every TOKEN_MS per request (fake ids 100+i, text
" t<i>"), answers the prompt "error" with ERROR(INVALID_ARGUMENT), never answers the
prompt "silent", and records every envelope it receives. The library's own calls are
driven by build/tests/pdclient_probe (one scenario per run, JSON on stdout)."""
import heapq
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import pdtest  # noqa: E402

BIN = pdtest.BIN
BUILD = os.path.dirname(os.path.abspath(BIN))
sys.path.insert(0, os.path.join(BUILD, "python"))
import pd_pb2  # noqa: E402

PROBE = os.path.join(BUILD, "tests", "pdclient_probe")
SOURCE = os.environ.get("PD_SOURCE_DIR") or os.path.join(os.path.dirname(__file__),
                                                         "..", "..")
EXAMPLE = os.path.join(SOURCE, "examples", "python", "pd_client.py")
TOKEN_MS = 4


def fake_tokenize(prompt):
    return [1] + [3 + (ord(ch) % 250) for ch in prompt]


class FakeRouter(threading.Thread):
    def __init__(self, token_ms=TOKEN_MS, tokens_per_chunk=1):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.token_ms = token_ms
        self.per_chunk = tokens_per_chunk
        self.received = []  # (method, request_id, deadline_ms, envelope)
        self.lock = threading.Lock()
        self.streams = {}  # (ident, rid) -> dict
        self.due = []  # heap of (time, seq, key)
        self.seq = 0
        self.stop_flag = threading.Event()
        self.generates = 0

    def stop(self):
        self.stop_flag.set()
        self.join(timeout=5)
        self.sock.close(0)
        self.ctx.term()

    def log(self):
        with self.lock:
            return list(self.received)

    def send(self, ident, env):
        env.version = 1
        self.sock.send_multipart([ident, env.SerializeToString()])

    def error(self, ident, rid, code, msg):
        env = pd_pb2.Envelope(method=pd_pb2.ERROR, request_id=rid)
        env.error.code = code
        env.error.message = msg
        self.send(ident, env)

    def schedule(self, key, t):
        self.seq += 1
        heapq.heappush(self.due, (t, self.seq, key))

    def on_generate(self, ident, env):
        g = env.generate
        rid = env.request_id
        self.generates += 1
        if (ident, rid) in self.streams:
            return self.error(ident, rid, pd_pb2.DUPLICATE, "request id in flight")
        if not g.prompt and not g.prompt_ids:
            return self.error(ident, rid, pd_pb2.INVALID_ARGUMENT, "empty prompt")
        if g.prompt == "error":
            return self.error(ident, rid, pd_pb2.INVALID_ARGUMENT, "fake: bad prompt")
        if g.prompt == "silent":
            return
        if env.deadline_ms and env.deadline_ms < time.time() * 1000:
            return self.error(ident, rid, pd_pb2.DEADLINE_EXCEEDED, "deadline passed")
        n = g.max_tokens if g.max_tokens > 0 else (256 if g.max_tokens == 0 else 16)
        ids = list(g.prompt_ids) if g.prompt_ids else fake_tokenize(g.prompt)
        st = dict(n=n, sent=0, prompt_ids=ids, t0=time.monotonic(), ttft=None,
                  seed=g.sampling.seed if g.sampling.has_seed else 4242,
                  no_text=g.no_text, mode=g.prompt)
        self.streams[(ident, rid)] = st
        self.schedule((ident, rid), time.monotonic() + self.token_ms / 1000)

    def usage(self, st):
        u = pd_pb2.Usage(prompt_tokens=len(st["prompt_ids"]), completion_tokens=st["sent"],
                         cached_tokens=2, seed=st["seed"], queue_ms=0.5,
                         ttft_ms=st["ttft"] or 0.0,
                         e2e_ms=(time.monotonic() - st["t0"]) * 1000, retries=0,
                         prefill_worker="fake-p0", decode_worker="fake-d0")
        u.prompt_ids.extend(st["prompt_ids"])
        return u

    def emit(self, key):
        st = self.streams.get(key)
        if st is None:
            return
        ident, rid = key
        k = min(self.per_chunk, st["n"] - st["sent"])
        env = pd_pb2.Envelope(method=pd_pb2.CHUNK, request_id=rid)
        env.chunk.index = st["sent"]
        env.chunk.ids.extend(100 + ((st["sent"] + j) % 50) for j in range(k))
        if not st["no_text"]:
            env.chunk.text = "".join(f" t{st['sent'] + j}" for j in range(k))
        st["sent"] += k
        if st["ttft"] is None:
            st["ttft"] = (time.monotonic() - st["t0"]) * 1000
        if st["sent"] >= st["n"]:
            env.chunk.finish_reason = "length"
            env.chunk.usage.CopyFrom(self.usage(st))
            del self.streams[key]
        else:
            self.schedule(key, time.monotonic() + self.token_ms / 1000)
        if st["mode"] == "gap" and env.chunk.index == 1:
            return  # a lost chunk: the client must notice the gap
        self.send(ident, env)
        if st["mode"] == "dup":
            self.send(ident, env)  # a repeated chunk: the client must drop it

    def on_cancel(self, ident, env):
        key = (ident, env.request_id)
        st = self.streams.pop(key, None)
        if st is not None:
            fin = pd_pb2.Envelope(method=pd_pb2.CHUNK, request_id=env.request_id)
            fin.chunk.index = st["sent"]
            fin.chunk.finish_reason = "cancelled"
            fin.chunk.usage.CopyFrom(self.usage(st))
            self.send(ident, fin)
        rep = pd_pb2.Envelope(method=pd_pb2.CANCEL_REPLY, request_id=env.request_id)
        rep.cancel_reply.found = st is not None
        self.send(ident, rep)

    def on_health(self, ident, env):
        rep = pd_pb2.Envelope(method=pd_pb2.HEALTH_REPLY, request_id=env.request_id)
        rep.health_reply.ok = True
        rep.health_reply.prefill_workers = 1
        rep.health_reply.decode_workers = 2
        rep.health_reply.model = "fake-model"
        self.send(ident, rep)

    def on_stats(self, ident, env):
        rep = pd_pb2.Envelope(method=pd_pb2.STATS_REPLY, request_id=env.request_id)
        r = rep.stats_reply
        for i, (role, free) in enumerate([(pd_pb2.PREFILL, 90), (pd_pb2.DECODE, 77)]):
            w = r.workers.add(worker_id=11 + i, name=f"fake-w{i}", role=role, alive=True,
                              last_heartbeat_ms_ago=12.5)
            w.load.free_blocks = free
            w.load.total_blocks = 128
            w.load.running = i + 1
            w.load.waiting = 3
            w.load.queued_prefill_tokens = 4000 + i
            w.load.reserved_blocks = 5
            w.load.held_blocks = 6
            w.load.kv_bytes = 1 << 33
            w.load.steps = 700 + i
            w.load.forward_s = 2.5
            w.load.sample_s = 0.75
            w.load.sample_threads = 8
        r.requests_total = self.generates
        r.requests_in_flight = len(self.streams)
        r.requests_failed = 1
        r.retries = 2
        r.tokens_out = 12345
        r.bad_frames = 3
        self.send(ident, rep)

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop_flag.is_set():
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, key = heapq.heappop(self.due)
                self.emit(key)
            wait = 20 if not self.due else max(0, min(20, (self.due[0][0] - now) * 1000))
            for _ in range(1000):
                if not poller.poll(wait):
                    break
                wait = 0
                ident, frame = self.sock.recv_multipart()
                env = pd_pb2.Envelope()
                env.ParseFromString(frame)
                with self.lock:
                    self.received.append((env.method, env.request_id, env.deadline_ms, env))
                handler = {pd_pb2.GENERATE: self.on_generate, pd_pb2.CANCEL: self.on_cancel,
                           pd_pb2.HEALTH: self.on_health, pd_pb2.STATS: self.on_stats}
                h = handler.get(env.method)
                if h:
                    h(ident, env)
                else:
                    self.error(ident, env.request_id, pd_pb2.UNKNOWN_METHOD, "fake")


def probe(ep, *args, timeout=30):
    p = subprocess.run([pdtest.require(PROBE), ep, *map(str, args)], capture_output=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"probe {args} failed ({p.returncode}): "
                           f"{p.stderr.decode(errors='replace')}")
    return json.loads(p.stdout)


def pdctl(*args, timeout=60):
    p = subprocess.run([pdtest.require(pdtest.PDCTL), *map(str, args)], capture_output=True,
                       timeout=timeout)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def expected_text(n):
    return "".join(f" t{i}" for i in range(n))


def test_library(f, ep, router):
    # streaming: every chunk in order, text, finish and usage on the last
    r = probe(ep, "generate", "Once upon a time", 12, 5000)
    f.check(r["status"] == 0 and r["code_name"] == "OK", f"generate failed: {r}")
    f.check(r["chunk_index"] == list(range(12)), f"chunk order {r['chunk_index']}")
    f.check(r["text"] == expected_text(12), f"text {r['text']!r}")
    f.check(r["ids"] == [100 + i for i in range(12)], f"ids {r['ids']}")
    f.check(r["finish_reason"] == "length", f"finish {r['finish_reason']}")
    f.check(r["has_usage"] and r["usage"]["completion_tokens"] == 12
            and r["usage"]["seed"] == 7 and r["usage"]["cached_tokens"] == 2
            and r["usage"]["prefill_worker"] == "fake-p0"
            and r["usage"]["prompt_ids"] == fake_tokenize("Once upon a time"),
            f"usage {r.get('usage')}")
    f.check(0 < r["client_ttft_ms"] <= r["client_e2e_ms"], f"client timings {r}")
    gen = [e for (m, rid, dl, e) in router.log()
           if m == pd_pb2.GENERATE and rid == r["request_id"]]
    f.check(len(gen) == 1 and gen[0].generate.prompt == "Once upon a time"
            and gen[0].generate.max_tokens == 12 and gen[0].generate.sampling.has_seed
            and gen[0].generate.sampling.seed == 7 and gen[0].version == 1,
            "the GENERATE envelope as sent")
    now_ms = time.time() * 1000
    f.check(gen and now_ms - 10000 < gen[0].deadline_ms <= now_ms + 5000,
            f"deadline on the wire {gen[0].deadline_ms if gen else None} vs {now_ms}")

    # a repeated chunk is dropped; a missing one fails the request
    r = probe(ep, "generate", "dup", 6, 5000)
    f.check(r["status"] == 0 and r["text"] == expected_text(6)
            and r["chunk_index"] == list(range(6)), f"dup {r}")
    r = probe(ep, "generate", "gap", 6, 5000)
    f.check(r["status"] < 0 and r["code_name"] == "PROTOCOL" and r["chunk_index"] == [0]
            and "expected 1" in r["message"], f"gap {r}")

    # an ERROR reply
    r = probe(ep, "generate", "error", 5, 5000)
    f.check(r["status"] < 0 and r["code_name"] == "INVALID_ARGUMENT"
            and "fake: bad prompt" in r["message"], f"error reply {r}")

    # a router that never answers: bounded, TIMEOUT, and a CANCEL follows
    t0 = time.monotonic()
    r = probe(ep, "generate", "silent", 5, 300)
    dt = time.monotonic() - t0
    f.check(r["code_name"] == "TIMEOUT" and r["status"] < 0, f"timeout {r}")
    f.check(0.3 <= r["elapsed_ms"] / 1000 < 2.0 and dt < 5, f"timeout took {dt:.2f} s")
    time.sleep(0.1)
    cancels = [rid for (m, rid, _, _) in router.log() if m == pd_pb2.CANCEL]
    f.check(r["request_id"] in cancels, f"no CANCEL for timed-out {r['request_id']}")

    # cancel from the chunk callback of pdc_generate
    r = probe(ep, "cbcancel", "Once upon a time")
    f.check(r["status"] == 0 and r["finish_reason"] == "cancelled", f"cbcancel {r}")
    f.check(r["chunk_index"] == [0, 1], f"chunks after the cancel: {r['chunk_index']}")
    f.check(len(r["ids"]) < 1000, "the stream was not stopped")

    # async cancel: CANCEL with the request id of the Generate
    r = probe(ep, "cancel")
    time.sleep(0.1)
    cancels = [e for (m, rid, _, e) in router.log() if m == pd_pb2.CANCEL]
    f.check(any(e.request_id == r["id0"] and e.WhichOneof("body") == "cancel"
                for e in cancels), f"CANCEL for {r['id0']} not seen")
    f.check(r["finish0"] == "cancelled" and r["n_done"] == 1 and r["cancel_found"]
            and r["cancel_replies"] == 1 and r["in_flight"] == 0, f"async cancel {r}")

    # many requests on one socket
    r = probe(ep, "async", 200, 10)
    f.check(r["n_done"] == 200 and r["not_done_once"] == 0 and r["errors"] == 0
            and r["bad_order"] == 0 and r["in_flight"] == 0, f"async {r}")
    # a blocking call while async streams run keeps their replies
    r = probe(ep, "mixed")
    f.check(r["health_ok"] == 1 and r["n_done"] == 8 and r["bad_order"] == 0
            and r["not_done_once"] == 0, f"mixed {r}")

    # health and stats
    h = probe(ep, "health")
    f.check(h["status"] == 0 and h["ok"] and h["prefill_workers"] == 1
            and h["decode_workers"] == 2 and h["model"] == "fake-model", f"health {h}")
    s = probe(ep, "stats")
    f.check(s["status"] == 0 and len(s["workers"]) == 2, f"stats {s}")
    if len(s["workers"]) == 2:
        w0, w1 = s["workers"]
        f.check(w0["free_blocks"] == 90 and w1["free_blocks"] == 77
                and w0["total_blocks"] == 128 and w0["role"] == 1 and w1["role"] == 2
                and w1["name"] == "fake-w1" and w0["alive"] and w1["running"] == 2
                and w0["queued_prefill_tokens"] == 4000 and w0["reserved_blocks"] == 5
                and w0["held_blocks"] == 6 and w0["kv_bytes"] == 1 << 33
                and w1["steps"] == 701 and w0["forward_s"] == 2.5
                and w0["sample_s"] == 0.75 and w0["sample_threads"] == 8
                and w0["last_heartbeat_ms_ago"] == 12.5, f"worker stats {s['workers']}")
    f.check(s["requests_failed"] == 1 and s["retries"] == 2 and s["tokens_out"] == 12345
            and s["bad_frames"] == 3 and s["requests_total"] > 0, f"stats counters {s}")

    # health against nothing at all: bounded
    t0 = time.monotonic()
    dead = "tcp://127.0.0.1:1"
    h = probe(dead, "health")
    f.check(h["status"] < 0 and h["code_name"] == "TIMEOUT"
            and time.monotonic() - t0 < 5, f"health of nobody {h}")


def test_complete(f, ep, router):
    rc, out, err = pdctl("complete", "--router", ep, "--prompt", "Hello", "--max-tokens",
                         7)
    f.check(rc == 0 and out == expected_text(7) + "\n", f"complete text rc={rc} "
            f"out={out!r} err={err}")
    rc, out, err = pdctl("complete", "--router", ep, "--prompt-ids", "1,5,9",
                         "--max-tokens", 5, "--seed", 99, "--temperature", 0.5,
                         "--top-p", 0.9, "--top-k", 40, "--min-p", 0.05, "--ignore-eos",
                         "--format", "json")
    f.check(rc == 0, f"complete json rc={rc} err={err}")
    j = json.loads(out) if rc == 0 else {}
    f.check(j.get("prompt_ids") == [1, 5, 9] and j.get("ids") == [100 + i for i in range(5)]
            and j.get("text") == expected_text(5) and j.get("finish_reason") == "length"
            and j.get("seed") == 99 and j.get("cached_tokens") == 2
            and j.get("prompt") is None, f"complete json {j}")
    t = j.get("timings", {})
    f.check(0 < t.get("ttft_ms", 0) <= t.get("e2e_ms", 0) and "router_ttft_ms" in t,
            f"complete timings {t}")
    sent = [e for (m, _, _, e) in router.log() if m == pd_pb2.GENERATE
            and list(e.generate.prompt_ids) == [1, 5, 9]]
    f.check(len(sent) == 1, "the complete request as sent")
    if sent:
        g = sent[0].generate
        f.check(g.ignore_eos and g.max_tokens == 5 and g.sampling.has_seed
                and g.sampling.seed == 99 and abs(g.sampling.temperature - 0.5) < 1e-6
                and abs(g.sampling.top_p - 0.9) < 1e-6 and g.sampling.top_k == 40
                and abs(g.sampling.min_p - 0.05) < 1e-6, f"sampling sent {g}")
    rc, out, err = pdctl("complete", "--router", ep, "--prompt", "Hello",
                         "--format", "json")
    j = json.loads(out) if rc == 0 else {}
    f.check(rc == 0 and len(j.get("ids", [])) == 256, "default max tokens 256")
    rc, out, err = pdctl("complete", "--router", ep, "--prompt", "error")
    f.check(rc == 1 and "INVALID_ARGUMENT" in err and "fake: bad prompt" in err,
            f"complete error rc={rc} err={err}")
    t0 = time.monotonic()
    rc, out, err = pdctl("complete", "--router", ep, "--prompt", "silent", "--timeout",
                         "0.3")
    f.check(rc == 1 and "TIMEOUT" in err and time.monotonic() - t0 < 5,
            f"complete timeout rc={rc} err={err}")
    rc, out, err = pdctl("complete", "--router", ep)
    f.check(rc == 2, f"complete without a prompt rc={rc}")
    rc, out, err = pdctl("complete", "--router", ep, "--prompt-ids", "1,x")
    f.check(rc == 2, f"complete with bad ids rc={rc}")


def test_bench(f, ep):
    with tempfile.TemporaryDirectory() as d:
        for name, extra in [("rate", ["--request-rate", "200", "--num-prompts", 40]),
                            ("conc", ["--max-concurrency", 4, "--num-prompts", 24,
                                      "--arrival", "fixed"])]:
            path = os.path.join(d, name + ".json")
            rc, out, err = pdctl("bench", "--router", ep, "--input-len", 32,
                                 "--input-len-range", 0.5, "--output-len", 16,
                                 "--output-len-range", 0.25, "--prefix-len", 8,
                                 "--seed", 3, "--slo-ttft-ms", 1000, "--slo-tpot-ms", 1000,
                                 "--json", path, *extra, timeout=120)
            f.check(rc == 0 and "Serving Benchmark Result" in out,
                    f"bench {name} rc={rc} out={out[-400:]} err={err[-400:]}")
            if rc != 0:
                continue
            with open(path) as fh:
                j = json.load(fh)
            n = j["num_prompts"]
            f.check(j["completed"] == n and j["failed"] == 0, f"bench {name} counts {j}")
            for m in ["ttft", "tpot", "itl", "e2el"]:
                v = [j[f"{s}_{m}_ms"] for s in ["median", "p90", "p99"]]
                f.check(0 < v[0] <= v[1] <= v[2], f"bench {name} {m} percentiles {v}")
                f.check(j[f"mean_{m}_ms"] > 0, f"bench {name} mean {m}")
            f.check(j["request_throughput"] > 0 and j["output_throughput"] > 0
                    and j["total_token_throughput"] > j["output_throughput"]
                    and j["duration"] > 0, f"bench {name} throughput {j}")
            f.check(abs(j["request_throughput"] * j["duration"] - n) < 1e-6 * n + 1e-3,
                    f"bench {name} request throughput x duration != completed")
            # lengths: input = prefix 8 + 16..48, output 12..20 tokens, exact (ignore_eos)
            f.check(n * (8 + 16) <= j["total_input_tokens"] <= n * (8 + 48)
                    and n * 12 <= j["total_output_tokens"] <= n * 20,
                    f"bench {name} token totals {j['total_input_tokens']} "
                    f"{j['total_output_tokens']}")
            f.check(j["itl_samples"] == j["total_output_tokens"] - n,
                    f"bench {name} itl samples {j['itl_samples']}")
            f.check(j["good_requests"] == n and j["request_goodput"] > 0,
                    f"bench {name} goodput {j['good_requests']}")
            # the fake router paces TOKEN_MS per token
            f.check(j["median_itl_ms"] >= TOKEN_MS * 0.8, f"bench {name} itl too small")
        # a tight SLO: goodput counts only requests that meet it
        path = os.path.join(d, "slo.json")
        rc, out, err = pdctl("bench", "--router", ep, "--num-prompts", 10, "--input-len",
                             8, "--output-len", 8, "--slo-tpot-ms", 0.001, "--json", path)
        with open(path) as fh:
            j = json.load(fh)
        f.check(rc == 0 and j["good_requests"] == 0 and j["completed"] == 10,
                f"bench slo {j}")
        # nobody answers: every request fails with TIMEOUT, bounded, exit status 1
        path = os.path.join(d, "dead.json")
        t0 = time.monotonic()
        rc, out, err = pdctl("bench", "--router", "tcp://127.0.0.1:1", "--num-prompts", 5,
                             "--input-len", 8, "--output-len", 4, "--timeout", 0.3,
                             "--json", path)
        with open(path) as fh:
            j = json.load(fh)
        f.check(rc == 1 and j["completed"] == 0 and j["failed"] == 5
                and j["errors"] == {"TIMEOUT": 5} and "TIMEOUT" in (j["first_error"] or "")
                and time.monotonic() - t0 < 5, f"bench without a router rc={rc} {j}")
    # bad options
    rc, _, _ = pdctl("bench", "--router", ep, "--arrival", "sometimes")
    f.check(rc == 2, "bench bad arrival")


def test_python_example(f, ep):
    pydir = os.path.join(BUILD, "python")
    for args in (["--proto-python-dir", pydir], []):
        p = subprocess.run([sys.executable, EXAMPLE, "--router", ep, "--prompt",
                            "Once upon a time", "--max-tokens", "9", *args],
                           capture_output=True, timeout=60)
        out = p.stdout.decode()
        f.check(p.returncode == 0 and out.startswith(expected_text(9)),
                f"python example {args} rc={p.returncode} out={out!r} "
                f"err={p.stderr.decode()[-500:]}")
    p = subprocess.run([sys.executable, EXAMPLE, "--router", ep, "--prompt", "error"],
                       capture_output=True, timeout=60)
    f.check(p.returncode == 1 and b"INVALID_ARGUMENT" in p.stderr,
            f"python example error rc={p.returncode}")
    # no pd_pb2.py anywhere: the example runs protoc on proto/pd.proto itself
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "examples", "python"))
        os.makedirs(os.path.join(d, "proto"))
        shutil.copy(EXAMPLE, os.path.join(d, "examples", "python"))
        shutil.copy(os.path.join(SOURCE, "proto", "pd.proto"), os.path.join(d, "proto"))
        p = subprocess.run([sys.executable, os.path.join(d, "examples", "python",
                                                         "pd_client.py"),
                            "--router", ep, "--prompt-ids", "1,2,3", "--max-tokens", "4",
                            "--seed", "5"],
                           capture_output=True, timeout=60)
        f.check(p.returncode == 0 and p.stdout.decode().startswith(expected_text(4))
                and b"seed 5" in p.stderr,
                f"python example with protoc rc={p.returncode} "
                f"err={p.stderr.decode()[-500:]}")


def main():
    f = pdtest.Failures()
    router = FakeRouter()
    router.start()
    try:
        ep = router.endpoint
        test_library(f, ep, router)
        test_complete(f, ep, router)
        test_bench(f, ep)
        test_python_example(f, ep)
    finally:
        router.stop()
    f.finish()


if __name__ == "__main__":
    main()
