"""A local pdserve cluster for the integration tests: the real pd-router, pd-prefill
and pd-decode binaries as child processes on loopback (port-0 endpoints, so runs never
collide), and a small protocol client on pyzmq + the pd_pb2 module protoc generated
into <build>/python. Every wait is bounded in time; Cluster.stop() (also on with-exit)
kills whatever is left."""
import itertools
import os
import random
import signal
import subprocess
import sys
import time

SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared")
BIN = os.environ.get("PD_BIN_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "bin")
MODELS = os.path.join(SHARED, "models")
GOLDEN = os.path.join(SHARED, "golden")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(BIN)), "python"))

import zmq  # noqa: E402
import pd_pb2 as pb  # noqa: E402

# the script tests' shared helpers: paths checked, golden lines, the check counter
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from pdtest import Failures, golden_lines, require  # noqa: E402,F401

VERSION = 1


def reference(margs, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=1):
    """pdctl generate's ids for one prompt (the single-process reference)."""
    import json
    p = subprocess.run([require(os.path.join(BIN, "pdctl")), "generate", *margs,
                        "--prompt", prompt, "--max-tokens", str(max_tokens),
                        "--temperature", str(temperature), "--top-p", str(top_p),
                        "--seed", str(seed), "--ignore-eos", "--format", "json"],
                       capture_output=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"pdctl generate failed: {p.stderr.decode(errors='replace')}")
    return json.loads(p.stdout)["ids"]


def model_args(g, gguf=True):
    """--model/--tokenizer for a golden line's model (GGUF copy, or the llama2.c pair)."""
    stem = os.path.splitext(g["model"])[0]
    if gguf:
        return ["--model", require(os.path.join(MODELS, stem + ".gguf"))]
    return ["--model", require(os.path.join(MODELS, g["model"])), "--tokenizer",
            require(os.path.join(MODELS, g["tokenizer"]))]


class Proc:
    """A child process whose stderr goes to a log file (printed on failure)."""

    def __init__(self, name, argv, logdir, env=None, stdout=None, prefix=None):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(logdir, name + ".log")
        self.log = open(self.log_path, "wb")
        cmd = (prefix or []) + argv
        self.p = subprocess.Popen(cmd, stdout=stdout or self.log, stderr=self.log,
                                  env=env, start_new_session=True)

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                self.p.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.alive():
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=10)
        self.log.close()

    def tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


