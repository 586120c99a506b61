#!/usr/bin/env python3
"""bench_cpu.py - pdserve vs llama.cpp on the CPU, same GGUF files, same machine.

Builds nothing: expects <build-dir>/bin/pdctl (cmake --build <build-dir>). Steps:
  1. records the machine (lscpu), the pdserve commit and the llama.cpp version;
  2. compiles bench/membw.c with cc -O2 and measures read bandwidth (1 GiB buffer)
     at each thread count;
  3. makes the benchmark models with `pdctl mkmodel` (default 110M F32 and Q8_0,
     seed 1), cached in bench/out/ (gitignored) and reused when present;
  4. builds a prompt of exactly --n-prompt tokens including BOS (checked with
     sentencepiece against the Llama-2 tokenizer model in ../shared/models);
  5. pdserve: `pdctl generate --model M --prompt P --max-tokens N --ignore-eos
     --format json --threads T`, its own prompt / generation tokens/s;
  6. llama.cpp through llama-cpp-python (the --venv python, bench/llamacpp_bench.py,
     one process per model and thread count): the same files, the prompt in one
     batch of 512, then N greedy single-token evals, same thread counts;
     per thread count, one warm-up of each, then --reps rounds alternating the two
     engines (pdserve, llama.cpp, pdserve, ...), median of each;
  7. prints a markdown table (pdserve vs llama.cpp per row, ratio) with the implied
     weight bytes/s (model file bytes x generation tokens/s) beside the measured
     bandwidth, and writes bench/out/bench_cpu.{md,json}.
Runs with /usr/bin/python3 (numpy, sentencepiece from Debian). One engine computes
at a time (the other waits), so they never compete for the cores.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FILLER = ("Once upon a time, there was a little girl named Lily. She loved to play "
          "outside in the park with her friends. One day, she found a shiny red ball "
          "under a big tree, and she ran to show it to her mother. ")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, timeout=600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed (rc %d): %s" % (" ".join(cmd[:3]), r.returncode,
                                                      r.stderr[-2000:]))
    return r.stdout


def machine_info():
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "kernel": platform.release(), "nproc": os.cpu_count()}
    try:
        for line in sh(["lscpu"]).splitlines():
            k, _, v = line.partition(":")
            v = v.strip()
            if k in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                     "Hypervisor vendor", "CPU max MHz"):
                info[k] = v
            if k == "Flags":
                info["isa"] = " ".join(f for f in ("avx2", "fma", "f16c", "avx512f",
                                                   "avx512bw", "avx512_vnni", "avx512_bf16")
                                       if f in v.split())
    except (OSError, RuntimeError) as e:
        info["lscpu_error"] = str(e)
    with open("/proc/loadavg") as f:
        info["loadavg_start"] = f.read().split()[:3]
    with open("/proc/meminfo") as f:
        info["mem_total"] = f.readline().split(":")[1].strip()
    return info


def build_commit(build_dir):
    """The commit the pdctl under test was built from: the git HEAD of the build's
    source tree (from CMakeCache.txt), '+dirty' when it has uncommitted changes."""
    src = ROOT
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    src = line.split("=", 1)[1].strip()
        head = sh(["git", "-C", src, "rev-parse", "--short", "HEAD"]).strip()
        dirty = sh(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"])
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, RuntimeError):
        return "unknown (source %s is not a git checkout; use --pdserve-commit)" % src


def membw(out_dir, threads):
    exe = os.path.join(out_dir, "membw")
    sh(["cc", "-O2", "-pthread", os.path.join(HERE, "membw.c"), "-o", exe])
    res = {}
    for t in threads:
        res[t] = json.loads(sh([exe, str(t), "1024", "5"]))["gb_per_s"]
        log("membw %d thread(s): %.1f GB/s" % (t, res[t]))
    return res


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def make_model(pdctl, out_dir, spec, shared):
    preset, dtype = spec.split(":")
    path = os.path.join(out_dir, "%s_%s_s1.gguf" % (preset, dtype))
    if not os.path.exists(path):
        log("making", path)
        sh([pdctl, "mkmodel", "--preset", preset, "--dtype", dtype, "--seed", "1", "-o", path,
            "--tokenizer", os.path.join(shared, "models", "llama2_tokenizer.bin")])
    # Decoding a token reads every weight once except the embedding table (one row).
    dim = {"15M": 288, "110M": 768, "1B": 2048}[preset]
    per_elem = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[dtype]
    size = os.path.getsize(path)
    return {"spec": spec, "preset": preset, "dtype": dtype, "path": path, "bytes": size,
            "bytes_per_token": int(size - 32000 * dim * per_elem), "sha256": sha256(path)}


def make_prompt(shared, n_prompt, out_dir):
    """Text whose SentencePiece encoding is exactly n_prompt - 1 tokens (+ BOS)."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(shared, "models", "llama2_tokenizer.model"))
    text = ""
    while len(sp.encode(text + FILLER)) <= n_prompt - 1:
        text += FILLER
    text = text.rstrip()
    while len(sp.encode(text)) < n_prompt - 1:  # " the" is one token
        text += " the"
    ids = [sp.bos_id()] + sp.encode(text)
    if len(ids) != n_prompt:
        raise RuntimeError("prompt has %d tokens, want %d" % (len(ids), n_prompt))
    with open(os.path.join(out_dir, "prompt.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out_dir, "prompt_ids.json"), "w") as f:
        json.dump(ids, f)
    return text, ids


def cpu_busy(interval=0.5):
    """Fraction of all CPUs busy over interval s (this script is idle meanwhile)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(a, stats):
    """Waits up to --wait-idle s for other processes to leave the CPUs (< 10% busy);
    counts the rounds that had to start on a busy machine."""
    if a.wait_idle <= 0:
        return
    deadline = time.time() + a.wait_idle
    while True:
        busy = cpu_busy()
        if busy < 0.10:
            return
        if time.time() > deadline:
            stats["rounds_contended"] += 1
            log("machine still %.0f%% busy after %gs; running anyway" % (100 * busy,
                                                                         a.wait_idle))
            return


def pdserve_run(pdctl, model, text, ids, t, n_gen):
    out = json.loads(sh([pdctl, "generate", "--model", model["path"], "--prompt", text,
                         "--max-tokens", str(n_gen), "--ignore-eos", "--format", "json",
                         "--threads", str(t)]))
    if out.get("prompt_ids") != ids or len(out.get("ids", [])) != n_gen:
        raise RuntimeError("pdserve: %d prompt ids (match %s), %d generated"
                           % (len(out.get("prompt_ids", [])), out.get("prompt_ids") == ids,
                              len(out.get("ids", []))))
    return {"prompt_tok_s": out["timings"]["prompt_tokens_per_s"],
            "gen_tok_s": out["timings"]["gen_tokens_per_s"], "ids": out["ids"]}


class LlamaCpp:
    """A llamacpp_bench.py process holding one model at one thread count."""

    def __init__(self, a, model, t):
        py = os.path.join(a.venv, "bin", "python")
        if not os.access(py, os.X_OK):
            raise RuntimeError("no %s: install llama-cpp-python there (docs/benchmarks.md) "
                               "or pass --no-llamacpp" % py)
        self.p = subprocess.Popen(
            [py, os.path.join(HERE, "llamacpp_bench.py"), "--model", model["path"],
             "--prompt-file", os.path.join(a.out_dir, "prompt.txt"),
             "--expect-ids", os.path.join(a.out_dir, "prompt_ids.json"),
             "--threads", str(t)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        if not self.info.get("tokenization_matches") or self.info.get("n_vocab") != 32000:
            raise RuntimeError("llama.cpp: tokenization or vocabulary differs: %s" % self.info)

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("llamacpp_bench.py exited (rc %s)" % self.p.wait())
        return json.loads(line)

    def round(self, n_gen):
        self.p.stdin.write("round %d\n" % n_gen)
        self.p.stdin.flush()
        r = self._read()
        if not r.get("logits_ok"):
            raise RuntimeError("llama.cpp: non-finite or constant logits: %s" % r)
        return r

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)


def bench_model(pdctl, m, text, ids, threads, a, stats):
    """Per thread count: a warm-up of each engine, then --reps rounds, each one pdserve
    run followed by one llama.cpp round (interleaved, so load bursts hit both)."""
    engines = ([] if a.no_pdserve else ["pdserve"]) + ([] if a.no_llamacpp else ["llama.cpp"])
    for eng in engines:
        m[eng] = {"runs": []}
    for t in threads:
        lc = LlamaCpp(a, m, t) if "llama.cpp" in engines else None
        try:
            if lc:
                m["llama.cpp"]["info"] = lc.info
            run = {"pdserve": lambda n: pdserve_run(pdctl, m, text, ids, t, n),
                   "llama.cpp": lambda n: lc.round(n)}
            got = {eng: [] for eng in engines}
            for rep in range(a.reps + 1):  # round 0 is a warm-up
                for eng in engines:
                    if rep:
                        wait_idle(a, stats)
                        stats["rounds"] += 1
                    r = run[eng](4 if rep == 0 else a.n_gen)
                    if rep:
                        got[eng].append(r)
        finally:
            if lc:
                lc.close()
        for eng in engines:
            rs = got[eng]
            m[eng]["runs"].append({"threads": t,
                                   "prompt_tok_s": [r["prompt_tok_s"] for r in rs],
                                   "gen_tok_s": [r["gen_tok_s"] for r in rs],
                                   "gen_ids": rs[-1]["ids"]})
            log("%s %s t%d: prompt %.1f tok/s, gen %.2f tok/s" % (
                eng, m["spec"], t, statistics.median(r["prompt_tok_s"] for r in rs),
                statistics.median(r["gen_tok_s"] for r in rs)))


def fmt(x, nd=1):
    return "-" if x is None else ("%.*f" % (nd, x))


def table(res):
    rows = ["| model | file MB | threads | metric | pdserve tok/s | llama.cpp tok/s | "
            "pdserve / llama.cpp |", "|---|---|---|---|---|---|---|"]
    bw_rows = ["| model | threads | membw GB/s | pdserve weight GB/s | llama.cpp weight GB/s |"
               " pdserve / llama.cpp excl. embeddings GB/s |", "|---|---|---|---|---|---|"]
    for m in res["models"]:
        mb = m["bytes"] / 1e6
        for t in res["threads"]:
            med = {}
            for eng in ("pdserve", "llama.cpp"):
                run = next((r for r in m.get(eng, {}).get("runs", []) if r["threads"] == t),
                           None)
                for metric in ("prompt_tok_s", "gen_tok_s"):
                    med[eng, metric] = statistics.median(run[metric]) if run else None
            for metric, label in (("prompt_tok_s", "prompt %d" % res["n_prompt"]),
                                  ("gen_tok_s", "gen %d" % res["n_gen"])):
                p, l = med["pdserve", metric], med["llama.cpp", metric]
                ratio = "%.2f" % (p / l) if p and l else "-"
                rows.append("| %s | %.0f | %d | %s | %s | %s | %s |" % (
                    m["spec"], mb, t, label, fmt(p, 2 if metric == "gen_tok_s" else 1),
                    fmt(l, 2 if metric == "gen_tok_s" else 1), ratio))
            wp, wl = med["pdserve", "gen_tok_s"], med["llama.cpp", "gen_tok_s"]
            bpt = m["bytes_per_token"]
            bw_rows.append("| %s | %d | %.1f | %s | %s | %s / %s |" % (
                m["spec"], t, res["membw_gb_s"][t], fmt(wp and wp * m["bytes"] / 1e9),
                fmt(wl and wl * m["bytes"] / 1e9), fmt(wp and wp * bpt / 1e9),
                fmt(wl and wl * bpt / 1e9)))
    agree = []
    for m in res["models"]:
        for t in res["threads"]:
            ids = {}
            for eng in ("pdserve", "llama.cpp"):
                run = next((r for r in m.get(eng, {}).get("runs", []) if r["threads"] == t),
                           None)
                ids[eng] = run.get("gen_ids") if run else None
            if ids["pdserve"] and ids["llama.cpp"]:
                n = 0
                while (n < min(len(ids["pdserve"]), len(ids["llama.cpp"])) and
                       ids["pdserve"][n] == ids["llama.cpp"][n]):
                    n += 1
                agree.append("%s t%d: %d of %d" % (m["spec"], t, n, len(ids["llama.cpp"])))
    mi = res["machine"]
    head = ["CPU: %s, %s CPUs, ISA %s, %s; pdserve %s; llama-cpp-python %s; %s" % (
        mi.get("Model name"), mi.get("CPU(s)"), mi.get("isa"), mi.get("mem_total"),
        mi.get("pdserve_commit"), res.get("llama_cpp_python", "-"), mi["date"]),
        "Median of %d runs after a warm-up; prompt = %d tokens incl. BOS in one batch; "
        "gen = %d greedy tokens after it, EOS ignored. Load average at start %s, end %s "
        "(other processes on the machine skew results)." % (
            res["reps"], res["n_prompt"], res["n_gen"], "/".join(mi["loadavg_start"]),
            "/".join(mi["loadavg_end"])),
        "Timed rounds started on a busy machine (other processes > 10%% CPU after "
        "waiting %gs): %d of %d." % (res.get("contention", {}).get("wait_idle_s", 0),
                                     res.get("contention", {}).get("rounds_contended", 0),
                                     res.get("contention", {}).get("rounds", 0))]
    return "\n".join(head + [""] + rows + [
        "", "Implied weight bytes/s = model file bytes x gen tok/s (and, closer to what "
        "a decode step reads, the file less the embedding table, of which a step reads "
        "one row):", ""] + bw_rows + (
        ["", "Greedy tokens identical from the start, pdserve vs llama.cpp (random "
         "weights give near-tied logits, so a late divergence is rounding, an early one "
         "a bug): " + "; ".join(agree)] if agree else [])) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--shared-dir", default=os.environ.get(
        "PD_SHARED_DIR", os.path.join(ROOT, "..", "shared")))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    ap.add_argument("--venv", default="/work/venv-bench")
    ap.add_argument("--models", default="110M:f32,110M:q8_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--no-pdserve", action="store_true", help="llama.cpp only")
    ap.add_argument("--no-llamacpp", action="store_true", help="pdserve only")
    ap.add_argument("--wait-idle", type=float, default=20,
                    help="before each timed round, wait up to this many seconds for the "
                    "CPUs to be idle (0: don't)")
    ap.add_argument("--pdserve-commit", help="record this as the commit under test "
                    "(default: the git HEAD of the build's source tree)")
    ap.add_argument("--report-only", action="store_true",
                    help="re-print the table of <out-dir>/bench_cpu.json, run nothing")
    a = ap.parse_args()
    if a.report_only:
        with open(os.path.join(a.out_dir, "bench_cpu.json")) as f:
            res = json.load(f)
        res["membw_gb_s"] = {int(k): v for k, v in res["membw_gb_s"].items()}
        print(table(res))
        return
    pdctl = os.path.join(a.build_dir, "bin", "pdctl")
    if not os.access(pdctl, os.X_OK):
        sys.exit("bench_cpu: no %s: build it first (cmake --build %s)" % (pdctl, a.build_dir))
    os.makedirs(a.out_dir, exist_ok=True)
    threads = [int(x) for x in a.threads.split(",")]
    res = {"machine": machine_info(), "threads": threads, "reps": a.reps,
           "n_prompt": a.n_prompt, "n_gen": a.n_gen,
           "contention": {"wait_idle_s": a.wait_idle, "rounds": 0, "rounds_contended": 0}}
    res["machine"]["pdserve_commit"] = a.pdserve_commit or build_commit(a.build_dir)
    log("machine:", res["machine"].get("Model name"), res["machine"].get("isa"),
        "pdserve", res["machine"]["pdserve_commit"])
    wait_idle(a, res["contention"])
    res["membw_gb_s"] = membw(a.out_dir, threads)
    text, ids = make_prompt(a.shared_dir, a.n_prompt, a.out_dir)
    res["models"] = [make_model(pdctl, a.out_dir, s, a.shared_dir) for s in a.models.split(",")]
    for m in res["models"]:
        bench_model(pdctl, m, text, ids, threads, a, res["contention"])
        if "llama.cpp" in m:
            res["llama_cpp_python"] = m["llama.cpp"]["info"]["llama_cpp_python"]
    with open("/proc/loadavg") as f:
        res["machine"]["loadavg_end"] = f.read().split()[:3]
    md = table(res)
    with open(os.path.join(a.out_dir, "bench_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out_dir, "bench_cpu.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
