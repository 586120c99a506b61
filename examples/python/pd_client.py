#!/usr/bin/env python3
"""A minimal pdserve client in Python: streams one completion from the router's client
endpoint with pyzmq and protobuf, as docs/protocol.md ("Client calls") describes.

    python3 examples/python/pd_client.py --router tcp://127.0.0.1:5555 \
        --prompt "Once upon a time" --max-tokens 64

One DEALER socket; one GENERATE envelope; CHUNK envelopes back until the one with a
finish_reason (it carries the usage), or one ERROR. The generated pd_pb2 module comes
from --proto-python-dir, else <repo>/build/python, else protoc is run on proto/pd.proto
into a temporary directory."""
import argparse
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def load_pd_pb2(proto_python_dir=None):
    """Imports pd_pb2 from the first place that has it."""
    for d in (proto_python_dir, os.path.join(REPO, "build", "python")):
        if d and os.path.exists(os.path.join(d, "pd_pb2.py")):
            sys.path.insert(0, d)
            return importlib.import_module("pd_pb2")
    protoc = shutil.which("protoc")
    proto = os.path.join(REPO, "proto", "pd.proto")
    if not protoc or not os.path.exists(proto):
        sys.exit("pd_client: no pd_pb2.py found and no protoc to generate it "
                 "(pass --proto-python-dir)")
    out = tempfile.mkdtemp(prefix="pd_pb2_")
    subprocess.run([protoc, f"--python_out={out}", f"-I{os.path.dirname(proto)}", proto],
                   check=True)
    sys.path.insert(0, out)
    return importlib.import_module("pd_pb2")


def parse_args():
    p = argparse.ArgumentParser(description="Stream one completion from a pdserve router.")
    p.add_argument("--router", default="tcp://127.0.0.1:5555")
    p.add_argument("--prompt")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--proto-python-dir", help="a directory holding pd_pb2.py")
    a = p.parse_args()
    if (a.prompt is None) == (a.prompt_ids is None):
        p.error("give one of --prompt and --prompt-ids")
    return a


def main():
    a = parse_args()
    pd = load_pd_pb2(a.proto_python_dir)
    import zmq  # after argument parsing, so --help works without pyzmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.router)
    rid = random.getrandbits(63) or 1
    env = pd.Envelope(version=1, method=pd.GENERATE, request_id=rid,
                      deadline_ms=int((time.time() + a.timeout) * 1000))
    g = env.generate
    if a.prompt is not None:
        g.prompt = a.prompt
    else:
        g.prompt_ids.extend(int(x) for x in a.prompt_ids.split(","))
    g.max_tokens = a.max_tokens
    g.ignore_eos = a.ignore_eos
    s = g.sampling
    s.temperature, s.top_p, s.top_k, s.min_p = a.temperature, a.top_p, a.top_k, a.min_p
    if a.seed is not None:
        s.seed, s.has_seed = a.seed, True
    sock.send(env.SerializeToString())

    t0 = time.monotonic()
    ttft = None
    deadline = t0 + a.timeout + 1.0
    next_index = 0
    rc = 1
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                print("\npd_client: timed out", file=sys.stderr)
                cancel = pd.Envelope(version=1, method=pd.CANCEL, request_id=rid)
                cancel.cancel.SetInParent()
                sock.send(cancel.SerializeToString())
                break
            rep = pd.Envelope()
            rep.ParseFromString(sock.recv())
            if rep.request_id != rid:
                continue
            if rep.method == pd.ERROR:
                print(f"\npd_client: {pd.ErrorCode.Name(rep.error.code)}: "
                      f"{rep.error.message}", file=sys.stderr)
                break
            if rep.method != pd.CHUNK:
                continue
            c = rep.chunk
            if c.index != next_index:
                print(f"\npd_client: chunk index {c.index}, expected {next_index}",
                      file=sys.stderr)
                break
            next_index += len(c.ids)
            if ttft is None and c.ids:
                ttft = time.monotonic() - t0
            sys.stdout.write(c.text)
            sys.stdout.flush()
            if c.finish_reason:
                u = c.usage
                e2e = time.monotonic() - t0
                print()
                print(f"[{u.completion_tokens} tokens, {c.finish_reason}, "
                      f"prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), "
                      f"seed {u.seed}, ttft {1000 * (ttft or e2e):.1f} ms, "
                      f"e2e {1000 * e2e:.1f} ms]", file=sys.stderr)
                rc = 0
                break
    finally:
        sock.close(0)
        ctx.term()
    return rc


if __name__ == "__main__":
    sys.exit(main())
