"""`pdctl generate --prompts` end to end: batched greedy output is the golden output and
the single-sequence output whatever the batch around it (random compositions, staggered
arrivals, chunked prefill, prefix-cache hits, a KV pool so small that requests are
preempted, block sizes 16 and 4); a sampled request keeps its own stream (same ids
alone and batched); --ignore-eos is honoured per line; the pool ends with every block
free; a request too big for the context or the pool, and a malformed line, is an error
of that line only (exit 1, the reason on stderr); the summary adds up.
Every run also gets the generic checks of check_run(). Randomness is seeded. Under
AddressSanitizer (detected in the pdctl binary) the same checks run on fewer tokens:
smaller random batches, the first 72 ids of each golden line, and the llama2.c copy
of stories260K only alone. --sample-threads 1, 3 and the default give the same sampled
tokens, and the summary says how many threads drew and in how many steps."""
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile

from pdtest import MODELS, PDCTL, Failures, golden_lines, require

f = Failures()
with open(require(PDCTL), "rb") as fh:
    ASAN = b"__asan_init" in fh.read()
TIMEOUT = 300 if ASAN else 60
TMP = tempfile.mkdtemp(prefix="pd_generate_batch_")
STOPS = (1, 2)  # BOS and EOS end a request unless it ignores EOS
WORDS = ("the a cat dog Lily Tom ran park happy big sun tree ball played saw little girl "
         "boy mom said friend went home red box bird sky jumped toy laughed day").split()


class Model:
    """A model as pdctl loads it; kv_elems: K plus V elements of one position over all
    layers (n_layers * 2 * n_kv_heads * head_dim), to size a pool in blocks."""

    def __init__(self, label, args, kv_elems, vocab, kv_bytes=4, extra=()):
        self.label, self.args, self.kv_elems, self.vocab = label, args, kv_elems, vocab
        self.kv_bytes, self.extra = kv_bytes, list(extra)

    def pool(self, blocks, bs):
        """Options for a pool of exactly this many blocks of bs positions."""
        size = blocks * bs * self.kv_elems * self.kv_bytes
        return ["--block-size", bs, "--kv-memory", size]


def m_path(name):
    return require(os.path.join(MODELS, name))


STORIES = Model("stories260K.gguf", [m_path("stories260K.gguf")], 5 * 2 * 32, 512)
STORIES_BIN = Model("stories260K.bin", [m_path("stories260K.bin"), "--tokenizer",
                                         m_path("tok512.bin")], 5 * 2 * 32, 512)
XS = Model("llama2xs_tok512_280K.gguf", [m_path("llama2xs_tok512_280K.gguf")], 5 * 2 * 32,
           512)
GOLDEN_MODELS = {"stories260K.bin": [STORIES, STORIES_BIN],
                 "llama2xs_tok512_280K.bin": [XS]}
TINY = m_path("llama-2-tiny-random.gguf")
OTHER_MODELS = [
    Model("llama-2-tiny-random.gguf kv f32", [TINY], 1 * 2 * 8, 32000, 4,
          ["--kv-dtype", "f32"]),
    Model("llama-2-tiny-random.gguf kv auto", [TINY], 1 * 2 * 8, 32000, 2),
    Model("aidreams260K.bin", [m_path("aidreams260K.bin"), "--tokenizer",
                               m_path("aidreams_tok512.bin")], 4 * 2 * 64, 512),
    Model("babyllama_tok105.bin", [m_path("babyllama_tok105.bin"), "--tokenizer",
                                   m_path("tok105.bin")], 5 * 2 * 64, 105),
]


# ---- running pdctl -------------------------------------------------------------------

def opt_value(opts, name, default):
    return opts[opts.index(name) + 1] if name in opts else default


class Run:
    def __init__(self, rc, items, summary, err, max_len, cmd):
        self.rc, self.items, self.summary, self.err = rc, items, summary, err
        self.max_len, self.cmd = max_len, cmd


n_files = 0


