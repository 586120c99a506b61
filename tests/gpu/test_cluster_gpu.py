"""On a GPU (run by tests/gpu/run.sh when the service was built; CTest runs it on
cudasim): the disaggregated cluster with both workers on the GPU. For each KV transport
(ucx: the pinned host copies over UCX; cuda-ipc: GPU to GPU through CUDA IPC, no host
copy), `pdctl up --device cuda --prefill 1 --decode 1` serves every stories260K golden
line with its exact greedy ids through `pdctl complete`, alone and 16 in flight, with a
prompt long enough for layer-wise streaming (--kv-layerwise-min 8); the decode worker's
log must show KV reads for every request and no checksum mismatch; Ctrl-C stops the
cluster with status 0. Then cuda-ipc once more with --cuda-graphs: the same ids, and the
decode worker's exit line must show graph replays and no failed one. Last, a cluster
started by hand whose prefill and decode pools differ in size (300 and 97 blocks: the
reader must use the peer's own layer stride), every golden line exact and SIGTERM ending
every process with status 0. Needs only pdctl and the Python standard library (a GPU
host may have no pyzmq). PD_BIN_DIR and PD_SHARED_DIR as for the CPU tests;
PD_TEST_DEVICE=cpu PD_TEST_TRANSPORTS=ucx runs the same on the CPU (a check of the test
itself)."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from pdtest import MODELS, PDCTL, Failures, golden_lines, require, start_up, stop_up  # noqa

f = Failures()
DEV = os.environ.get("PD_TEST_DEVICE", "cuda")
model = require(os.path.join(MODELS, "stories260K.gguf"))
lines = [g for g in golden_lines() if g["model"].startswith("stories260K")]


def complete(endpoint, g):
    n = len(g["greedy_ids"])
    p = subprocess.run([PDCTL, "complete", "--router", endpoint, "--prompt", g["prompt"],
                        "--max-tokens", str(n), "--ignore-eos", "--format", "json"],
                       capture_output=True, timeout=120)
    if p.returncode != 0:
        return None, p.stderr.decode(errors="replace")[-300:]
    return json.loads(p.stdout), ""


def check(what, g, out, err):
    if not f.check(out is not None, f"{what}: complete failed: {err}"):
        return
    want = g["greedy_ids"][: g["exact_prefix"]]
    f.check(out["ids"][: len(want)] == want and len(out["ids"]) == len(g["greedy_ids"]),
            f"{what}: ids differ from golden")


def cluster(transport, graphs=False):
    tmp = tempfile.mkdtemp(prefix=f"pd_gpu_cluster_{transport}_")
    logs = os.path.join(tmp, "logs")
    up, endpoint = start_up(["--model", model, "--prefill", "1", "--decode", "1", "--port",
                             "0", "--threads", "2", "--device", DEV, "--kv-transport",
                             transport, "--kv-layerwise-min", "8", "--log-dir", logs,
                             *(["--cuda-graphs"] if graphs else [])],
                            os.path.join(tmp, "up.out"), timeout=120)
    try:
        if not f.check(endpoint is not None,
                       f"{transport}: pdctl up never got ready (status {up.poll()})"):
            return
        for g in lines:
            out_, err = complete(endpoint, g)
            check(f"{transport} alone {g['prompt']!r}", g, out_, err)
        results = [None] * 16
        threads = []
        for i in range(16):
            g = lines[i % len(lines)]

            def run(i=i, g=g):
                results[i] = complete(endpoint, g)
            threads.append(threading.Thread(target=run))
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for i, r in enumerate(results):
            g = lines[i % len(lines)]
            check(f"{transport} 16 in flight #{i}", g, *(r or (None, "no answer")))
    finally:
        rc = stop_up(up)
        f.check(rc == 0, f"{transport}: pdctl up exited with {rc}: "
                         f"{up.stderr.read()[-500:]!r}")
    text = ""
    for path in glob.glob(os.path.join(logs, "decode*")):
        with open(path, errors="replace") as fh:
            text += fh.read()
    reads = text.count("bytes read in")  # the pulling transports log each read
    f.check(transport == "zmq" or reads >= len(lines) + 16,
            f"{transport}: the decode log shows {reads} KV reads, expected "
            f"{len(lines) + 16} (logs in {logs})")
    f.check("checksum" not in text.lower() or "mismatch" not in text.lower(),
            f"{transport}: a KV checksum mismatch in the decode log ({logs})")
    if graphs:
        m = re.search(r"cuda graphs: (\d+) recorded, (\d+) replayed, (\d+) failed", text)
        f.check(m is not None, f"{transport} --cuda-graphs: no graph counters in the decode "
                               f"log ({logs})")
        if m and DEV != "cpu":
            f.check(int(m.group(2)) > 0 and int(m.group(3)) == 0,
                    f"{transport} --cuda-graphs: {m.group(0)}: no replay, or a failure")
    print(f"{transport}{' graphs' if graphs else ''}: {reads} KV reads; logs in {logs}")


def uneven_pools(transport):
    """pd-router, pd-prefill --kv-blocks 300, pd-decode --kv-blocks 97, by hand."""
    tmp = tempfile.mkdtemp(prefix=f"pd_gpu_uneven_{transport}_")
    bins = os.path.dirname(PDCTL)
    procs = []
    try:
        router = subprocess.Popen([os.path.join(bins, "pd-router"), "--model", model,
                                   "--client-endpoint", "tcp://127.0.0.1:0",
                                   "--worker-endpoint", "tcp://127.0.0.1:0",
                                   "--kv-transport", transport],
                                  stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(tmp, "router.log"), "w"))
        procs.append(router)
        line = router.stdout.readline().decode()  # the first line names the endpoints
        m = re.match(r"pd-router: client (\S+) worker (\S+)", line)
        if not f.check(m is not None, f"uneven {transport}: router line {line!r}"):
            return
        client, worker = m.group(1), m.group(2)
        for role, blocks in (("prefill", 300), ("decode", 97)):
            procs.append(subprocess.Popen(
                [os.path.join(bins, f"pd-{role}"), "--model", model, "--router", worker,
                 "--device", DEV, "--kv-transport", transport, "--kv-blocks", str(blocks),
                 "--kv-layerwise-min", "8", "--threads", "2"],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(tmp, f"{role}.log"), "w")))
        for g in lines:  # the router queues a request until both workers registered
            out_, err = complete(client, g)
            check(f"uneven pools {transport} {g['prompt']!r}", g, out_, err)
    finally:
        for p in reversed(procs):  # decode, prefill, router: readers before the pool
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            f.check(p.returncode == 0, f"uneven {transport}: a process exited with "
                                       f"{p.returncode} (logs in {tmp})")


transports = os.environ.get("PD_TEST_TRANSPORTS", "ucx,cuda-ipc").split(",")
for transport in transports:
    cluster(transport)
cluster(transports[-1], graphs=True)
uneven_pools(transports[-1])
f.finish()