class Cluster:
    """pd-router + prefill and decode workers. router_args/worker_args are extra flags;
    netns: optional dict role -> namespace name (the multi-host test)."""

    def __init__(self, model, n_prefill=1, n_decode=1, transport="ucx", router_args=(),
                 prefill_args=(), decode_args=(), threads=1, logdir=None,
                 router_host="127.0.0.1", ns=None, worker_router_host=None, env=None):
        self.model = list(model)
        self.transport = transport
        self.logdir = logdir or os.environ.get("PD_TEST_LOGDIR") or "/tmp"
        os.makedirs(self.logdir, exist_ok=True)
        self.procs = []
        self.prefill = []
        self.decode = []
        self.router = None
        self.threads = threads
        self.ns = ns or {}
        self.env = env
        self.ctx = zmq.Context.instance()
        self.router_host = router_host
        self.worker_router_host = worker_router_host or router_host
        self.prefill_args = list(prefill_args)
        self.decode_args = list(decode_args)
        self._start_router(router_args)
        for _ in range(n_prefill):
            self.add_worker("prefill")
        for _ in range(n_decode):
            self.add_worker("decode")

    def _prefix(self, role):
        ns = self.ns.get(role)
        return ["ip", "netns", "exec", ns] if ns else None

    def _start_router(self, extra):
        uniq = f"{os.getpid()}-{random.randrange(1 << 30)}"
        argv = [require(os.path.join(BIN, "pd-router")), *self.model,
                "--client-endpoint", f"tcp://{self.router_host}:0",
                "--worker-endpoint", f"tcp://{self.router_host}:0",
                "--kv-transport", self.transport, *extra]
        self.router_out = os.path.join(self.logdir, f"router-{uniq}.out")
        out = open(self.router_out, "wb")
        self.router = Proc(f"router-{uniq}", argv, self.logdir, stdout=out,
                           prefix=self._prefix("router"), env=self.env)
        out.close()
        deadline = time.time() + 30
        line = None
        while time.time() < deadline:
            with open(self.router_out, "rb") as f:
                for l in f.read().decode(errors="replace").splitlines():
                    if l.startswith("pd-router: client "):
                        line = l
            if line or not self.router.alive():
                break
            time.sleep(0.05)
        if not line:
            raise RuntimeError("pd-router did not start:\n" + self.router.tail())
        parts = line.split()
        self.client_endpoint = parts[2]
        self.worker_endpoint = parts[4]
        self.procs.append(self.router)

    def add_worker(self, role, extra=()):
        n = len(self.prefill if role == "prefill" else self.decode)
        binary = "pd-prefill" if role == "prefill" else "pd-decode"
        wep = self.worker_endpoint
        if self.worker_router_host != self.router_host:
            wep = wep.replace(self.router_host, self.worker_router_host)
        wname = f"{role}{n}-{random.randrange(1 << 20)}"
        argv = [require(os.path.join(BIN, binary)), *self.model, "--router", wep,
                "--kv-transport", self.transport, "--threads", str(self.threads),
                "--name", wname,
                *(self.prefill_args if role == "prefill" else self.decode_args), *extra]
        p = Proc(f"{role}{n}-{os.getpid()}-{random.randrange(1 << 30)}", argv, self.logdir,
                 prefix=self._prefix(role), env=self.env)
        p.wname = wname  # its name in STATS
        self.procs.append(p)
        (self.prefill if role == "prefill" else self.decode).append(p)
        return p

    def client(self):
        return Client(self.ctx, self.client_endpoint)

    def wait_ready(self, n_prefill=None, n_decode=None, timeout=60):
        n_prefill = len(self.prefill) if n_prefill is None else n_prefill
        n_decode = len(self.decode) if n_decode is None else n_decode
        c = self.client()
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                h = c.health(timeout=2)
                if h and h.prefill_workers >= n_prefill and h.decode_workers >= n_decode:
                    # and every worker's first heartbeat (its load) is in
                    st = c.stats(timeout=2)
                    if st and all(w.load.total_blocks > 0 for w in st.workers if w.alive):
                        return h
                for p in self.procs:
                    if not p.alive() and p not in getattr(self, "expected_dead", []):
                        raise RuntimeError(f"{p.name} exited ({p.p.returncode}):\n{p.tail()}")
                time.sleep(0.1)
            raise RuntimeError("the cluster did not become ready:\n" + self.dump())
        finally:
            c.close()

    def dump(self):
        return "\n".join(f"--- {p.name} (alive={p.alive()})\n{p.tail()}" for p in self.procs)

    def stop(self):
        for p in self.procs:
            p.signal(signal.SIGKILL)
        for p in self.procs:
            p.kill()

    def __enter__(self):
        return self

    def shutdown(self, timeout=30):
        """SIGTERM to every live process (workers first, then the router): each must
        drain and exit 0 (under ASan that includes its leak check). Returns the
        processes that did not, with their exit status."""
        bad = []
        workers = [p for p in self.procs if p is not self.router and p.alive()]
        for p in workers:
            p.signal(signal.SIGTERM)
        for p in workers:
            rc = p.wait(timeout)
            if rc != 0:
                bad.append((p.name, rc))
        if self.router.alive():
            self.router.signal(signal.SIGTERM)
            rc = self.router.wait(timeout)
            if rc != 0:
                bad.append((self.router.name, rc))
        return bad

    def __exit__(self, *exc):
        if exc[0] is not None:
            print(self.dump(), flush=True)
            self.stop()
            return
        bad = self.shutdown()
        if bad:
            print(self.dump(), flush=True)
        self.stop()
        if bad:
            raise RuntimeError(f"processes did not exit cleanly: {bad}")


class Result:
    def __init__(self):
        self.ids = []
        self.indices = []
        self.text = ""
        self.finish = None
        self.usage = None
        self.error = None
        self.done = False