def batch(model, lines, *opts, label, errors_ok=False):
    """Runs the lines (dicts, or raw strings for malformed lines) through
    `pdctl generate --prompts`, checks what holds for every run, returns a Run or None
    when the output cannot be read at all. An error line fails the check unless
    errors_ok."""
    global n_files
    n_files += 1
    path = os.path.join(TMP, f"{n_files:03d}.jsonl")
    with open(path, "w") as fh:
        for l in lines:
            fh.write((l if isinstance(l, str) else json.dumps(l)) + "\n")
    opts = [str(o) for o in (*model.extra, *opts)]
    argv = [PDCTL, "generate", "--model", *model.args, "--prompts", path, "--format",
            "json", *opts]
    cmd = shlex.join(argv)
    what = f"{model.label} {label}"
    try:
        p = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        f.check(False, f"{what}: no answer in {TIMEOUT} s (a hang?): {cmd}")
        return None
    err = p.stderr.decode(errors="replace")
    try:
        rows = [json.loads(l) for l in p.stdout.decode().splitlines() if l.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        f.check(False, f"{what}: output is not JSON lines ({e}), exit {p.returncode}: "
                       f"{cmd}")
        return None
    ok = p.returncode in (0, 1) and len(rows) == len(lines) + 1 and \
        "summary" in rows[-1]
    f.check(ok, f"{what}: exit {p.returncode}, {len(rows)} lines for {len(lines)} "
                f"prompts (stderr {err[-300:]!r}): {cmd}")
    if not ok:
        return None
    m = re.search(r"longest sequence (\d+)", err)
    f.check(m is not None,
            f"{what}: stderr does not say the longest sequence: {err[:200]!r}")
    r = Run(p.returncode, rows[:-1], rows[-1]["summary"], err,
            int(m.group(1)) if m else 0, cmd)
    check_run(r, lines, opts, what, errors_ok)
    return r


def check_run(r, lines, opts, what, errors_ok):
    """What holds for every run: lines in input order, an error exactly where expected
    and the exit status saying so, each line's length and finish reason as its
    max_tokens and ignore_eos say, the pool back to its free blocks, a summary that
    adds up."""
    s = r.summary
    where = f"{what} ({r.cmd})"
    max_tokens = int(opt_value(opts, "--max-tokens", 256))
    ignore_cli = "--ignore-eos" in opts
    parallel = int(opt_value(opts, "--parallel", 16))
    n_err = 0
    for i, (it, l) in enumerate(zip(r.items, lines)):
        f.check(it.get("index") == i, f"{where}: line {i} has index {it.get('index')}")
        if "error" in it:
            n_err += 1
            f.check(errors_ok, f"{where}: line {i} errs: {it['error']}")
            f.check(it.get("finish_reason") == "error" and "ids" not in it,
                    f"{where}: error line {i} also reports output: {it}")
            continue
        ids, fin = it["ids"], it["finish_reason"]
        l = l if isinstance(l, dict) else {}
        want_max = l.get("max_tokens", max_tokens)
        room = r.max_len + 1 - len(it["prompt_ids"])  # the last token is never computed
        limit = min(want_max, room)
        if l.get("ignore_eos", ignore_cli):
            f.check(fin == "length" and len(ids) == limit,
                    f"{where}: line {i} ignores EOS: {len(ids)} ids, {fin} (want "
                    f"{limit}, length)")
        else:
            cut = next((j for j, t in enumerate(ids) if t in STOPS), None)
            f.check(cut is None or cut == len(ids) - 1,
                    f"{where}: line {i} goes on past EOS/BOS at {cut}")
            if cut is not None:
                f.check(fin == "stop",
                        f"{where}: line {i} ends on {ids[-1]} with {fin}")
            else:
                f.check(fin == "length" and len(ids) == limit,
                        f"{where}: line {i}: {len(ids)} ids, {fin} (want {limit}, "
                        "length)")
        f.check(it["preemptions"] >= 0 and
                0 <= it["cached_tokens"] < len(it["prompt_ids"]),
                f"{where}: line {i} preemptions {it['preemptions']} cached "
                f"{it['cached_tokens']}")
    done = [it for it in r.items if "error" not in it]
    kv, pc, bsz = s["kv"], s["prefix_cache"], s["batch_size"]
    f.check(kv["free_blocks_end"] == kv["free_blocks_start"] == kv["blocks"],
            f"{where}: kv free blocks {kv['free_blocks_start']} -> "
            f"{kv['free_blocks_end']} of {kv['blocks']}")
    f.check(s["requests"] == len(lines) and s["errors"] == n_err,
            f"{where}: summary {s['requests']} requests {s['errors']} errors, want "
            f"{len(lines)} and {n_err}")
    f.check(r.rc == (1 if n_err else 0),
            f"{where}: exit {r.rc} with {n_err} error lines")
    f.check(s["gen_tokens"] == sum(len(it["ids"]) for it in done),
            f"{where}: summary gen_tokens {s['gen_tokens']} != the lines' "
            f"{sum(len(it['ids']) for it in done)}")
    f.check(s["prompt_tokens"] == sum(len(it["prompt_ids"]) for it in done),
            f"{where}: summary prompt_tokens {s['prompt_tokens']}")
    f.check(s["preemptions"] == sum(it["preemptions"] for it in done),
            f"{where}: summary preemptions {s['preemptions']} != the lines' sum")
    f.check(pc["hit_tokens"] == sum(it["cached_tokens"] for it in done),
            f"{where}: summary hit_tokens {pc['hit_tokens']} != the lines' "
            "cached_tokens")
    if "--no-prefix-cache" in opts:
        f.check(pc["hit_tokens"] == 0 and not pc["enabled"],
                f"{where}: --no-prefix-cache yet hit_tokens {pc['hit_tokens']}")
    f.check(1 <= bsz["max"] <= parallel or not done,
            f"{where}: batch_size.max {bsz['max']} with --parallel {parallel}")
    if "--block-size" in opts:
        f.check(kv["block_size"] == int(opt_value(opts, "--block-size", 16)),
                f"{where}: block size {kv['block_size']}")


def single(model, prompt, n, *opts):
    """The single-sequence path (`pdctl generate --prompt`)."""
    argv = [PDCTL, "generate", "--model", *model.args, *model.extra, "--prompt",
            prompt, "--max-tokens", str(n), "--format", "json", *map(str, opts)]
    p = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: "
                           f"{p.stderr.decode(errors='replace')}")
    return json.loads(p.stdout)


