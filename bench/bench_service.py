#!/usr/bin/python3
"""bench_service.py - the disaggregated service on `mkmodel 110M` (F32): time to first
token for 2048-token prompts, disaggregated (1 prefill + 1 decode worker, the KV pulled
over UCX layer by layer, and in bulk) against colocated (one decode worker prefilling
itself), and the KV transfer rate the decode worker measures for those prompts, beside
ucx_perftest at the same message size and transport, all in one run.

Each configuration runs --prompts distinct random 2048-token prompts one at a time
(max_tokens 1, so the TTFT is the request's latency), rounds alternating between the
configurations; figures are medians. The workers get --threads kernel threads each
(default 2: this machine's cores); the idle decode worker of the disaggregated runs
sleeps. Writes bench/out/bench_service.json and prints a table.
Usage: /usr/bin/python3 bench/bench_service.py [--build-dir build] [--rounds 3] [--prompts 3]"""
import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))
sys.path.insert(0, HERE)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    ap.add_argument("--skip-perftest", action="store_true")
    a = ap.parse_args()
    os.environ["PD_BIN_DIR"] = os.path.join(os.path.abspath(a.build_dir), "bin")
    os.makedirs(a.out_dir, exist_ok=True)
    import pdcluster  # after PD_BIN_DIR is set
    # the 110M preset declares 1024 positions; --ctx 4096 makes room for the prompts
    model = os.path.join(a.out_dir, "m110-f32-ctx4096.gguf")
    if not os.path.exists(model):
        log("writing " + model)
        subprocess.run([os.path.join(os.environ["PD_BIN_DIR"], "pdctl"), "mkmodel",
                        "--preset", "110M", "--dtype", "f32", "--ctx", "4096", "-o", model],
                       check=True)
    logdir = os.path.join(a.out_dir, "service-logs")
    os.makedirs(logdir, exist_ok=True)
    common = ["--threads", str(a.threads), "--kv-memory", "512MiB"]
    configs = {
        "disagg-layerwise": dict(n_prefill=1, n_decode=1, prefill_args=common,
                                 decode_args=common),
        "disagg-bulk": dict(n_prefill=1, n_decode=1,
                            prefill_args=common + ["--kv-layerwise-min", "1000000"],
                            decode_args=common),
        "colocated": dict(n_prefill=0, n_decode=1, decode_args=common + ["--local-prefill"],
                          router_args=["--local-prefill-max", "1000000"]),
    }
    rng = random.Random(7)
    ttft = {k: [] for k in configs}
    xfer = {k: [] for k in configs}
    tail = {k: [] for k in configs}
    for rnd in range(a.rounds):
        for name, cfg in configs.items():
            log(f"round {rnd + 1}/{a.rounds}: {name}")
            with pdcluster.Cluster(["--model", model], cfg["n_prefill"], cfg["n_decode"],
                                   "ucx", router_args=cfg.get("router_args", ()),
                                   prefill_args=cfg.get("prefill_args", ()),
                                   decode_args=cfg.get("decode_args", ()),
                                   threads=a.threads, logdir=logdir) as cl:
                cl.wait_ready(timeout=120)
                c = cl.client()
                # warm-up (page in the weights)
                w = c.generate(prompt_ids=[1] + [rng.randrange(3, 32000) for _ in range(64)],
                               max_tokens=1)
                c.wait_all([w], timeout=300)
                for _ in range(a.prompts):
                    ids = [1] + [rng.randrange(3, 32000) for _ in range(a.prompt_len - 1)]
                    t0 = time.time()
                    rid = c.generate(prompt_ids=ids, max_tokens=1, no_text=True)
                    (r,) = c.wait_all([rid], timeout=600)
                    if r.error or not r.done:
                        raise RuntimeError(f"{name}: {r.error}")
                    ttft[name].append((time.time() - t0) * 1e3)
                c.close()
                dlog = cl.decode[0].log_path
            with open(dlog, errors="replace") as fh:
                for line in fh:
                    m = re.search(r"KV of (\d+) tokens, (\d+) bytes read in ([\d.]+) ms "
                                  r"\(([\d.]+) GB/s\), the last ([\d.]+) ms", line)
                    if m and int(m.group(1)) == a.prompt_len:
                        xfer[name].append(float(m.group(4)))
                        tail[name].append(float(m.group(5)))
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
           "model": "mkmodel 110M f32", "prompt_len": a.prompt_len, "threads": a.threads,
           "ttft_ms": {k: v for k, v in ttft.items()},
           "kv_gbs": xfer, "kv_tail_ms": tail}
    med = {k: statistics.median(v) for k, v in ttft.items()}
    res["ttft_median_ms"] = med
    res["ratio_layerwise"] = med["disagg-layerwise"] / med["colocated"]
    res["ratio_bulk"] = med["disagg-bulk"] / med["colocated"]
    kv_bytes = 2 * 12 * a.prompt_len * 768 * 4
    if not a.skip_perftest:
        import bench_kvxfer as bk
        # the service's gets: one per layer for K and V when the block ids are
        # contiguous (a fresh pool), 6 MiB for 2048 tokens; UCX picks TCP with peer
        # error handling (-e), as the service does
        size = a.prompt_len * 768 * 4
        pt = {}
        for test in ("ucp_get", "ucp_put_bw"):
            try:
                pt[test] = bk.perftest("default", test, size, True, 3)
            except Exception as e:  # noqa: BLE001
                pt[test] = None
                log(f"ucx_perftest {test}: {e}")
        res["perftest_bytes_per_s_e"] = pt
    with open(os.path.join(a.out_dir, "bench_service.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"# service on mkmodel 110M F32, {a.prompt_len}-token prompts, {a.threads} threads "
          f"per worker ({res['machine']})")
    print("| configuration | TTFT median ms | KV read GB/s median | KV read after KV_DONE ms |")
    print("|---|---|---|---|")
    for k in configs:
        g = statistics.median(xfer[k]) if xfer[k] else float("nan")
        t = statistics.median(tail[k]) if tail[k] else float("nan")
        print(f"| {k} | {med[k]:.1f} | {g:.3f} | {t:.2f} |")
    print(f"\nTTFT disaggregated / colocated: layer-wise {res['ratio_layerwise']:.3f}, "
          f"bulk {res['ratio_bulk']:.3f}; KV per prompt {kv_bytes / 1e6:.1f} MB")
    if not a.skip_perftest:
        for test, v in res["perftest_bytes_per_s_e"].items():
            if v:
                print(f"ucx_perftest -t {test} -e -s {a.prompt_len * 768 * 4} (same transport): "
                      f"{v['median_bytes_per_s'] / 1e9:.3f} GB/s median")


if __name__ == "__main__":
    main()