class Client:
    """A DEALER on the router's client endpoint; many requests at once."""

    _ids = itertools.count(1)

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.results = {}
        self.inbox = []  # every message that is not a Generate's chunk or error

    def close(self):
        self.sock.close(0)

    def send_env(self, env):
        self.sock.send(env.SerializeToString())

    def generate(self, prompt=None, prompt_ids=None, max_tokens=16, temperature=0.0,
                 seed=None, ignore_eos=True, top_p=0.0, deadline_ms=0, no_text=False,
                 stop_ids=(), spec_k=0):
        rid = next(Client._ids)
        env = pb.Envelope(version=VERSION, method=pb.GENERATE, request_id=rid,
                          deadline_ms=deadline_ms)
        g = env.generate
        if prompt is not None:
            g.prompt = prompt
        if prompt_ids:
            g.prompt_ids.extend(prompt_ids)
        g.max_tokens = max_tokens
        g.sampling.temperature = temperature
        g.sampling.top_p = top_p
        if seed is not None:
            g.sampling.seed = seed
            g.sampling.has_seed = True
        g.ignore_eos = ignore_eos
        g.no_text = no_text
        g.spec_k = spec_k
        g.stop_ids.extend(stop_ids)
        self.results[rid] = Result()
        self.send_env(env)
        return rid

    def cancel(self, rid):
        env = pb.Envelope(version=VERSION, method=pb.CANCEL, request_id=rid)
        env.cancel.SetInParent()
        self.send_env(env)

    def _handle(self, env):
        r = self.results.get(env.request_id)
        if r is None or env.method not in (pb.CHUNK, pb.ERROR):
            return env
        if env.method == pb.CHUNK:
            c = env.chunk
            for i, t in enumerate(c.ids):
                r.indices.append(c.index + i)
                r.ids.append(t)
            r.text += c.text
            if c.finish_reason:
                r.finish = c.finish_reason
                r.usage = c.usage
                r.done = True
        elif env.method == pb.ERROR:
            r.error = (env.error.code, env.error.message)
            r.done = True
        return None

    def poll(self, timeout_ms):
        """Reads every message that arrives within timeout_ms; returns the ones that
        are not Generate replies (cancel replies, health...)."""
        other = []
        if self.sock.poll(timeout_ms):
            while True:
                try:
                    data = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                env = pb.Envelope()
                env.ParseFromString(data)
                x = self._handle(env)
                if x is not None:
                    other.append(x)
                    self.inbox.append(x)
        return other

    def wait_all(self, rids, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline and not all(self.results[r].done for r in rids):
            self.poll(100)
        return [self.results[r] for r in rids]

    def call(self, method, field, timeout=5, rid=None):
        rid = rid if rid is not None else next(Client._ids)
        env = pb.Envelope(version=VERSION, method=method, request_id=rid)
        getattr(env, field).SetInParent()
        self.send_env(env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.poll(100):
                if e.request_id == rid:
                    return e
        return None

    def health(self, timeout=5):
        e = self.call(pb.HEALTH, "health", timeout)
        return e.health_reply if e is not None and e.method == pb.HEALTH_REPLY else None

    def stats(self, timeout=5):
        e = self.call(pb.STATS, "stats", timeout)
        return e.stats_reply if e is not None and e.method == pb.STATS_REPLY else None


def free_blocks(client):
    """{worker name: (free, total)} from STATS, for alive workers."""
    s = client.stats()
    if s is None:
        raise RuntimeError("no STATS reply")
    return {w.name: (w.load.free_blocks, w.load.total_blocks) for w in s.workers if w.alive}


def wait_blocks_back(client, start, timeout=20):
    """Waits until every worker in start reports its starting free-block count (the
    heartbeat lags a little); returns (ok, last seen)."""
    deadline = time.time() + timeout
    now = {}
    while time.time() < deadline:
        now = free_blocks(client)
        if all(now.get(k, (None,))[0] == v[0] for k, v in start.items()):
            return True, now
        time.sleep(0.1)
    return False, now