def same_ids(what, got, want):
    if got == want:
        f.check(True, what)
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
    f.check(False, f"{what}: ids differ at {first} (got {len(got)} ids "
                   f"{got[first:first + 5]}, want {len(want)} ids "
                   f"{want[first:first + 5]})")


def same_runs(what, got, ref):
    """Every line of run got has the ids and finish reason of run ref."""
    if got is None or ref is None:
        f.check(False, f"{what}: a run gave no output")
        return
    for i in range(len(ref.items)):
        a, b = got.items[i], ref.items[i]
        if "error" in a or "error" in b:
            f.check("error" in a and "error" in b,
                    f"{what}: line {i} errs in one run only")
            continue
        same_ids(f"{what}: line {i} ({got.cmd}) vs ({ref.cmd})", a["ids"], b["ids"])
        f.check(a["finish_reason"] == b["finish_reason"],
                f"{what}: line {i} finishes {a['finish_reason']} vs "
                f"{b['finish_reason']}")


def random_request(rng, model, max_tokens, max_arrival):
    if rng.random() < 0.2:
        ids = [1] + [rng.randrange(3, model.vocab) for _ in range(rng.randint(1, 30))]
        r = {"prompt_ids": ids}
    else:
        r = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))}
    r["max_tokens"] = rng.randint(1, max_tokens)
    r["arrival_step"] = rng.randint(0, max_arrival)
    r["ignore_eos"] = rng.random() < 0.5
    if rng.random() < 0.4:
        r.update(temperature=rng.choice([0.8, 1.0]), seed=rng.randrange(1 << 40))
        if rng.random() < 0.5:
            r.update(top_p=0.9, top_k=rng.choice([0, 40]),
                     min_p=rng.choice([0, 0.05]))
    else:
        r["temperature"] = 0
    return r


def blocks_for(tokens, bs):
    return (tokens + bs - 1) // bs


# ---- 1. the golden lines -------------------------------------------------------------

rng = random.Random(20240611)
OTHERS_MAX = 24 if ASAN else 80
COUNTS = (1, 7, 31) if ASAN else (1, 7, 31, 63)
GOLD_N = 72 if ASAN else 1 << 30  # under ASan only a prefix of each golden line
by_model = {}
for g in golden_lines():
    by_model.setdefault(g["model"], []).append(g)
f.check(sorted(by_model) == sorted(GOLDEN_MODELS),
        f"golden models {sorted(by_model)}")


def gold_n(g):
    """The tokens a golden request asks for: all of them, fewer under ASan."""
    return min(len(g["greedy_ids"]), GOLD_N)


def gold_ids(g):
    """The ids a golden request must reproduce exactly."""
    return g["greedy_ids"][: min(g["exact_prefix"], GOLD_N)]


def golden_req(g, **kw):
    return {"prompt": g["prompt"], "max_tokens": gold_n(g), "ignore_eos": True,
            "temperature": 0, **kw}


def check_golden(what, r, i, g):
    if r is None:
        return
    it = r.items[i]
    if "error" in it:
        f.check(False, f"{what}: golden {g['prompt']!r} errs: {it['error']}")
        return
    f.check(it["prompt_ids"] == g["prompt_ids"],
            f"{what}: prompt_ids {it['prompt_ids']} != golden {g['prompt_ids']}")
    want = gold_ids(g)
    same_ids(f"{what}: golden {g['prompt']!r} ({r.cmd})", it["ids"][: len(want)],
             want)


