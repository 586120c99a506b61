#!/usr/bin/env python3
"""bench_kvxfer.py - KV transfer bandwidth of common/kvxfer against ucx_perftest.

Builds nothing: expects <build-dir>/bench/bench_kvxfer (target bench_kvxfer, in
common/CMakeLists.txt) and ucx_perftest (Debian ucx-utils). Steps:
  1. records the machine (lscpu model, cores) and the UCX version;
  2. per transport (UCX_TLS unset, and UCX_TLS=tcp): bench_kvxfer emulates the decode
     worker pulling a 2048-token prompt's KV on the `mkmodel 110M` shape (12 layers,
     128 blocks of 16 positions, 48 KiB per block per layer per K/V, F32): contiguous
     block ids (one 6 MiB get per layer per K/V) and shuffled ids (48 KiB gets), all
     gets of a run in flight, --runs runs after a verified warm-up, medians;
  3. at the same message sizes (48 KiB, 6 MiB) and transports: ucx_perftest server
     and client on 127.0.0.1 (a free port each time), ucp_put_bw and ucp_get with
     error handling (-e, UCP_ERR_HANDLING_MODE_PEER: what kvxfer's endpoints use, and
     what decides the transports UCX picks) and ucp_put_bw without it, --repeats runs
     each, medians of the "overall" bandwidth;
  4. bench/out/bench_kvxfer.{json,md} (a markdown table, also on stdout).
Runs with /usr/bin/python3, standard library only; about a minute on 2 cores.
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = {"48 KiB": 49152, "6 MiB": 6291456}
TRANSPORTS = ["default", "tcp"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def env_for(tls):
    env = dict(os.environ)
    env.pop("UCX_TLS", None)
    if tls != "default":
        env["UCX_TLS"] = tls
    return env


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def machine():
    info = {"cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        info["cpu"] = m.group(1).strip() if m else "?"
        m = re.search(r"Hypervisor vendor:\s*(.+)", out)
        info["hypervisor"] = m.group(1).strip() if m else None
    except OSError:
        info["cpu"] = "?"
    out = subprocess.run(["ucx_info", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"Version ([\d.]+)", out)
    info["ucx"] = m.group(1) if m else "?"
    return info


def run_kvxfer(exe, tls, runs):
    res = subprocess.run([exe, str(runs)], env=env_for(tls), capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError("bench_kvxfer (%s) failed: %s" % (tls, res.stderr[-2000:]))
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {r["mode"]: r for r in rows}


def perftest_once(tls, test, size, err):
    """One ucx_perftest server/client pair; the client's overall bandwidth in bytes/s."""
    iters, warm = (2000, 200) if size < 1 << 20 else (16, 2)
    port = free_port()
    env = env_for(tls)
    srv = subprocess.Popen(["ucx_perftest", "-p", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        args = ["ucx_perftest", "127.0.0.1", "-p", str(port), "-t", test, "-s", str(size),
                "-n", str(iters), "-w", str(warm), "-f"] + (["-e"] if err else [])
        for attempt in range(10):
            res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
            if res.returncode == 0:
                break
            time.sleep(0.3)  # the server may not listen yet
        else:
            raise RuntimeError("ucx_perftest %s failed: %s" % (" ".join(args), res.stderr[-800:]))
        # final line: iters, overhead 50%ile/avg/overall, bandwidth avg/overall (MB/s,
        # 2^20 bytes), message rate avg/overall
        nums = None
        for line in res.stdout.splitlines():
            f = line.split()
            if len(f) == 8 and all(re.fullmatch(r"[\d.]+", x) for x in f):
                nums = [float(x) for x in f]
        if nums is None:
            raise RuntimeError("no result line in ucx_perftest output:\n" + res.stdout)
        return nums[5] * 1048576.0
    finally:
        srv.kill()
        srv.wait()


def perftest(tls, test, size, err, repeats):
    vals = [perftest_once(tls, test, size, err) for _ in range(repeats)]
    return {"runs_bytes_per_s": vals, "median_bytes_per_s": statistics.median(vals)}


def gbs(x):
    return "%.2f" % (x / 1e9) if x else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.environ.get("PD_BUILD_DIR",
                                                          os.path.join(ROOT, "build")))
    ap.add_argument("--runs", type=int, default=9, help="bench_kvxfer runs per mode")
    ap.add_argument("--repeats", type=int, default=3, help="ucx_perftest runs per point")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    a = ap.parse_args()
    exe = os.path.join(a.build_dir, "bench", "bench_kvxfer")
    if not os.access(exe, os.X_OK):
        sys.exit("no %s: build the bench_kvxfer target" % exe)
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.time()
    result = {"machine": machine(), "kvxfer": {}, "perftest": {}}
    for tls in TRANSPORTS:
        log("bench_kvxfer, UCX_TLS=%s" % tls)
        result["kvxfer"][tls] = run_kvxfer(exe, tls, a.runs)
        result["perftest"][tls] = {}
        for name, size in SIZES.items():
            for test, err in (("ucp_put_bw", True), ("ucp_get", True), ("ucp_put_bw", False)):
                key = "%s%s %s" % (test, " -e" if err else "", name)
                log("ucx_perftest %s, UCX_TLS=%s" % (key, tls))
                result["perftest"][tls][key] = perftest(tls, test, size, err, a.repeats)
    result["seconds"] = time.time() - t0

    mode_of = {"48 KiB": "scattered", "6 MiB": "contiguous"}
    lines = ["| UCX_TLS | message | kvxfer get GB/s (mode) | perftest put_bw -e GB/s | "
             "kvxfer / put_bw -e | perftest get -e GB/s | perftest put_bw (no err "
             "handling) GB/s |", "|---|---|---|---|---|---|---|"]
    for tls in TRANSPORTS:
        for name in SIZES:
            k = result["kvxfer"][tls][mode_of[name]]
            pt = result["perftest"][tls]
            put_e = pt["ucp_put_bw -e " + name]["median_bytes_per_s"]
            ratio = k["median_bytes_per_s"] / put_e if put_e else 0
            k["ratio_to_put_bw_e"] = ratio
            lines.append("| %s | %s | %s (%s, %d gets/run) | %s | %.0f%% | %s | %s |" % (
                tls, name, gbs(k["median_bytes_per_s"]), k["mode"], k["gets_per_run"],
                gbs(put_e), 100 * ratio, gbs(pt["ucp_get -e " + name]["median_bytes_per_s"]),
                gbs(pt["ucp_put_bw " + name]["median_bytes_per_s"])))
    m = result["machine"]
    md = ("# KV transfer (common/kvxfer) vs ucx_perftest\n\n%s, %d cores, UCX %s; "
          "medians (kvxfer: %d runs of 144 MiB; perftest: %d runs), GB = 1e9 bytes.\n\n"
          % (m.get("cpu"), m["cores"], m["ucx"], a.runs, a.repeats) + "\n".join(lines) + "\n")
    print(md)
    with open(os.path.join(a.out_dir, "bench_kvxfer.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out_dir, "bench_kvxfer.md"), "w") as f:
        f.write(md)
    log("done in %.0f s" % result["seconds"])


if __name__ == "__main__":
    main()
