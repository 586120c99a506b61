"""A real pd-router and a real pd-decode (UCX transport) with a FAKE prefill worker that
misbehaves: it answers a prefill task with KV_DATA rows, which only the ZeroMQ
transport sends. The decode worker must refuse them with a clear error (its pool is
read over UCX, or on a GPU through CUDA IPC, where there is no host pool to copy rows
into), fail the task instead of writing the rows into its reserved blocks and keep
serving; the router then runs the request again from its prompt. Every wait is
bounded; the processes are killed at the end."""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "router"))
from routerlib import BIN, MODEL, SLOW, Cluster, Timeout, pb, run  # noqa: E402

DECODE = os.path.join(BIN, "pd-decode")


def log_of(path):
    with open(path, errors="replace") as fh:
        return fh.read()


def wait_for(c, cond, secs):
    end = time.monotonic() + secs * SLOW
    while time.monotonic() < end:
        if cond():
            return True
        c.sleep(0.05)
    return cond()


def test_kv_data_over_ucx(f, make):
    c = make()
    p = c.worker(pb.PREFILL, "p0")
    body = p.register_body()  # a UCX source the decode worker takes (never read here)
    body.ucx.len_k = body.ucx.len_v = 1 << 20
    p.register_body = lambda **over: body
    f.check(p.register().accepted, "the fake prefill worker registers")
    logf = tempfile.NamedTemporaryFile(prefix="pd-decode-", suffix=".log", delete=False)
    d = subprocess.Popen([DECODE, "--model", MODEL, "--router", c.worker_ep, "--threads",
                          "1", "--kv-transport", "ucx", "--name", "d0", "--kv-blocks", "64",
                          "--log-level", "debug"], stdout=logf, stderr=logf)
    try:
        f.check(wait_for(c, lambda: "registered" in log_of(logf.name), 20),
                "pd-decode registered")
        cl = c.client()
        cl.generate(5, prompt="Once upon a time", max_tokens=4)
        env = p.expect(pb.PREFILL_TASK, timeout=10 * SLOW)
        t, n = env.request_id, len(env.prefill_task.ids)
        p.expect(pb.KV_TARGET, timeout=10 * SLOW)  # the decode worker reserved
        row = 2 * c.layout["n_kv_heads"] * c.layout["head_dim"]  # f16 rows, any bytes
        p.task_msg(pb.KV_DATA, t, "kv_data", pb.KvData(layer=0, pos0=0, n_pos=n),
                   data=bytes(2 * n * row))
        said = wait_for(c, lambda: "KV_DATA, but this worker reads KV over ucx"
                        in log_of(logf.name), 10)
        f.check(said, "the decode worker names the stray KV_DATA")
        # the task failed on D, so the router runs the request again from the prompt
        try:
            again = p.expect(pb.PREFILL_TASK, timeout=10 * SLOW)
            f.check(list(again.prefill_task.ids) == list(env.prefill_task.ids),
                    "the request is prefilled again after the refused rows")
        except Timeout:
            f.check(False, "no second PREFILL_TASK after the decode worker failed the task")
        f.check(d.poll() is None, f"pd-decode still runs (status {d.poll()})")
    finally:
        d.kill()
        d.wait(10)
        if f.items:
            print("---- pd-decode log (tail) ----\n" + log_of(logf.name)[-3000:])
        os.unlink(logf.name)


run([test_kv_data_over_ucx])
