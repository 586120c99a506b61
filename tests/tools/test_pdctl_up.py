"""`pdctl up` brings up a whole local cluster (router, 1 prefill + 2 decode workers),
prints a client endpoint that serves: `pdctl complete` (json and text) gives every
stories260K golden line's exact ids and the text `pdctl generate` prints, and so does
the Python example client (examples/python/pd_client.py); Ctrl-C
(SIGINT) stops everything with exit status 0 and leaves no process behind. A missing
model fails with status 1 and no process left; a bad flag is a usage error (2).
--sample-threads reaches every worker's command line."""
import json
import os
import signal
import subprocess
import sys
import tempfile

from pdtest import BIN, MODELS, Failures, golden_lines, require, start_up, stop_up

f = Failures()
PDCTL = require(os.path.join(BIN, "pdctl"))
model = require(os.path.join(MODELS, "stories260K.gguf"))


def children_of(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


with tempfile.TemporaryDirectory() as tmp:
    up, endpoint = start_up(["--model", model, "--prefill", "1", "--decode", "2", "--port",
                             "0", "--threads", "1", "--sample-threads", "2", "--log-dir",
                             os.path.join(tmp, "logs")], os.path.join(tmp, "up.out"))
    kids = []
    try:
        f.check(endpoint is not None, f"pdctl up never printed a ready endpoint "
                                      f"(status {up.poll()})")
        kids = children_of(up.pid)
        f.check(len(kids) == 4, f"pdctl up has {len(kids)} children, not 4")
        # --sample-threads goes to every worker (3 of the 4 children)
        workers = 0
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                argv = []
            if argv and argv[0].endswith((b"pd-prefill", b"pd-decode")):
                workers += 1
                f.check(b"--sample-threads" in argv and
                        argv[argv.index(b"--sample-threads") + 1] == b"2",
                        f"worker {k} without --sample-threads 2: {argv}")
        f.check(workers == 3, f"{workers} worker processes among pdctl up's children")
        if endpoint:
            for g in golden_lines():
                if not g["model"].startswith("stories260K"):
                    continue
                n = len(g["greedy_ids"])
                p = subprocess.run([PDCTL, "complete", "--router", endpoint, "--prompt",
                                    g["prompt"], "--max-tokens", str(n), "--ignore-eos",
                                    "--format", "json"], capture_output=True, timeout=120)
                f.check(p.returncode == 0, f"complete failed: {p.stderr[-500:]}")
                if p.returncode == 0:
                    o = json.loads(p.stdout)
                    want = g["greedy_ids"][: g["exact_prefix"]]
                    f.check(o["ids"][: len(want)] == want and len(o["ids"]) == n,
                            f"{g['prompt']!r}: ids differ from golden")
                    f.check(o["prompt_ids"] == g["prompt_ids"], f"{g['prompt']!r}: prompt_ids")
            # text mode streams what pdctl generate prints after the prompt
            p = subprocess.run([PDCTL, "complete", "--router", endpoint, "--prompt",
                                "Tom and his dog", "--max-tokens", "48"],
                               capture_output=True, timeout=120)
            ref = subprocess.run([PDCTL, "generate", "--model", model, "--prompt",
                                  "Tom and his dog", "--max-tokens", "48"],
                                 capture_output=True, timeout=120)
            f.check(p.returncode == 0 and ref.returncode == 0 and
                    ref.stdout.decode().startswith("Tom and his dog") and
                    p.stdout.decode() == ref.stdout.decode()[len("Tom and his dog"):],
                    f"complete text {p.stdout[:80]!r} vs generate {ref.stdout[:80]!r}")
            # the Python example client (pyzmq + protobuf) streams the same text
            src = os.environ.get("PD_SOURCE_DIR") or os.path.join(os.path.dirname(
                os.path.abspath(__file__)), "..", "..")
            pyout = os.path.join(os.path.dirname(os.path.abspath(BIN)), "python")
            p = subprocess.run([os.environ.get("PD_PYTHON", "/usr/bin/python3"),
                                os.path.join(src, "examples", "python", "pd_client.py"),
                                "--router", endpoint, "--prompt", "Tom and his dog",
                                "--max-tokens", "48", "--proto-python-dir", pyout],
                               capture_output=True, timeout=120)
            f.check(p.returncode == 0 and
                    p.stdout.decode() == ref.stdout.decode()[len("Tom and his dog"):],
                    f"example client: {p.returncode} {p.stdout[:80]!r} {p.stderr[-300:]!r}")
    finally:
        rc = stop_up(up)
        f.check(rc == 0, f"pdctl up exited with {rc} after SIGINT: {up.stderr.read()[-800:]}")
        left = [k for k in kids if alive(k)]
        f.check(not left, f"processes left behind: {left}")
        for k in left:
            os.kill(k, signal.SIGKILL)

    # a model that does not exist: status 1, nothing left behind
    p = subprocess.Popen([PDCTL, "up", "--model", os.path.join(tmp, "nope.gguf"), "--port",
                          "0", "--log-dir", os.path.join(tmp, "logs2")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = None
    f.check(rc == 1, f"pdctl up with a missing model exited with {rc}")
    f.check(not children_of(p.pid), "pdctl up with a missing model left children")
    p = subprocess.run([PDCTL, "up", "--model", model, "--prefill", "many"],
                       capture_output=True, timeout=30)
    f.check(p.returncode == 2 and b"--prefill" in p.stderr,
            f"a bad flag: status {p.returncode} {p.stderr[-200:]}")
    p = subprocess.run([PDCTL, "up", "--model", model, "--sample-threads", "300"],
                       capture_output=True, timeout=30)
    f.check(p.returncode == 2 and b"--sample-threads" in p.stderr,
            f"--sample-threads 300: status {p.returncode} {p.stderr[-200:]}")
f.finish()
