"""--device on a machine without a GPU (CI): `pdctl generate --device cuda`, a worker
started with --device cuda and `pdctl up --device cuda` end with exit status 1 and a
clear line saying why (no GPU here, or a build without the CUDA backend), never a crash
or a hang; a malformed --device and
--weight-dtype are refused the same way; --kv-transport cuda-ipc without --device cuda
is a usage error that says why, and with it (no GPU) exits 1 like any --device cuda;
--device cpu is the default's output exactly, and so is --cuda-graphs on the CPU (where
it is accepted and ignored; the workers take it too).
On a machine with a GPU the cuda runs instead must give the CPU's golden ids (the full
GPU checks are tests/gpu/run.sh)."""
import os
import subprocess

from pdtest import BIN, MODELS, PDCTL, Failures, generate_json, golden_lines, require

f = Failures()
g = [x for x in golden_lines() if x["model"].startswith("stories260K")][0]
model = require(os.path.join(MODELS, "stories260K.gguf"))
n = len(g["greedy_ids"])
base = ["generate", "--model", model, "--prompt", g["prompt"], "--max-tokens", str(n),
        "--temperature", "0", "--ignore-eos", "--format", "json"]
REASONS = ("no usable NVIDIA GPU", "has no CUDA backend")


def run(argv, timeout=60):
    return subprocess.run(argv, capture_output=True, timeout=timeout)


cpu = generate_json(*base[1:], "--device", "cpu")
default = generate_json(*base[1:])
f.check(cpu["ids"] == default["ids"], "--device cpu differs from the default")
f.check(cpu["ids"][: g["exact_prefix"]] == g["greedy_ids"][: g["exact_prefix"]],
        "--device cpu: not the golden ids")
graphs = generate_json(*base[1:], "--cuda-graphs")
f.check(graphs["ids"] == default["ids"], "--cuda-graphs on the CPU changes the output")

no_gpu = False
for dev in ("cuda", "cuda:0", "cuda:3"):
    p = run([require(PDCTL), *base, "--device", dev])
    err = p.stderr.decode(errors="replace")
    if p.returncode == 0:  # a GPU is here: then it must be right
        import json
        ids = json.loads(p.stdout)["ids"]
        f.check(ids[: g["exact_prefix"]] == g["greedy_ids"][: g["exact_prefix"]],
                f"--device {dev} on a GPU: not the golden ids")
        continue
    no_gpu |= dev == "cuda"
    f.check(p.returncode == 1, f"--device {dev}: exit status {p.returncode} (a crash?)")
    f.check(any(r in err for r in REASONS) or "cuda:3: this machine has" in err,
            f"--device {dev}: no clear reason on stderr: {err!r}")
    f.check("cannot use --device" in err, f"--device {dev}: pdctl's own line missing")

for bad in (["--device", "gpu"], ["--device", "cuda:x"], ["--device", "cuda:-1"],
            ["--weight-dtype", "fp8"]):
    p = run([require(PDCTL), *base, *bad])
    err = p.stderr.decode(errors="replace")
    f.check(p.returncode in (1, 2) and ("expected cpu, cuda or cuda:N" in err or
                                   "expected cuda:N" in err or "--weight-dtype" in err),
            f"{bad}: exit {p.returncode}, stderr {err!r}")
p = run([require(PDCTL), *base, "--weight-dtype", "bf16"])
f.check(p.returncode == 1 and b"bf16 weights are a CUDA option" in p.stderr,
        f"--weight-dtype bf16 on the CPU: exit {p.returncode}")

# a worker with --device cuda and no GPU: exits 1 at startup with the reason
dec = os.path.join(BIN, "pd-decode")
if os.path.exists(dec) and no_gpu:
    p = run([dec, "--model", model, "--router", "tcp://127.0.0.1:1", "--device", "cuda"])
    err = p.stderr.decode(errors="replace")
    f.check(p.returncode == 1 and any(r in err for r in REASONS),
            f"pd-decode --device cuda: exit {p.returncode}, stderr {err[-300:]!r}")
# --cuda-graphs is a flag the workers take (ignored on the CPU): no usage error
for tool in ("pd-prefill", "pd-decode"):
    path = os.path.join(BIN, tool)
    if os.path.exists(path):
        p = run([path, "--model", model, "--cuda-graphs", "--help"])
        f.check(p.returncode == 0 and b"--cuda-graphs" in p.stdout,
                f"{tool} --cuda-graphs: exit {p.returncode}")
# the cuda-ipc KV transport copies between GPU memories: on the CPU it is refused
for tool in ("pd-prefill", "pd-decode"):
    path = os.path.join(BIN, tool)
    if not os.path.exists(path):
        continue
    p = run([path, "--model", model, "--router", "tcp://127.0.0.1:1", "--kv-transport",
             "cuda-ipc"])
    err = p.stderr.decode(errors="replace")
    f.check(p.returncode == 2 and "cuda-ipc needs --device cuda" in err,
            f"{tool} --kv-transport cuda-ipc on the CPU: exit {p.returncode}, {err[-300:]!r}")
    if no_gpu:
        p = run([path, "--model", model, "--router", "tcp://127.0.0.1:1", "--kv-transport",
                 "cuda-ipc", "--device", "cuda"])
        err = p.stderr.decode(errors="replace")
        f.check(p.returncode == 1 and any(r in err for r in REASONS),
                f"{tool} cuda-ipc --device cuda, no GPU: exit {p.returncode}, {err[-300:]!r}")
if os.path.exists(os.path.join(BIN, "pd-router")):
    p = run([require(PDCTL), "up", "--model", model, "--port", "0", "--kv-transport",
             "cuda-ipc", "--ready-timeout", "30"], timeout=90)
    err = p.stderr.decode(errors="replace")
    f.check(p.returncode == 2 and "cuda-ipc needs --device cuda" in err,
            f"pdctl up --kv-transport cuda-ipc on the CPU: exit {p.returncode}, "
            f"stderr {err[-400:]!r}")
# pdctl up --device cuda without a GPU: exits 1 and says why (the workers' reason)
if os.path.exists(os.path.join(BIN, "pd-router")) and no_gpu:
    p = run([require(PDCTL), "up", "--model", model, "--port", "0", "--device", "cuda",
             "--ready-timeout", "30"], timeout=90)
    err = p.stderr.decode(errors="replace")
    f.check(p.returncode == 1 and "exited while starting" in err and
            any(r in err for r in REASONS),
            f"pdctl up --device cuda: exit {p.returncode}, stderr {err[-400:]!r}")
f.finish()