for gname, variants in GOLDEN_MODELS.items():
    goldens = by_model.get(gname, [])
    for model in variants:
        # (a) alone
        for g in goldens:
            r = batch(model, [golden_req(g)], "--parallel", 1, label="golden alone")
            check_golden(f"{model.label} alone", r, 0, g)
        if ASAN and model is not variants[0]:
            continue  # the same batching as the GGUF of these weights
        # (b) random batch compositions around every golden line
        for ci, count in enumerate(COUNTS):
            lines = [random_request(rng, model, OTHERS_MAX, 40)
                     for _ in range(count)]
            gpos = []
            for g in goldens:
                k = rng.randint(0, len(lines))
                lines.insert(k, golden_req(g, arrival_step=rng.randint(0, 30)))
                gpos = [p + (p >= k) for p in gpos] + [k]
            parallel = (4, 8, 32, 64)[ci % 4]
            budget = (512, 16, 64, 512)[ci % 4]
            what = (f"{model.label} composition {count}+{len(goldens)} parallel "
                    f"{parallel}")
            r = batch(model, lines, "--parallel", parallel, "--batch", budget,
                      label=what)
            ref = batch(model, lines, "--parallel", 1, "--no-prefix-cache",
                        label=what + " reference")
            for p, g in zip(gpos, goldens):
                check_golden(what, r, p, g)
                check_golden(what + " (parallel 1)", ref, p, g)
            same_runs(what, r, ref)
            if r and ref:
                f.check(r.summary["batch_size"]["max"] > 1 and
                        ref.summary["batch_size"]["max"] == 1,
                        f"{what}: batch_size.max {r.summary['batch_size']['max']} "
                        f"batched, {ref.summary['batch_size']['max']} with --parallel 1")
        # (c) prefix-cache hits: a later copy of the golden prompt, the golden prompt
        # continued by its own greedy ids (its remaining ids must follow), and prompts
        # sharing more than two blocks of it, arriving while it runs.
        for bs in (16, 4):
            lines, expect = [], []
            for g in goldens:
                P, G = g["prompt_ids"], gold_ids(g)
                k = 2 * bs + 8
                base = len(lines)
                lines.append(golden_req(g, arrival_step=0))
                for j in range(3):
                    shared = P + G[: k + j]
                    tail = [rng.randrange(3, model.vocab)
                            for _ in range(rng.randint(1, 12))]
                    req = {"prompt_ids": shared + tail,
                           "max_tokens": rng.randint(5, 30),
                           "arrival_step": k + j + 10, "ignore_eos": j != 1}
                    if j == 2:
                        req.update(temperature=0.8, seed=1000 + j)
                    lines.append(req)
                    n_hit = min(len(shared) // bs, (len(shared + tail) - 1) // bs)
                    expect.append((len(lines) - 1, n_hit * bs))
                lines.append({"prompt_ids": P + G[:k], "max_tokens": len(G) - k,
                              "ignore_eos": True, "arrival_step": 100000})
                expect.append((len(lines) - 1, (len(P) + k - 1) // bs * bs))
                lines.append(golden_req(g, arrival_step=100001))
                expect.append((len(lines) - 1, (len(P) - 1) // bs * bs))
                expect.append((base, 0))
            what = f"{model.label} prefix cache block size {bs}"
            r = batch(model, lines, "--parallel", 16, "--block-size", bs, label=what)
            nc = batch(model, lines, "--parallel", 16, "--block-size", bs,
                       "--no-prefix-cache", label=what + " off")
            ref = batch(model, lines, "--parallel", 1, "--block-size", bs,
                        "--no-prefix-cache", label=what + " reference")
            same_runs(what, r, ref)
            same_runs(what + " --no-prefix-cache", nc, ref)
            if r is None:
                continue
            for i, want in expect:
                f.check(r.items[i].get("cached_tokens") == want,
                        f"{what}: line {i} cached_tokens "
                        f"{r.items[i].get('cached_tokens')}, want {want} ({r.cmd})")
            f.check(r.summary["prefix_cache"]["hit_tokens"] > 0,
                    f"{what}: no prefix cache hits")
            for gi, g in enumerate(goldens):
                base = gi * 6
                G = gold_ids(g)
                check_golden(what, r, base, g)
                check_golden(what + " (second copy)", r, base + 5, g)
                same_ids(f"{what}: golden {g['prompt']!r} continued from its own cached "
                         f"ids ({r.cmd})", r.items[base + 4].get("ids"), G[2 * bs + 8:])
        # (c') the same long prompt twice in one step (neither finds the other's blocks
        # yet, both commit the same content), a third copy later hits; a prompt of
        # exactly two blocks hits one (its last token is always computed). The prompts
        # are the golden prompt continued by its greedy ids, so the golden ids follow.
        for bs in (16, 4):
            g = goldens[0]
            P, G = g["prompt_ids"], gold_ids(g)
            dup, aligned = P + G[: 3 * bs], (P + G)[: 2 * bs]
            lines = [{"prompt_ids": dup, "max_tokens": 16, "ignore_eos": True,
                      "arrival_step": 0},
                     {"prompt_ids": dup, "max_tokens": 16, "ignore_eos": True,
                      "arrival_step": 0, "temperature": 0.8, "seed": 9},
                     {"prompt_ids": dup, "max_tokens": 16, "ignore_eos": True,
                      "arrival_step": 1000},
                     {"prompt_ids": aligned, "max_tokens": 20, "ignore_eos": True,
                      "arrival_step": 2000},
                     {"prompt_ids": aligned, "max_tokens": 20, "ignore_eos": True,
                      "arrival_step": 3000}]
            what = f"{model.label} duplicate prompts, block size {bs}"
            r = batch(model, lines, "--parallel", 8, "--block-size", bs, label=what)
            ref = batch(model, lines, "--parallel", 1, "--block-size", bs,
                        "--no-prefix-cache", label=what + " reference")
            same_runs(what, r, ref)
            if r is None:
                continue
            cached = [it["cached_tokens"] for it in r.items]
            want = [0, 0, (len(dup) - 1) // bs * bs, bs, bs]
            f.check(cached == want,
                    f"{what}: cached_tokens {cached}, want {want} ({r.cmd})")
            for i in (0, 2):
                same_ids(f"{what}: line {i} continues the golden ids ({r.cmd})",
                         r.items[i]["ids"], G[3 * bs: 3 * bs + 16])
            for i in (3, 4):
                k = 2 * bs - len(P)
                same_ids(f"{what}: line {i} continues the golden ids ({r.cmd})",
                         r.items[i]["ids"], G[k: k + 20])
        # (d) preemption: a pool that holds the longest golden sequence (and every line
        # of the run) and little more; the golden lines arrive last, so they are the
        # newest and preempted first.
        for bs, budget in ((16, 512), (4, 512), (4, 16)):
            longest = max(len(g["prompt_ids"]) + gold_n(g) for g in goldens)
            blocks = blocks_for(longest, bs) + 1
            lines = [random_request(rng, model, 120, 3)
                     for _ in range(6 if ASAN else 12)]
            for l in lines:
                l["max_tokens"] = max(l["max_tokens"], 60)
            gpos = []
            for g in goldens:
                lines.append(golden_req(g, arrival_step=4))
                gpos.append(len(lines) - 1)
            pool = model.pool(blocks, bs)
            what = f"{model.label} preemption {blocks} blocks of {bs}, batch {budget}"
            r = batch(model, lines, "--parallel", 16, "--batch", budget, *pool,
                      label=what)
            ref = batch(model, lines, "--parallel", 1, "--no-prefix-cache", *pool,
                        label=what + " reference")
            same_runs(what, r, ref)
            for p, g in zip(gpos, goldens):
                check_golden(what, r, p, g)
            if r and ref:
                f.check(r.summary["kv"]["blocks"] == blocks,
                        f"{what}: pool of {r.summary['kv']['blocks']} blocks, want "
                        f"{blocks}")
                f.check(r.summary["preemptions"] > 0, f"{what}: nothing was preempted")
                f.check(any(r.items[p]["preemptions"] > 0 for p in gpos),
                        f"{what}: no golden line was preempted: "
                        f"{[r.items[p]['preemptions'] for p in gpos]} ({r.cmd})")
                f.check(ref.summary["preemptions"] == 0,
                        f"{what}: preemption with --parallel 1")

# ---- 2. other models: batched ids are the single-sequence ids ------------------------

PROMPTS = ["Once upon a time, a little bird", "the cat sat on the mat and",
           "Hello world"]
for model in OTHER_MODELS:
    n = 24 if ASAN else 64
    # sampling over a 32000-token vocabulary costs more than these models' forward pass
    n_others = (4 if ASAN else 10) if model.vocab > 1000 else (8 if ASAN else 20)
    singles = [single(model, p, n, "--ignore-eos") for p in PROMPTS]
    sampled = [single(model, p, n, "--ignore-eos", "--temperature", 0.8, "--seed",
                      77 + i) for i, p in enumerate(PROMPTS)]
    for bs in (16, 4):
        lines = [random_request(rng, model, 40 if ASAN else 60, 20)
                 for _ in range(n_others)]
        mine = []
        for i, p in enumerate(PROMPTS):
            for req in ({"prompt": p, "max_tokens": n, "ignore_eos": True,
                         "temperature": 0},
                        {"prompt": p, "max_tokens": n, "ignore_eos": True,
                         "temperature": 0.8, "seed": 77 + i}):
                k = rng.randint(0, len(lines))
                lines.insert(k, {**req, "arrival_step": rng.randint(0, 20)})
                mine = [q + (q >= k) for q in mine] + [k]
        what = f"{model.label} block size {bs}"
        runs = {"batched": batch(model, lines, "--parallel", 16, "--block-size", bs,
                                 label=what),
                "alone": batch(model, lines, "--parallel", 1, "--block-size", bs,
                               "--no-prefix-cache", label=what + " alone")}
        # a pool that holds the longest of these lines with a block to spare
        ref = runs["batched"]
        if ref:
            need = max(len(it["prompt_ids"]) + len(it["ids"]) for it in ref.items)
            blocks = blocks_for(need, bs) + 1
            runs["preempted"] = batch(model, lines, "--parallel", 16, "--block-size", bs,
                                      *model.pool(blocks, bs), label=what + " preempted")
            pr = runs["preempted"]
            if pr:
                f.check(pr.summary["preemptions"] > 0,
                        f"{what}: nothing preempted in {blocks} blocks ({pr.cmd})")
                f.check(pr.max_len >= need,
                        f"{what}: longest sequence {pr.max_len} < {need}")
        for kind, r in runs.items():
            if r is None:
                continue
            same_runs(f"{what} {kind} vs alone", r, runs["alone"])
            for j, q in enumerate(mine):
                want = (singles if j % 2 == 0 else sampled)[j // 2]
                it = r.items[q]
                mode = "greedy" if j % 2 == 0 else "sampled"
                same_ids(f"{what} {kind}: {mode} {PROMPTS[j // 2]!r} vs the single "
                         f"path ({r.cmd})", it.get("ids"), want["ids"])
                if j % 2 == 0:
                    f.check(it.get("text") == want["text"] and
                            it.get("prompt_ids") == want["prompt_ids"],
                            f"{what} {kind}: text/prompt_ids of {PROMPTS[j // 2]!r} "
                            "differ from the single path")
                else:
                    f.check(it.get("seed") == 77 + j // 2,
                            f"{what}: seed {it.get('seed')}")

# ---- 3. --ignore-eos per line and on the command line --------------------------------

EOS_PROMPTS = ["Once upon a time there was a cat. The cat was happy. The end",
               "The sun", "One day", "Once upon a time"]
long_n = 160 if ASAN else 400
eos_lines, want_stop = [], []
for p in EOS_PROMPTS:
    s = single(STORIES, p, long_n, "--ignore-eos")
    cut = next((j for j, t in enumerate(s["ids"]) if t in STOPS), None)
    want_stop.append((s, cut))
    eos_lines += [{"prompt": p, "max_tokens": long_n},
                  {"prompt": p, "max_tokens": long_n, "ignore_eos": True},
                  {"prompt": p, "max_tokens": long_n, "ignore_eos": False}]
f.check(any(c is not None for _, c in want_stop),
        "no EOS prompt reaches EOS/BOS: the --ignore-eos checks test nothing")
for cli in ([], ["--ignore-eos"]):
    what = f"ignore-eos lines, command line {cli}"
    r = batch(STORIES, eos_lines, "--parallel", 8, *cli, label=what)
    if r is None:
        continue
    for i, (s, cut) in enumerate(want_stop):
        for j, ignore in enumerate((bool(cli), True, False)):
            it = r.items[3 * i + j]
            if ignore or cut is None:
                same_ids(f"{what}: {EOS_PROMPTS[i]!r} ignore {ignore}", it["ids"],
                         s["ids"])
                f.check(it["finish_reason"] == "length",
                        f"{what}: {it['finish_reason']}")
            else:
                same_ids(f"{what}: {EOS_PROMPTS[i]!r} stops at {cut}", it["ids"],
                         s["ids"][: cut + 1])
                f.check(it["finish_reason"] == "stop", f"{what}: {it['finish_reason']}")
# the golden lines without --ignore-eos: their greedy ids up to the first EOS/BOS
for gname, variants in GOLDEN_MODELS.items():
    goldens = by_model.get(gname, [])
    lines = [golden_req(g, ignore_eos=False) for g in goldens]
    r = batch(variants[0], lines, "--parallel", 4, label="golden without --ignore-eos")
    for i, g in enumerate(goldens if r else []):
        G = gold_ids(g)
        cut = next((j for j, t in enumerate(G) if t in STOPS), None)
        same_ids(f"{gname} {g['prompt']!r} without --ignore-eos",
                 r.items[i]["ids"][: len(G)], G if cut is None else G[: cut + 1])
        if cut is not None:
            f.check(r.items[i]["finish_reason"] == "stop", f"{gname}: stop at {cut}")

# ---- 5. requests too big, malformed lines --------------------------------------------

good = [{"prompt": "Tom and his dog", "max_tokens": 12, "ignore_eos": True},
        {"prompt": "One day", "max_tokens": 8, "temperature": 0.8, "seed": 3},
        {"prompt_ids": [1, 403, 407], "max_tokens": 6, "ignore_eos": True}]
long_prompt = ("Once upon a time there was a little girl named Lily who liked to play in "
               "the park")


def error_run(what, opts, bad, reason_re):
    """good lines with bad ones (expected errors) between them: the bad lines err, the
    good ones give what they give alone, exit 1, the reason on stderr."""
    lines, bad_idx = [], []
    for i, b in enumerate(bad):
        lines.append(good[i % len(good)])
        lines.append(b)
        bad_idx.append(len(lines) - 1)
    ok = batch(STORIES, [l for i, l in enumerate(lines) if i not in bad_idx],
               "--parallel", 4, *opts, label=what + " good lines only")
    r = batch(STORIES, lines, "--parallel", 4, *opts, label=what, errors_ok=True)
    if r is None or ok is None:
        f.check(False, f"{what}: no output")
        return None
    f.check(r.rc == 1, f"{what}: exit {r.rc}, want 1")
    f.check(ok.rc == 0, f"{what}: good lines only: exit {ok.rc}")
    k = 0
    for i, it in enumerate(r.items):
        if i in bad_idx:
            f.check("error" in it and it["error"],
                    f"{what}: line {i} ({lines[i]!r:.60}) has no error: {it}")
        else:
            f.check("error" not in it,
                    f"{what}: good line {i} errs: {it.get('error')}")
            same_ids(f"{what}: good line {i}", it.get("ids"),
                     ok.items[k].get("ids"))
            k += 1
    if reason_re:
        f.check(re.search(reason_re, r.err) is not None,
                f"{what}: stderr does not name the reason ({reason_re}): "
                f"{r.err[-400:]!r}")
    return r


# a prompt longer than the context
n_long = len(single(STORIES, long_prompt, 1)["prompt_ids"])
error_run("prompt longer than --ctx", ["--ctx", 12],
          [{"prompt": long_prompt, "max_tokens": 4},
           {"prompt_ids": list(range(1, 13)), "max_tokens": 4}],
          rf"\b{n_long}\b[^\n]*\b12\b")
# a prompt longer than every block of a tiny pool (4 blocks of 4: 16 positions)
r = error_run("prompt longer than the pool", STORIES.pool(4, 4),
              [{"prompt": long_prompt, "max_tokens": 4},
               {"prompt_ids": [1] + [300] * 15, "max_tokens": 4}],
              rf"\b{n_long}\b[^\n]*\b16\b")
if r:
    f.check(r.summary["kv"]["blocks"] == 4 and r.max_len == 16,
            f"tiny pool: {r.summary['kv']['blocks']} blocks, longest {r.max_len}")
# the edge: a prompt one position short of the longest sequence still gets its tokens
r = batch(STORIES,
          [{"prompt_ids": [1] + [300] * 14, "max_tokens": 9, "ignore_eos": True},
           {"prompt_ids": [1] + [300] * 13, "max_tokens": 9, "ignore_eos": True}],
          *STORIES.pool(4, 4), label="prompt at the edge of a tiny pool")
if r:
    n_ids = [len(it.get("ids", [])) for it in r.items]
    f.check(n_ids == [2, 3], f"edge of the pool: {n_ids} ids, want [2, 3]")
# malformed lines
error_run("malformed lines", [],
          ["not json", "[1, 2, 3]", '{"prompt": "unterminated', '{"max_tokens": 5}',
           '{"prompt": 5}', '{"prompt": "x", "max_tokens": -3}',
           '{"prompt": "x", "max_tokens": "ten"}',
           '{"prompt": "x", "max_tokens": 1.5e30}',
           '{"prompt_ids": [1, 99999], "max_tokens": 3}',
           '{"prompt_ids": [1, 99999], "max_tokens": 0}', '{"prompt_ids": [], "max_tokens": 0}',
           '{"prompt_ids": [], "max_tokens": 3}',
           '{"prompt_ids": [1, "a"], "max_tokens": 3}',
           '{"prompt": "x", "temperature": -1}', '{"prompt": "x", "top_p": 0}'],
          r"99999")
# max_tokens 0 generates nothing, as the single-sequence path does
z = single(STORIES, "Once", 0)
r = batch(STORIES, [{"prompt": "Once", "max_tokens": 0}, good[0]],
          label="max_tokens 0")
if r:
    f.check(r.items[0].get("ids") == z["ids"] == [],
            f"max_tokens 0: {len(r.items[0].get('ids', []))} ids in a batch, "
            f"{len(z['ids'])} alone ({r.cmd})")

# ---- 6. summary: overlap, parallel cap; the command line's defaults ------------------

# a line without a key takes the command line's value; without "seed", request i
# samples with --seed + i
lines = [{"prompt": "Tom and his dog"}, {"prompt": "One day", "seed": 5},
         {"prompt": "The sun", "temperature": 0}, {"prompt": "Tom and his dog"}]
r = batch(STORIES, lines, "--max-tokens", 20, "--temperature", 0.8, "--seed", 100,
          "--ignore-eos", label="command-line defaults")
if r:
    for i, (seed, extra) in enumerate([(100, ["--temperature", 0.8, "--seed", 100]),
                                       (5, ["--temperature", 0.8, "--seed", 5]),
                                       (None, []),
                                       (103, ["--temperature", 0.8, "--seed", 103])]):
        want = single(STORIES, lines[i]["prompt"], 20, "--ignore-eos", *extra)
        same_ids(f"command-line defaults: line {i} ({r.cmd})", r.items[i]["ids"],
                 want["ids"])
        if seed is not None:
            f.check(r.items[i]["seed"] == seed,
                    f"command-line defaults: line {i} seed {r.items[i]['seed']}, "
                    f"want {seed}")
    f.check(r.items[0]["ids"] != r.items[3]["ids"],
            "command-line defaults: two requests without a seed share a sampling stream")

lines = [{"prompt": p, "max_tokens": 30, "ignore_eos": True, "arrival_step": 0}
         for p in ("a", "b c", "d e f", "g", "h i", "j k l", "m", "n o")]
for parallel in (1, 3, 8):
    r = batch(STORIES, lines, "--parallel", parallel,
              label=f"8 overlapping, parallel {parallel}")
    if r:
        f.check(r.summary["batch_size"]["max"] == parallel,
                f"8 requests arriving together with --parallel {parallel}: "
                f"batch_size.max {r.summary['batch_size']['max']}")

# ---- 7. --sample-threads: the same tokens drawn on 1 or more host threads ------------

rng = random.Random(77)
# stories260K: 80 requests arriving together, so that 64 run at once (64 rows of 512
# logits are enough to draw in parallel)
for model, n_req in ((OTHER_MODELS[0], 10), (STORIES, 80)):
    lines = []
    for i in range(n_req):
        r = random_request(rng, model, 24, 4)
        r.update(temperature=rng.choice([0.7, 1.0, 1.3]), seed=1000 + i)
        if model is STORIES:
            r.update(arrival_step=0, max_tokens=20, ignore_eos=True)
        lines.append(r)
    runs = {}
    for st in (1, 3, 0):
        opts = ["--parallel", 64, "--threads", 2]
        if st:
            opts += ["--sample-threads", st]
        runs[st] = batch(model, lines, *opts, label=f"sampled, --sample-threads {st}")
    ref = runs[1]
    if None in runs.values():
        continue
    for st in (3, 0):
        same_runs(f"{model.label} --sample-threads {st} vs 1", runs[st], ref)
    for st, want in ((1, 1), (3, 3), (0, 2)):  # 0: the 2 kernel threads
        s = runs[st].summary
        f.check(s.get("sample_threads") == want,
                f"{model.label} --sample-threads {st}: summary sample_threads "
                f"{s.get('sample_threads')}, want {want}")
        f.check((s.get("sample_parallel_steps", -1) > 0) == (want > 1) and
                s.get("sample_s", -1) >= 0,
                f"{model.label} --sample-threads {st}: sample_parallel_steps "
                f"{s.get('sample_parallel_steps')}, sample_s {s.get('sample_s')}")
for bad in ("-1", "257", "x"):
    argv = [PDCTL, "generate", "--model", *STORIES.args, "--prompt", "Once",
            "--sample-threads", bad]
    p = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    f.check(p.returncode not in (0, 1) and b"--sample-threads" in p.stderr,
            f"--sample-threads {bad}: exit {p.returncode}, stderr {p.stderr[-200:]!r}")

if not f.items:
    shutil.rmtree(TMP, ignore_errors=True)
else:
    print(f"the prompt files of the failing commands are kept in {TMP}")
f.finish()
