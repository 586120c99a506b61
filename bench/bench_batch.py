#!/usr/bin/env python3
"""bench_batch.py - continuous batching: pdserve vs llama.cpp, aggregate tokens/s
against the number of concurrent sequences, same GGUF files, same machine.

Builds nothing (but see --build-llama-server): expects <build-dir>/bin/pdctl. Steps:
  1. records the machine (lscpu), the pdserve commit and the llama.cpp build;
  2. makes or reuses the benchmark models (bench_cpu.py's: `pdctl mkmodel`, 110M F32
     and Q8_0, seed 1, cached in bench/out/);
  3. N distinct short prompts (8-32 tokens incl. BOS, SentencePiece ids from the
     Llama-2 tokenizer model in ../shared/models; each engine's tokenization is
     checked against them);
  4. per model and N in 1,2,4,8,16,32,64: the N prompts arrive together, each
     generates --max-tokens (128) greedy tokens, EOS ignored; aggregate generated
     tokens / wall seconds (prefill included) of each engine:
       pdserve:      `pdctl generate --prompts F.jsonl --parallel N --max-tokens 128
                     --ignore-eos --arrival-steps 0 --threads 2 --format json`,
                     the summary's gen_tokens_per_s (one process per run);
       llama-server: llama.cpp's C++ server (`llama-server -np N -cb -t 2`, built from
                     the llama.cpp sources that the installed llama-cpp-python vendors;
                     --build-llama-server), N concurrent POST /completion requests,
                     wall from the first request sent to the last response;
       libllama:     bench/llamacpp_server.py in the --venv python: the same
                     continuous-batching loop done by hand on libllama, one
                     llama_decode per step for all N sequences, no HTTP;
     one warm-up round of each, then --repeats rounds alternating the engines
     (pdserve, llama-server, libllama, pdserve, ...), medians;
  5. prefix cache: 16 prompts sharing a ~400-token prefix plus distinct tails,
     max_tokens 1: pdserve's prompt tokens/s with and without --no-prefix-cache, and
     its hit rate; the llama.cpp engines beside it for reference (no cross-sequence
     prefix sharing: cache_prompt off);
  6. bench/out/bench_batch.{json,md} (a markdown table, also on stdout) and a plot,
     bench/out/bench_batch.png (matplotlib: this python's, or the --venv python's).
Runs with /usr/bin/python3 (numpy, sentencepiece from Debian). One engine computes at
a time; the idle peers wait on a socket or a pipe.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_cpu as bc  # noqa: E402  (machine_info, build_commit, make_model, wait_idle)

ENGINES = ("pdserve", "llama-server", "libllama")
FULL_N = [1, 2, 4, 8, 16, 32, 64]
QUICK_N = [1, 4, 16]
# (layers, KV dim) per preset: KV bytes per token = layers x 2 x kv_dim x 4 (F32 worst).
KV_SHAPE = {"15M": (6, 288), "110M": (12, 768), "1B": (16, 512)}
ISSUE_LLAMA_SERVER_N4 = 159.0  # tok/s quoted in the issue: llama-server -np 4 -cb, F32
WORDS = ("the little girl found a shiny red ball under a big tree and ran home to show "
         "her mother who smiled and baked a warm apple pie for the whole family while "
         "the dog barked at a bird in the garden near the old blue house by the river "
         "where children played every sunny morning before school").split()
TAILS = ("What did Lily find?", "Where was the ball?", "Who smiled at Lily?",
         "Why did she run?", "What color was the ball?", "Where did she play?",
         "Who were her friends?", "What happened next?", "Was the tree big?",
         "Did her mother like it?", "What time of day was it?", "Was the park far?",
         "How did Lily feel?", "What did the ball look like?", "Who came along?",
         "What is the moral?")
log = bc.log


# ---------------------------------------------------------------------------- prompts

def tokenizer(shared):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(shared, "models", "llama2_tokenizer.model"))


def make_prompts(sp, n, lo=8, hi=32):
    """n distinct prompts, prompt i with about lo..hi tokens (BOS included)."""
    out = []
    for i in range(n):
        target = lo + (i * 11) % (hi - lo + 1)
        words, text = ["Story %d:" % i], ""
        j = i * 5
        while True:
            cand = " ".join(words + [WORDS[j % len(WORDS)]])
            if 1 + len(sp.encode(cand)) > target:
                break
            words.append(WORDS[j % len(WORDS)])
            j += 1
        text = " ".join(words)
        out.append({"text": text, "ids": [sp.bos_id()] + sp.encode(text)})
    return out


def make_prefix_prompts(sp, n, prefix_tokens=400):
    """n prompts: one prefix of about prefix_tokens tokens (BOS included), then a
    distinct question each. Returns them and the number of leading ids all share."""
    prefix = ""
    while 1 + len(sp.encode(prefix + bc.FILLER)) <= prefix_tokens:
        prefix += bc.FILLER
    prefix = prefix.rstrip()
    k = 0
    while 1 + len(sp.encode(prefix)) < prefix_tokens:
        prefix += " " + WORDS[k % len(WORDS)]
        k += 1
    out = []
    for i in range(n):
        text = "%s. Question %d: %s" % (prefix, i + 1, TAILS[i % len(TAILS)])
        out.append({"text": text, "ids": [sp.bos_id()] + sp.encode(text)})
    shared = 0
    while all(len(p["ids"]) > shared and p["ids"][shared] == out[0]["ids"][shared]
              for p in out):
        shared += 1
    return out, shared


# ---------------------------------------------------------------------------- pdserve

def kv_memory(a, model, prompts, max_tokens):
    """--kv-memory for pdserve: 'auto' = room for every sequence at its full length
    (F32 KV, rounded up to a block and to 64 MiB, at least 256 MiB), so that a run
    measures batching, not preemption."""
    if a.kv_memory != "auto":
        return a.kv_memory
    layers, kv_dim = KV_SHAPE[model["preset"]]
    bs = a.block_size
    tokens = sum(-(-(len(p["ids"]) + max_tokens) // bs) * bs for p in prompts)
    mib = -(-tokens * layers * 2 * kv_dim * 4 // (64 << 20)) * 64
    return "%dMiB" % max(256, mib)


def pdserve_round(a, pdctl, model, prompts, max_tokens, extra=()):
    path = os.path.join(a.out_dir, "bench_batch_prompts.%d.jsonl" % os.getpid())
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p["text"]}) + "\n")
    cmd = [pdctl, "generate", "--model", model["path"], "--prompts", path,
           "--parallel", str(len(prompts)), "--max-tokens", str(max_tokens),
           "--ignore-eos",
           "--arrival-steps", str(a.arrival_steps), "--threads", str(a.threads),
           "--kv-memory", kv_memory(a, model, prompts, max_tokens),
           "--block-size", str(a.block_size), "--seed", "1", "--format", "json"]
    cmd += list(extra) + a.pdserve_args.split()
    try:
        out = bc.sh(cmd, timeout=1800)
    finally:
        os.unlink(path)
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    summ = next((x["summary"] for x in lines if "summary" in x), None)
    reqs = sorted((x for x in lines if "summary" not in x), key=lambda x: x["index"])
    if summ is None or len(reqs) != len(prompts):
        raise RuntimeError("pdserve: %d request lines, summary %s" % (len(reqs),
                                                                       summ is not None))
    for p, r in zip(prompts, reqs):
        if r.get("prompt_ids") != p["ids"] or len(r.get("ids", [])) != max_tokens:
            raise RuntimeError("pdserve request %d: prompt ids match %s, %d generated" % (
                r["index"], r.get("prompt_ids") == p["ids"], len(r.get("ids", []))))
    bsz = summ.get("batch_size", {})
    return {"gen_tok_s": summ["gen_tokens_per_s"],
            "prompt_tok_s": summ["prompt_tokens_per_s"],
            "wall_s": summ["wall_s"], "gen_tokens": summ["gen_tokens"],
            "prompt_tokens": summ["prompt_tokens"], "steps": summ.get("decode_steps"),
            "batch_mean": bsz.get("mean"), "batch_max": bsz.get("max"),
            "preemptions": summ.get("preemptions"),
            "hit_rate": summ.get("prefix_cache", {}).get("hit_rate"),
            "kv": summ.get("kv"), "ids0": reqs[0]["ids"]}


# ------------------------------------------------------------------------- llama.cpp

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=1800):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class LlamaServer:
    """llama.cpp's C++ llama-server holding one model with n slots, on 127.0.0.1."""

    def __init__(self, a, model, n, ctx_per_seq):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.logf = open(os.path.join(a.out_dir, "llama-server.log"), "a")
        cmd = [a.llama_server, "-m", model["path"], "-t", str(a.threads), "-tb",
               str(a.threads), "-np", str(n), "-cb", "-c", str(n * ctx_per_seq),
               "--host", "127.0.0.1", "--port", str(self.port), "--no-webui",
               "--cache-ram", "0"]
        self.logf.write("\n$ %s\n" % " ".join(cmd))
        self.logf.flush()
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        deadline = time.time() + 300
        while True:
            if self.p.poll() is not None:
                raise RuntimeError("llama-server exited (rc %d), see %s"
                                   % (self.p.returncode, self.logf.name))
            try:
                if http(self.url + "/health", timeout=5).get("status") == "ok":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("llama-server did not become ready")
            time.sleep(0.2)
        props = http(self.url + "/props")
        self.info = {"build_info": props.get("build_info"),
                     "total_slots": props.get("total_slots"), "n_ctx": n * ctx_per_seq}
        if props.get("total_slots") != n:
            raise RuntimeError("llama-server: %s slots, want %d"
                               % (props.get("total_slots"), n))

    def round(self, prompts, max_tokens):
        res = [None] * len(prompts)
        go = threading.Event()

        def one(i):
            go.wait()
            try:
                res[i] = http(self.url + "/completion", {
                    "prompt": prompts[i]["ids"], "n_predict": max_tokens,
                    "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                    "return_tokens": True, "stream": False})
            except OSError as e:
                res[i] = {"error": str(e)}
            res[i]["t_done"] = time.perf_counter()

        th = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in th:
            t.start()
        t0 = time.perf_counter()
        go.set()
        for t in th:
            t.join()
        wall = max(r["t_done"] for r in res) - t0
        for p, r in zip(prompts, res):
            if "error" in r or len(r.get("tokens", [])) != max_tokens or \
                    r["timings"]["prompt_n"] != len(p["ids"]):
                raise RuntimeError("llama-server: bad response %s" % str(r)[:500])
        n_gen = sum(len(r["tokens"]) for r in res)
        n_prompt = sum(len(p["ids"]) for p in prompts)
        return {"gen_tok_s": n_gen / wall, "prompt_tok_s": n_prompt / wall,
                "wall_s": wall,
                "gen_tokens": n_gen, "prompt_tokens": n_prompt, "ids0": res[0]["tokens"]}

    def close(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()


class LibLlama:
    """A bench/llamacpp_server.py process: n sequences batched by hand on libllama."""

    def __init__(self, a, model, n, ctx_per_seq):
        py = os.path.join(a.venv, "bin", "python")
        self.p = subprocess.Popen(
            [py, os.path.join(HERE, "llamacpp_server.py"), "--model", model["path"],
             "--threads", str(a.threads), "--n-seq", str(n), "--ctx-per-seq",
             str(ctx_per_seq)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _call(self, obj):
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()
        return self._read()

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("llamacpp_server.py exited (rc %s)" % self.p.wait())
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError("llamacpp_server.py: %s" % r["error"])
        return r

    def tokenize(self, texts):
        return self._call({"cmd": "tokenize", "texts": texts})["ids"]

    def round(self, prompts, max_tokens):
        r = self._call({"cmd": "round", "prompts": [p["ids"] for p in prompts],
                        "max_tokens": max_tokens, "arrival_steps": 0})
        if not r["logits_ok"] or any(len(x) != max_tokens for x in r["ids"]):
            raise RuntimeError("libllama: bad round %s" % str(r)[:500])
        return {"gen_tok_s": r["gen_tokens_per_s"],
                "prompt_tok_s": r["prompt_tokens_per_s"],
                "wall_s": r["wall_s"], "gen_tokens": r["gen_tokens"],
                "prompt_tokens": r["prompt_tokens"], "steps": r["steps"],
                "batch_mean": r["batch_size_mean"], "batch_max": r["batch_size_max"],
                "ids0": r["ids"][0]}

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)


def build_llama_server(a):
    """Builds llama.cpp's llama-server from the llama.cpp sources vendored in the
    sdist of the llama-cpp-python version installed in --venv (so both peers run the
    same llama.cpp), -DGGML_NATIVE=ON like the venv's library, into <venv>/bin."""
    py = os.path.join(a.venv, "bin", "python")
    ver = bc.sh([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"]).strip()
    work = os.path.join(a.out_dir, "llama-server-build")
    os.makedirs(work, exist_ok=True)
    sdist = os.path.join(work, "llama_cpp_python-%s.tar.gz" % ver)
    if not os.path.exists(sdist):
        bc.sh([py, "-m", "pip", "download", "llama-cpp-python==%s" % ver, "--no-deps",
               "--no-binary", ":all:", "-d", work], timeout=1800)
    src = os.path.join(work, "llama_cpp_python-%s" % ver)
    if not os.path.isdir(src):
        bc.sh(["tar", "xzf", sdist, "-C", work])
    lsrc, bdir = os.path.join(src, "vendor", "llama.cpp"), os.path.join(work, "build")
    log("building llama-server from", lsrc, "(about 10 minutes on 2 cores)")
    bc.sh(["cmake", "-S", lsrc, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release",
           "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
           "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
           "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], timeout=1800)
    bc.sh(["cmake", "--build", bdir, "-j", str(os.cpu_count() or 2), "--target",
           "llama-server"], timeout=7200)
    shutil.copy2(os.path.join(bdir, "bin", "llama-server"), a.llama_server)
    log("installed", a.llama_server)


# ------------------------------------------------------------------------ the runs

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids):
    """(CPU ticks all processes spent busy, ticks this script, its waited-for children
    (pdctl) and the peer processes pids spent), from /proc."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    own = 0.0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                st = f.read().rsplit(")", 1)[1].split()
            own += int(st[11]) + int(st[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    t = os.times()
    own += (t.user + t.system + t.children_user + t.children_system) * CLK_TCK
    return busy, own


def timed_round(a, fn, max_tokens, pids, stats):
    """One timed round on a quiet machine: waits for idle CPUs, runs it, and measures
    the CPU time that other processes took meanwhile (all busy time less this
    script's, pdctl's and the peers'); a round where that exceeds --max-other-load
    of the machine is run again, up to --retries times."""
    for attempt in range(a.retries + 1):
        busy = {"rounds_contended": 0}  # bench_cpu's count: started on a busy machine
        bc.wait_idle(a, busy)
        stats["started_busy"] += busy["rounds_contended"]
        b0, o0 = cpu_snapshot(pids)
        r = fn(max_tokens)
        b1, o1 = cpu_snapshot(pids)
        other = max(0.0, (b1 - b0) - (o1 - o0)) / max(1.0, r["wall_s"] * CLK_TCK *
                                                        (os.cpu_count() or 1))
        r["other_load"] = other
        if other <= a.max_other_load:
            break
        if attempt < a.retries:
            stats["retries"] += 1
            log("  other processes took %.0f%% of the CPUs during the round: again"
                % (100 * other))
    stats["rounds"] += 1
    if r["other_load"] > a.max_other_load:
        stats["rounds_contended"] += 1
    return r


def run_rounds(a, pdctl, model, prompts, max_tokens, engines, n, ctx_per_seq, stats,
               pd_variants=(("pdserve", ()),)):
    """One (model, prompt set): start the peers, a warm-up of each engine, then
    --repeats rounds alternating them. Returns {engine: [round results]}."""
    peers = {}
    try:
        if "llama-server" in engines:
            peers["llama-server"] = LlamaServer(a, model, n, ctx_per_seq)
        if "libllama" in engines:
            peers["libllama"] = LibLlama(a, model, n, ctx_per_seq)
            ids = peers["libllama"].tokenize([p["text"] for p in prompts])
            if ids != [p["ids"] for p in prompts]:
                raise RuntimeError("llama.cpp tokenizes the prompts differently")
        runs = []
        if "pdserve" in engines:
            runs += [(name,
                      lambda d, x=extra: pdserve_round(a, pdctl, model, prompts, d, x))
                     for name, extra in pd_variants]
        runs += [(name, lambda d, p=p: p.round(prompts, d)) for name, p in peers.items()]
        pids = [p.p.pid for p in peers.values()]
        got = {name: [] for name, _ in runs}
        for name, fn in runs:  # warm-up
            fn(min(4, max_tokens))
        for rep in range(1, a.repeats + 1):
            for name, fn in runs:
                r = timed_round(a, fn, max_tokens, pids, stats)
                got[name].append(r)
                log("  %s %s N=%d rep %d: gen %.1f tok/s, prompt %.1f tok/s, wall %.2fs, "
                    "others %.0f%%" % (model["dtype"], name, n, rep, r["gen_tok_s"],
                                       r["prompt_tok_s"], r["wall_s"],
                                       100 * r["other_load"]))
        for name, p in peers.items():
            got[name + ":info"] = p.info
        return got
    finally:
        for p in peers.values():
            p.close()


def summarize(rs):
    out = {"gen_tok_s": [r["gen_tok_s"] for r in rs],
           "prompt_tok_s": [r["prompt_tok_s"] for r in rs],
           "wall_s": [r["wall_s"] for r in rs], "gen_tokens": rs[0]["gen_tokens"],
           "prompt_tokens": rs[0]["prompt_tokens"], "ids0": rs[-1]["ids0"],
           "other_load": [r.get("other_load") for r in rs]}
    for k in ("steps", "batch_mean", "batch_max", "preemptions", "hit_rate", "kv"):
        if rs[0].get(k) is not None:
            out[k] = rs[-1][k] if k == "kv" else statistics.median(r[k] for r in rs)
    out["gen_med"] = statistics.median(out["gen_tok_s"])
    out["prompt_med"] = statistics.median(out["prompt_tok_s"])
    return out


def bench_model(a, pdctl, sp, m, engines, stats, save):
    m.setdefault("curve", {})
    for n in a.concurrency:
        if n in m["curve"] and all(e in m["curve"][n] for e in engines):
            log("%s N=%d: kept from the previous run (--resume)" % (m["spec"], n))
            continue
        prompts = make_prompts(sp, n)
        log("%s N=%d: %d prompt tokens" % (m["spec"], n,
                                           sum(len(p["ids"]) for p in prompts)))
        got = run_rounds(a, pdctl, m, prompts, a.max_tokens, engines, n, a.ctx_per_seq,
                         stats)
        m["curve"][n] = {k: (v if k.endswith(":info") else summarize(v))
                         for k, v in got.items()}
        save()
    if a.no_prefix or m.get("prefix"):
        return
    prompts, n_prefix = make_prefix_prompts(sp, a.prefix_n, a.prefix_tokens)
    ctx = -(-(max(len(p["ids"]) for p in prompts) + 8) // 256) * 256
    log("%s prefix case: %d prompts, shared prefix %d tokens" % (m["spec"], len(prompts),
                                                                n_prefix))
    got = run_rounds(a, pdctl, m, prompts, 1, engines, len(prompts), ctx, stats,
                     pd_variants=(("pdserve", ()),
                                  ("pdserve-no-prefix-cache", ("--no-prefix-cache",))))
    m["prefix"] = {"n": len(prompts), "shared_prefix_tokens": n_prefix,
                   "prompt_tokens": sum(len(p["ids"]) for p in prompts),
                   "runs": {k: (v if k.endswith(":info") else summarize(v))
                            for k, v in got.items()}}


# ---------------------------------------------------------------------------- report

def med(r, key, thr):
    """Median of an engine's key ("gen" or "prompt") tok/s over its quiet rounds (other
    processes took <= thr of the CPUs), over all rounds when none was quiet; and
    whether it came from quiet rounds."""
    if not r:
        return None, True
    vals = r[key + "_tok_s"]
    other = r.get("other_load") or [None] * len(vals)
    quiet = [v for v, o in zip(vals, other) if o is not None and o <= thr]
    return statistics.median(quiet or vals), bool(quiet)



def fmt(x, nd=1):
    return "-" if x is None else "%.*f" % (nd, x)


def model_label(m):
    return "%s %s" % (m["preset"], m["dtype"].upper())


def table(res):
    mi = res["machine"]
    thr = res["contention"].get("max_other_load", 0.1)
    lines = ["CPU: %s, %s CPUs, ISA %s; pdserve %s; llama.cpp %s (llama-cpp-python %s); "
             "%s" % (mi.get("Model name"), mi.get("CPU(s)"), mi.get("isa"),
                     mi.get("pdserve_commit"), res.get("llama_cpp_build", "-"),
                     res.get("llama_cpp_python", "-"), mi["date"]),
             "%d threads; N prompts of 8-32 tokens arrive together, %d greedy tokens "
             "each "
             "(EOS ignored); aggregate generated tokens / wall s (prefill included); "
             "median of the quiet ones of %d rounds after a warm-up (* = none was quiet: "
             "median of all). Load average at start %s, end %s. A round is contended "
             "when other processes took > %.0f%% of the CPUs during it: %d of %d timed "
             "rounds still were after %d re-runs." % (
                 res["threads"], res["max_tokens"], res["repeats"],
                 "/".join(mi["loadavg_start"]), "/".join(mi.get("loadavg_end", ["-"])),
                 100 * res["contention"].get("max_other_load", 0),
                 res["contention"]["rounds_contended"], res["contention"]["rounds"],
                 res["contention"].get("retries", 0)), ""]
    for m in res["models"]:
        curve = m.get("curve", {})
        base = {e: med((curve.get(1) or curve.get("1") or {}).get(e), "gen", thr)[0]
                for e in ENGINES}
        lines += ["%s (%.0f MB), generation tok/s:" % (model_label(m), m["bytes"] / 1e6),
                  "", "| N | pdserve | x N=1 | llama-server | x N=1 | libllama batched |"
                  " x N=1 |"
                  " pdserve / llama-server | pdserve / libllama | pdserve batch mean |"
                  " preemptions |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in sorted(curve, key=int):
            row = curve[n]
            md = {e: med(row.get(e), "gen", thr) for e in ENGINES}
            cells = []
            for e in ENGINES:
                v = md[e][0]
                cells += [fmt(v) + ("" if md[e][1] else "*"),
                          fmt(v / base[e], 2) if v and base[e] else "-"]
            med_ = {e: md[e][0] for e in ENGINES}
            pd = row.get("pdserve", {})
            lines.append("| %s | %s | %s | %s | %s | %s |" % (
                n, " | ".join(cells),
                fmt(med_["pdserve"] / med_["llama-server"], 2)
                if med_["pdserve"] and med_["llama-server"] else "-",
                fmt(med_["pdserve"] / med_["libllama"], 2)
                if med_["pdserve"] and med_["libllama"] else "-",
                fmt(pd.get("batch_mean")), fmt(pd.get("preemptions"), 0)))
        lines += [""] + targets(m, thr) + [""]
        pf = m.get("prefix")
        if pf:
            lines += ["%s prefix cache: %d prompts sharing a %d-token prefix (%d prompt "
                      "tokens in all), 1 generated token each:" % (
                          model_label(m), pf["n"], pf["shared_prefix_tokens"],
                          pf["prompt_tokens"]), "",
                      "| engine | prompt tok/s | wall s | prefix-cache hit rate |",
                      "|---|---|---|---|"]
            for k in ("pdserve", "pdserve-no-prefix-cache", "llama-server", "libllama"):
                r = pf["runs"].get(k)
                if r:
                    lines.append("| %s | %s | %s | %s |" % (
                        k, fmt(med(r, "prompt", thr)[0]) + ("" if med(r, "prompt", thr)[1]
                                                             else "*"),
                        fmt(statistics.median(r["wall_s"]), 2),
                        fmt(r.get("hit_rate"), 3)))
            lines.append("")
    agree = []
    for m in res["models"]:
        for n, row in sorted(m.get("curve", {}).items(), key=lambda x: int(x[0])):
            ids = {e: row.get(e, {}).get("ids0") for e in ENGINES}
            if ids["pdserve"] and ids["llama-server"]:
                k = 0
                while (k < len(ids["pdserve"]) and k < len(ids["llama-server"]) and
                       ids["pdserve"][k] == ids["llama-server"][k]):
                    k += 1
                agree.append("%s N=%s %d" % (m["dtype"], n, k))
    if agree:
        lines.append("Greedy ids of request 0 identical from the start, pdserve vs "
                     "llama-server (of %d): %s" % (res["max_tokens"], "; ".join(agree)))
    return "\n".join(lines) + "\n"


def targets(m, thr):
    curve = {int(k): v for k, v in m.get("curve", {}).items()}
    g = {n: med(curve[n].get("pdserve"), "gen", thr)[0] for n in curve}
    ls = {n: med(curve[n].get("llama-server"), "gen", thr)[0] for n in curve}
    out = []
    if g.get(16) and g.get(1):
        x = g[16] / g[1]
        out.append("Target N=16 >= 6x N=1 (pdserve): %.2fx, %s." % (x, "met" if x >= 6
                                                                      else "not met"))
    if g.get(4) and ls.get(4):
        x = g[4] / ls[4]
        out.append("Target N=4 >= 2x llama.cpp's server: %.2fx llama-server measured "
                   "here (%s)." % (x, "met" if x >= 2 else "not met"))
    if g.get(4) and m["dtype"] == "f32":
        out.append("Against the issue's 159 tok/s (llama-server -np 4 -cb, F32): %.2fx."
                   % (g[4] / ISSUE_LLAMA_SERVER_N4))
    return out


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    thr = res["contention"].get("max_other_load", 0.1)
    models = [m for m in res["models"] if m.get("curve")]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5),
                             squeeze=False)
    style = {"pdserve": ("o-", "tab:blue"), "llama-server": ("s--", "tab:orange"),
             "libllama": ("^:", "tab:green")}
    for ax, m in zip(axes[0], models):
        ns = sorted(m["curve"], key=int)
        for e in ENGINES:
            pts = [(int(n), med(m["curve"][n][e], "gen", thr)[0]) for n in ns
                   if e in m["curve"][n]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style[e][0],
                        color=style[e][1],
                        label=e if e != "libllama" else "llama.cpp batched (libllama)")
        if m["dtype"] == "f32":
            ax.plot([4], [ISSUE_LLAMA_SERVER_N4], "x", color="black", markersize=9,
                    label="issue: llama-server -np 4 (159)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(n) for n in ns])
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("concurrent sequences N")
        ax.set_ylabel("generated tokens/s (all sequences)")
        ax.set_title("%s, %d threads, %d tokens each" % (model_label(m), res["threads"],
                                                        res["max_tokens"]))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def make_plot(a, res, json_path):
    png = os.path.join(a.out_dir, "bench_batch.png")
    try:
        plot(res, png)
    except ImportError:
        py = os.path.join(a.venv, "bin", "python")
        r = subprocess.run([py, os.path.abspath(__file__), "--plot-only", json_path,
                            "--out-dir", a.out_dir], capture_output=True, text=True)
        if r.returncode:
            log("no plot: matplotlib is in neither python (%s)" % r.stderr[-300:])
            return
    log("plot:", png)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--shared-dir", default=os.environ.get(
        "PD_SHARED_DIR", os.path.join(ROOT, "..", "shared")))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "out"))
    ap.add_argument("--venv", default="/work/venv-bench")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary (default "
                    "<venv>/bin/llama-server; --build-llama-server puts it there)")
    ap.add_argument("--build-llama-server", action="store_true",
                    help="build llama-server from the sdist of the venv's "
                    "llama-cpp-python first (pip download + cmake)")
    ap.add_argument("--models", default="f32,q8_0", help="dtypes of the 110M model, or "
                    "PRESET:DTYPE specs")
    ap.add_argument("--concurrency", help="comma-separated N (default 1,2,4,8,16,32,64)")
    ap.add_argument("--quick", action="store_true", help="N in 1,4,16, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=("peer", "pdserve"))
    ap.add_argument("--peers", default="llama-server,libllama")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx-per-seq", type=int, default=256,
                    help="llama.cpp KV cells per sequence (n_ctx = N x this)")
    ap.add_argument("--kv-memory", default="auto", help="pdserve --kv-memory (auto: room "
                    "for all N sequences)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--arrival-steps", type=int, default=0)
    ap.add_argument("--pdserve-args", default="", help="extra pdctl generate arguments")
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-cache case")
    ap.add_argument("--prefix-n", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=400)
    ap.add_argument("--wait-idle", type=float, default=20,
                    help="before each timed round, wait up to this many seconds for the "
                    "CPUs to be idle (0: don't)")
    ap.add_argument("--max-other-load", type=float, default=0.10,
                    help="a timed round during which other processes took more than this "
                    "share of the CPUs is contended and run again")
    ap.add_argument("--retries", type=int, default=2,
                    help="times a contended round is run again")
    ap.add_argument("--resume", action="store_true",
                    help="keep the (model, N) results of <out-dir>/bench_batch.json and "
                    "run only the missing ones")
    ap.add_argument("--pdserve-commit")
    ap.add_argument("--report-only", action="store_true",
                    help="re-print the table (and plot) of <out-dir>/bench_batch.json")
    ap.add_argument("--plot-only", metavar="JSON", help=argparse.SUPPRESS)
    a = ap.parse_args()
    # Stop cleanly (the finally clauses close the peers) on SIGTERM, and on SIGINT even
    # when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    a.llama_server = a.llama_server or os.path.join(a.venv, "bin", "llama-server")
    json_path = os.path.join(a.out_dir, "bench_batch.json")
    if a.plot_only:
        with open(a.plot_only) as f:
            plot(json.load(f), os.path.join(a.out_dir, "bench_batch.png"))
        return
    if a.report_only:
        with open(json_path) as f:
            res = json.load(f)
        print(table(res))
        make_plot(a, res, json_path)
        return
    os.makedirs(a.out_dir, exist_ok=True)
    if a.build_llama_server:
        build_llama_server(a)
    a.concurrency = ([int(x) for x in a.concurrency.split(",")] if a.concurrency
                     else QUICK_N if a.quick else FULL_N)
    if a.quick:
        a.repeats = 1
    engines = [] if a.only == "peer" else ["pdserve"]
    if a.only != "pdserve":
        for p in a.peers.split(","):
            if p == "llama-server" and not os.access(a.llama_server, os.X_OK):
                log("no %s: skipping llama-server (--build-llama-server builds it)"
                    % a.llama_server)
            elif p in ("llama-server", "libllama"):
                engines.append(p)
            else:
                sys.exit("bench_batch: unknown peer %r" % p)
    pdctl = os.path.join(a.build_dir, "bin", "pdctl")
    if "pdserve" in engines:
        if not os.access(pdctl, os.X_OK):
            sys.exit("bench_batch: no %s: build it first (cmake --build %s)"
                     % (pdctl, a.build_dir))
        h = subprocess.run([pdctl, "generate", "--help"], capture_output=True, text=True)
        if "--prompts" not in h.stdout + h.stderr:
            sys.exit("bench_batch: %s generate has no --prompts (batched generation); "
                     "use --only peer" % pdctl)
    res = {"machine": bc.machine_info(), "threads": a.threads, "repeats": a.repeats,
           "max_tokens": a.max_tokens, "concurrency": a.concurrency, "engines": engines,
           "contention": {"wait_idle_s": a.wait_idle, "max_other_load": a.max_other_load,
                          "rounds": 0, "rounds_contended": 0, "retries": 0,
                          "started_busy": 0}}
    res["machine"]["pdserve_commit"] = a.pdserve_commit or bc.build_commit(a.build_dir)
    if os.path.exists(pdctl):
        res["machine"]["pdctl_sha256"] = bc.sha256(pdctl)
    log("machine:", res["machine"].get("Model name"), "engines", engines)
    specs = [s if ":" in s else "110M:" + s for s in a.models.split(",")]
    res["models"] = [bc.make_model(pdctl, a.out_dir, s, a.shared_dir) for s in specs]
    if a.resume and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        for k in ("rounds", "rounds_contended", "retries", "started_busy"):
            res["contention"][k] = old["contention"].get(k, 0)  # of the rounds kept
        res["machine"]["resumed_from"] = old["machine"]["date"]
        for m in res["models"]:
            prev = next((x for x in old["models"] if x["sha256"] == m["sha256"]), {})
            m["curve"] = {int(n): row for n, row in prev.get("curve", {}).items()}
            if prev.get("prefix"):
                m["prefix"] = prev["prefix"]
    sp = tokenizer(a.shared_dir)
    def save():  # after each N: partial results survive a later failure or a stop
        for m in res["models"]:
            for row in m.get("curve", {}).values():
                if "llama-server:info" in row:
                    res["llama_cpp_build"] = row["llama-server:info"].get("build_info")
                if "libllama:info" in row:
                    res["llama_cpp_python"] = row["libllama:info"].get("llama_cpp_python")
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)

    for m in res["models"]:
        bench_model(a, pdctl, sp, m, engines, res["contention"], save)
        save()
    with open("/proc/loadavg") as f:
        res["machine"]["loadavg_end"] = f.read().split()[:3]
    md = table(res)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out_dir, "bench_batch.md"), "w") as f:
        f.write(md)
    print(md)
    make_plot(a, res, json_path)


if __name__ == "__main__":
    main()
