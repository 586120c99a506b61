"""Helpers for the pd-router tests: start the real pd-router on port-0 endpoints with
the real model, and drive it with a Python client and FAKE workers (pyzmq DEALERs
speaking docs/protocol.md). The model digest a fake worker must present comes from
`pd-router --print-digest`; the KV layout (layers, KV heads, head dim) from the
router's start-up log line. Every wait is bounded in time; Cluster.close() kills
what is left (call it in a finally block)."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("PD_BIN_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "bin")
SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(BIN)), "python"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

import zmq  # noqa: E402
import pd_pb2 as pb  # noqa: E402
from pdtest import Failures  # noqa: E402

ROUTER = os.path.join(BIN, "pd-router")
MODEL = os.path.join(SHARED, "models", "stories260K.gguf")
M = pb  # enums live on the module: pb.GENERATE, pb.PREFILL, ...
SLOW = 3 if os.environ.get("PD_ASAN") else 1


class Timeout(Exception):
    pass


_digest = None


def model_digest():
    global _digest
    if _digest is None:
        p = subprocess.run([ROUTER, "--model", MODEL, "--print-digest"],
                           capture_output=True, timeout=60 * SLOW)
        if p.returncode != 0:
            raise RuntimeError(f"--print-digest failed: {p.stderr.decode()}")
        _digest = bytes.fromhex(p.stdout.decode().strip())
    return _digest


def envelope(method, rid=0, field=None, body=None, version=1, deadline_ms=0, trace_id=0):
    env = pb.Envelope(version=version, method=method, request_id=rid,
                      deadline_ms=deadline_ms, trace_id=trace_id)
    if field is not None:
        getattr(env, field).CopyFrom(body if body is not None else
                                     getattr(pb, _BODY_TYPES[field])())
    return env


_BODY_TYPES = {
    "generate": "GenerateRequest", "cancel": "CancelRequest", "health": "HealthRequest",
    "stats": "StatsRequest", "register": "Register", "heartbeat": "Heartbeat",
    "deregister": "Deregister", "kv_target": "KvTarget", "kv_ready": "KvReady",
    "kv_done": "KvDone", "kv_release": "KvRelease", "kv_data": "KvData",
    "token_chunk": "TokenChunk", "task_failed": "TaskFailed", "chunk": "Chunk",
    "task_cancel": "TaskCancel", "drain": "Drain",
}


class Peer:
    """A DEALER with an inbox: expect() pops the first message of a method, keeping the
    others for later; every wait ticks the cluster (heartbeats)."""

    def __init__(self, cluster, endpoint):
        self.cluster = cluster
        self.sock = cluster.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.inbox = []  # (Envelope, data or None)

    def send(self, env, data=None):
        raw = env.SerializeToString()
        if data is None:
            self.sock.send(raw)
        else:
            self.sock.send_multipart([raw, data])

    def send_raw(self, *frames):
        self.sock.send_multipart(list(frames))

    def _recv_some(self, wait_s):
        if self.sock.poll(int(wait_s * 1000)):
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                env = pb.Envelope()
                env.ParseFromString(frames[0])
                self.inbox.append((env, frames[1] if len(frames) > 1 else None))

    def expect(self, method, timeout=5.0, with_data=False, rid=None):
        end = time.monotonic() + timeout * SLOW
        while True:
            for i, (env, data) in enumerate(self.inbox):
                if env.method == method and (rid is None or env.request_id == rid):
                    del self.inbox[i]
                    return (env, data) if with_data else env
            left = end - time.monotonic()
            if left <= 0:
                raise Timeout(f"no {pb.Method.Name(method)} within {timeout}s; inbox: "
                              f"{[pb.Method.Name(e.method) for e, _ in self.inbox]}")
            self.cluster.tick()
            self._recv_some(min(left, 0.02))

    def quiet(self, method, secs):
        """True when no message of method arrives within secs."""
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if any(e.method == method for e, _ in self.inbox):
                return False
            self.cluster.tick()
            self._recv_some(0.02)
        return not any(e.method == method for e, _ in self.inbox)

    def close(self):
        self.sock.close(0)


class Client(Peer):
    def generate(self, rid, prompt="Once upon a time", prompt_ids=None, max_tokens=0,
                 deadline_ms=0, **sampling):
        g = pb.GenerateRequest(prompt=prompt if prompt_ids is None else "",
                               max_tokens=max_tokens)
        if prompt_ids is not None:
            g.prompt_ids.extend(prompt_ids)
        if sampling:
            g.sampling.CopyFrom(pb.Sampling(**sampling))
        self.send(envelope(pb.GENERATE, rid, "generate", g, deadline_ms=deadline_ms))

    def call(self, method, field, reply, rid=0):
        self.send(envelope(method, rid, field))
        return self.expect(reply, rid=rid)

    def stream(self, rid, timeout=5.0):
        """Collects CHUNKs of rid until the last one (or an ERROR). Returns (chunks,
        error envelope or None)."""
        chunks = []
        end = time.monotonic() + timeout * SLOW
        while time.monotonic() < end:
            for i, (env, _) in enumerate(self.inbox):
                if env.request_id != rid or env.method not in (pb.CHUNK, pb.ERROR):
                    continue
                del self.inbox[i]
                if env.method == pb.ERROR:
                    return chunks, env
                chunks.append(env.chunk)
                if env.chunk.finish_reason:
                    return chunks, None
                break
            else:
                self.cluster.tick()
                self._recv_some(0.02)
        raise Timeout(f"stream of {rid} did not end; got {len(chunks)} chunks")


class FakeWorker(Peer):
    def __init__(self, cluster, role, name, can_prefill=False, n_blocks=64, block_size=16,
                 dtype=0, transport=pb.UCX):
        super().__init__(cluster, cluster.worker_ep)
        self.role, self.name, self.can_prefill = role, name, can_prefill
        self.n_blocks, self.block_size, self.dtype = n_blocks, block_size, dtype
        self.transport = transport
        self.id = 0
        self.auto_hb = False
        self.free_blocks = n_blocks
        self.last_hb = 0.0

    def register_body(self, **over):
        cluster_layout = self.cluster.layout
        r = pb.Register(role=self.role, name=self.name, model="stories260K.gguf",
                        model_digest=model_digest(), kv_transport=self.transport,
                        max_seq_len=512, vocab=512, pid=os.getpid(),
                        can_prefill=self.can_prefill)
        r.layout.CopyFrom(pb.KvLayout(block_size=self.block_size, dtype=self.dtype,
                                      n_blocks=self.n_blocks, **cluster_layout))
        r.ucx.CopyFrom(pb.UcxSource(worker_address=b"ucx-" + self.name.encode(),
                                    rkey_k=b"rk", rkey_v=b"rv", base_k=4096, base_v=8192))
        for k, v in over.items():
            if k == "layout":
                for lk, lv in v.items():
                    setattr(r.layout, lk, lv)
            elif k == "no_ucx":
                r.ClearField("ucx")
            elif k == "device_source":
                r.device_source.CopyFrom(pb.DeviceSource(**v))
            else:
                setattr(r, k, v)
        return r

    def register(self, version=1, auto_hb=True, **over):
        self.send(envelope(pb.REGISTER, 0, "register", self.register_body(**over),
                           version=version))
        rep = self.expect(pb.REGISTER_REPLY).register_reply
        if rep.accepted:
            self.id = rep.worker_id
            self.auto_hb = auto_hb
            self.heartbeat()
        return rep

    def heartbeat(self, **load):
        ld = dict(free_blocks=self.free_blocks, total_blocks=self.n_blocks)
        ld.update(load)
        self.send(envelope(pb.HEARTBEAT, 0, "heartbeat",
                           pb.Heartbeat(worker_id=self.id, load=pb.WorkerLoad(**ld))))
        self.last_hb = time.monotonic()

    def task_msg(self, method, task, field, body=None, data=None):
        self.send(envelope(method, task, field, body), data)


class Cluster:
    def __init__(self, *router_args, drain="2s"):
        self.ctx = zmq.Context()
        self.peers = []
        self.logf = tempfile.NamedTemporaryFile(prefix="pd-router-", suffix=".log",
                                                delete=False)
        args = [ROUTER, "--model", MODEL, "--client-endpoint", "tcp://127.0.0.1:0",
                "--worker-endpoint", "tcp://127.0.0.1:0", "--heartbeat-ms", "50",
                "--drain-timeout", drain, "--log-level", "debug", *map(str, router_args)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.logf)
        line = self._read_line(10 * SLOW)
        m = re.match(r"pd-router: client (\S+) worker (\S+)$", line)
        if not m:
            raise RuntimeError(f"unexpected first line {line!r}; log:\n{self.log()}")
        self.client_ep, self.worker_ep = m.group(1), m.group(2)
        m = re.search(r"(\d+) layers, (\d+) KV heads, head dim (\d+), context (\d+)",
                      self.log())
        if not m:
            raise RuntimeError("no layout in the router's log:\n" + self.log())
        self.layout = dict(n_layers=int(m.group(1)), n_kv_heads=int(m.group(2)),
                           head_dim=int(m.group(3)))
        self.ctx_len = int(m.group(4))

    def _read_line(self, timeout):
        import select
        end = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < end and not buf.endswith(b"\n"):
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                c = os.read(fd, 4096)
                if not c:
                    break
                buf += c
        return buf.decode(errors="replace").strip()

    def log(self):
        with open(self.logf.name, errors="replace") as f:
            return f.read()

    def client(self):
        c = Client(self, self.client_ep)
        self.peers.append(c)
        return c

    def worker(self, role, name, **kw):
        w = FakeWorker(self, role, name, **kw)
        self.peers.append(w)
        return w

    def tick(self):
        now = time.monotonic()
        for p in self.peers:
            if isinstance(p, FakeWorker) and p.auto_hb and now - p.last_hb > 0.04:
                p.heartbeat()

    def sleep(self, secs):
        end = time.monotonic() + secs
        while time.monotonic() < end:
            self.tick()
            time.sleep(0.01)

    def stop(self, timeout=10):
        """SIGTERM, then the exit status (after a drain; ASan's leak check included)."""
        self.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout * SLOW
        while time.monotonic() < end:
            self.tick()
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.02)
        raise Timeout("pd-router did not exit after SIGTERM")

    def close(self):
        for p in self.peers:
            p.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.ctx.term()
        if os.environ.get("PD_KEEP_LOGS") is None:
            os.unlink(self.logf.name)


def run(tests):
    """Runs each test(f, cluster-factory) with fresh clusters; prints a summary and
    exits non-zero on any failure."""
    f = Failures()
    for t in tests:
        clusters = []

        def make(*a, **kw):
            c = Cluster(*a, **kw)
            clusters.append(c)
            return c
        t0 = time.monotonic()
        try:
            t(f, make)
        except Exception as e:  # a failed wait is a failed check, with the log
            import traceback
            traceback.print_exc()
            f.check(False, f"{t.__name__}: {type(e).__name__}: {e}")
            for c in clusters:
                print("---- router log (tail) ----\n" + c.log()[-4000:])
        finally:
            for c in clusters:
                c.close()
        print(f"{t.__name__}: {time.monotonic() - t0:.2f}s", flush=True)
    f.finish()
