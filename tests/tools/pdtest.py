"""Shared helpers for the script tests: locations from CTest's environment, running
pdctl with a time bound, reading the golden files. Every helper fails loudly (raises)
rather than skipping when something is missing."""
import json
import os
import subprocess
import sys

SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared")
BIN = os.environ.get("PD_BIN_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "bin")
MODELS = os.path.join(SHARED, "models")
GOLDEN = os.path.join(SHARED, "golden")
PDCTL = os.path.join(BIN, "pdctl")


def require(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"required file missing: {path}")
    return path


def pdctl(*args, timeout=300, check=True):
    """Runs pdctl, returns (returncode, stdout, stderr)."""
    p = subprocess.run([require(PDCTL), *map(str, args)], capture_output=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"pdctl {' '.join(map(str, args))} failed ({p.returncode}):\n"
                           f"{p.stderr.decode(errors='replace')}")
    return p.returncode, p.stdout, p.stderr


def generate_json(*args, timeout=300):
    _, out, _ = pdctl("generate", "--format", "json", *args, timeout=timeout)
    return json.loads(out)


def golden_lines():
    lines = []
    for name in sorted(os.listdir(require(GOLDEN))):
        if name.endswith(".jsonl"):
            with open(os.path.join(GOLDEN, name)) as f:
                lines += [json.loads(l) for l in f if l.strip()]
    if not lines:
        raise RuntimeError("no golden lines found")
    return lines


def start_up(args, out_path, timeout=90):
    """Starts `pdctl up ARGS` with stdout into out_path; waits (at most timeout
    seconds) for its ready line. Returns (process, client endpoint or None: it exited
    or never got ready); the caller stops the process (stop_up)."""
    import time
    out = open(out_path, "w+")
    up = subprocess.Popen([require(PDCTL), "up", *map(str, args)], stdout=out,
                          stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and up.poll() is None:
        out.seek(0)
        for line in out.read().splitlines():
            if "ready" in line and "client endpoint" in line:
                out.close()
                return up, line.split("client endpoint")[1].split()[0]
        time.sleep(0.1)
    out.close()
    return up, None


def stop_up(up, timeout=90):
    """SIGINT to `pdctl up`, then its exit status (None: it had to be killed)."""
    import signal
    up.send_signal(signal.SIGINT)
    try:
        return up.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        up.kill()
        up.wait(10)
        return None


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


class Failures:
    def __init__(self):
        self.items = []
        self.checks = 0

    def check(self, ok, msg):
        self.checks += 1
        if not ok:
            self.items.append(msg)
            print("FAIL:", msg, flush=True)
        return ok

    def finish(self):
        print(f"{self.checks} checks, {len(self.items)} failures")
        if self.checks == 0:
            print("FAIL: no checks ran")
            sys.exit(1)
        sys.exit(1 if self.items else 0)
