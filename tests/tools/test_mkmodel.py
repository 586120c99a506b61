"""test_mkmodel.py - `pdctl mkmodel` end to end.

Generates the 15M preset in every dtype and checks, with an independent GGUF parser
written here (not the project's reader): the header and metadata llama.cpp needs, the
tensor names / shapes / dtypes / aligned offsets, that the vocabulary arrays equal
those of the shared llama-2-tiny-random.gguf (same Llama-2 vocabulary), that weights
decode to finite values of the intended scale, determinism from the seed, usage
errors, that a write failure (file size limit) leaves no file behind, and that the
model opens with `pdctl tokenize` and generates with `pdctl generate`.
Needs PD_BIN_DIR and PD_SHARED_DIR; a missing binary or file is a failure.
"""
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

import numpy as np

BIN = os.path.join(os.environ.get("PD_BIN_DIR", "build/bin"), "pdctl")
SHARED = os.environ.get("PD_SHARED_DIR", "../shared")
TIMEOUT = 60

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                10: "Q", 11: "q", 12: "d"}
DT_F32, DT_F16, DT_Q4_0, DT_Q8_0 = 0, 1, 2, 8
BLOCK = {DT_F32: (1, 4), DT_F16: (1, 2), DT_Q4_0: (32, 18), DT_Q8_0: (32, 34)}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}
DTYPE_ID = {"f32": DT_F32, "f16": DT_F16, "q8_0": DT_Q8_0, "q4_0": DT_Q4_0}

failures = []
passes = [0]


def check(cond, what):
    passes[0] += 1 if cond else 0
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)
    return cond


class Reader:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.d, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.d[self.p:self.p + n]
        self.p += n
        return bytes(s)

    def value(self, t):
        if t in GGUF_SCALARS:
            return self.take(GGUF_SCALARS[t])
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            if et in GGUF_SCALARS and et != 7:
                size = struct.calcsize(GGUF_SCALARS[et])
                arr = list(struct.unpack_from("<%d%s" % (n, GGUF_SCALARS[et]), self.d, self.p))
                self.p += n * size
                return arr
            return [self.value(et) for _ in range(n)]
        raise ValueError("bad gguf type %d" % t)


def parse_gguf(path):
    """Returns (kv dict, tensor list of (name, ne, dtype, offset), data_start, bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    r = Reader(data)
    assert data[:4] == b"GGUF", "bad magic"
    r.p = 4
    version, n_t, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kv = {"__version": version}
    for _ in range(n_kv):
        key = r.string().decode()
        kv[key] = r.value(r.take("I"))
    tensors = []
    for _ in range(n_t):
        name = r.string().decode()
        nd = r.take("I")
        ne = [r.take("Q") for _ in range(nd)]
        tensors.append((name, ne, r.take("I"), r.take("Q")))
    align = kv.get("general.alignment", 32)
    start = (r.p + align - 1) // align * align
    return kv, tensors, start, data


def tensor_bytes(ne, dt):
    n = 1
    for e in ne:
        n *= e
    be, bb = BLOCK[dt]
    return n // be * bb


def decode(raw, dt, n):
    if dt == DT_F32:
        return np.frombuffer(raw, dtype="<f4", count=n)
    if dt == DT_F16:
        return np.frombuffer(raw, dtype="<f2", count=n).astype(np.float32)
    if dt == DT_Q8_0:
        b = np.frombuffer(raw, dtype=np.uint8, count=n // 32 * 34).reshape(-1, 34)
        d = b[:, :2].copy().view("<f2").astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    b = np.frombuffer(raw, dtype=np.uint8, count=n // 32 * 18).reshape(-1, 18)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    qs = b[:, 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8
    return (q * d).reshape(-1)


def expected_tensors(dtype):
    dim, hid, layers = 288, 768, 6
    dt = DTYPE_ID[dtype]
    out = [("token_embd.weight", [dim, 32000], dt)]
    for l in range(layers):
        p = "blk.%d." % l
        out += [(p + "attn_norm.weight", [dim], DT_F32),
                (p + "attn_q.weight", [dim, dim], dt),
                (p + "attn_k.weight", [dim, dim], dt),
                (p + "attn_v.weight", [dim, dim], dt),
                (p + "attn_output.weight", [dim, dim], dt),
                (p + "ffn_norm.weight", [dim], DT_F32),
                (p + "ffn_gate.weight", [dim, hid], dt),
                (p + "ffn_down.weight", [hid, dim], dt),
                (p + "ffn_up.weight", [dim, hid], dt)]
    out += [("output_norm.weight", [dim], DT_F32), ("output.weight", [dim, 32000], dt)]
    return out


def run(args, **kw):
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=TIMEOUT,
                          **kw)


def mkmodel(out, dtype, seed, extra=(), **kw):
    return run(["mkmodel", "--preset", "15M", "--dtype", dtype, "--seed", str(seed),
                "-o", out] + list(extra), **kw)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_file(path, dtype, ref_kv):
    kv, tensors, start, data = parse_gguf(path)
    want = {"__version": 3, "general.architecture": b"llama",
            "llama.context_length": 256, "llama.embedding_length": 288,
            "llama.block_count": 6, "llama.feed_forward_length": 768,
            "llama.rope.dimension_count": 48, "llama.attention.head_count": 6,
            "llama.attention.head_count_kv": 6, "general.file_type": FILE_TYPE[dtype],
            "tokenizer.ggml.model": b"llama", "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "general.alignment": 32}
    for k, v in want.items():
        check(kv.get(k) == v, "%s: %s = %r, want %r" % (dtype, k, kv.get(k), v))
    check(abs(kv.get("llama.attention.layer_norm_rms_epsilon", 0) - 1e-5) < 1e-9,
          dtype + ": rms eps")
    check(kv.get("llama.rope.freq_base") == 10000.0, dtype + ": rope base")
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        check(kv.get(k) == ref_kv[k], "%s: %s differs from llama-2-tiny-random.gguf"
              % (dtype, k))
    got = [(n, ne, dt) for n, ne, dt, _ in tensors]
    check(got == expected_tensors(dtype), dtype + ": tensor names/shapes/dtypes")
    off = 0
    for name, ne, dt, o in tensors:
        check(o == off and o % 32 == 0, "%s: %s offset %d, want %d" % (dtype, name, o, off))
        off = (o + tensor_bytes(ne, dt) + 31) // 32 * 32
    check(len(data) == start + off, "%s: file size %d, want %d"
          % (dtype, len(data), start + off))
    for name, ne, dt, o in tensors:
        if name not in ("token_embd.weight", "blk.3.ffn_down.weight",
                        "blk.0.attn_norm.weight", "output.weight"):
            continue
        n = int(np.prod(ne))
        x = decode(data[start + o:start + o + tensor_bytes(ne, dt)], dt, n)
        check(np.all(np.isfinite(x)), "%s: %s has non-finite values" % (dtype, name))
        if name.endswith("norm.weight"):
            check(x.min() >= 0.89 and x.max() <= 1.11, "%s: %s not near 1" % (dtype, name))
        else:
            check(0.015 < float(x.std()) < 0.025 and float(abs(x.mean())) < 1e-3,
                  "%s: %s std %.4f mean %.5f" % (dtype, name, x.std(), x.mean()))


PROMPT = "Once upon a time, there was a tiny robot."


def prompt_ids():
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(SHARED, "models", "llama2_tokenizer.model"))
    return sp.encode(PROMPT)


def check_tokenize(path):
    """pdctl tokenize reads the embedded vocabulary like SentencePiece does."""
    ids, prompt = prompt_ids(), PROMPT
    r = run(["tokenize", "--model", path, "--prompt", prompt])
    check(r.returncode == 0, "tokenize failed: %s" % r.stderr[-500:])
    try:
        got = json.loads(r.stdout)
    except ValueError:
        got = None
    check(got == [1] + ids, "tokenize ids %r, want BOS + sentencepiece's %s"
          % (r.stdout[:300], ids))


def check_generate(path, dtype):
    """The project's engine loads the model and generates n tokens from it."""
    ids, prompt, n = prompt_ids(), PROMPT, 8
    r = run(["generate", "--model", path, "--prompt", prompt, "--max-tokens", str(n),
             "--ignore-eos", "--threads", "1", "--format", "json"])
    if not check(r.returncode == 0, "generate %s failed: %s" % (dtype, r.stderr[-500:])):
        return
    try:
        out = json.loads(r.stdout)
    except ValueError:
        check(False, "generate output is not json: %r" % r.stdout[:300])
        return
    check(len(out.get("ids", [])) == n, "generate made %d tokens, want %d"
          % (len(out.get("ids", [])), n))
    check(all(0 <= i < 32000 for i in out.get("ids", [])), "generated ids out of range")
    check(out.get("prompt_ids", [])[-len(ids):] == ids, "generate prompt_ids differ")
    check(isinstance(out.get("text"), str), "generate text missing")
    t = out.get("timings", {})
    for k in ("prompt_tokens_per_s", "gen_tokens_per_s"):
        v = t.get(k)
        check(isinstance(v, (int, float)) and v > 0, "timings.%s = %r" % (k, v))


def check_errors(tmp):
    out = os.path.join(tmp, "err.gguf")
    r = run(["mkmodel", "--preset", "7B", "--dtype", "f32", "-o", out])
    check(r.returncode == 2 and "preset" in r.stderr, "bad preset: rc %d" % r.returncode)
    r = run(["mkmodel", "--preset", "15M", "--dtype", "q3_k", "-o", out])
    check(r.returncode == 2, "bad dtype: rc %d" % r.returncode)
    r = run(["mkmodel", "--preset", "15M", "--dtype", "f32"])
    check(r.returncode == 2, "missing -o: rc %d" % r.returncode)
    r = mkmodel(out, "f32", 1, ["--tokenizer", os.path.join(tmp, "nope.bin")])
    check(r.returncode == 1 and "nope.bin" in r.stderr, "missing tokenizer: rc %d, %s"
          % (r.returncode, r.stderr))
    check(not os.path.exists(out), "output left behind after a failure")

    def limit_file_size():  # a write error mid-file, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    r = mkmodel(out, "f32", 1, preexec_fn=limit_file_size)
    check(r.returncode == 1, "write failure: rc %d" % r.returncode)
    check("write" in r.stderr and "File too large" in r.stderr,
          "write failure message: %r" % r.stderr[-300:])
    check(not os.path.exists(out) and not os.path.exists(out + ".partial"),
          "partial file left after a write failure: %s" % os.listdir(tmp))


def main():
    if not check(os.access(BIN, os.X_OK), "no pdctl at " + BIN):
        return 1
    ref = os.path.join(SHARED, "models", "llama-2-tiny-random.gguf")
    ref_kv = parse_gguf(ref)[0]
    tmp = tempfile.mkdtemp(prefix="pd_mkmodel_")
    try:
        for dtype in ("f32", "f16", "q8_0", "q4_0"):
            path = os.path.join(tmp, "m_%s.gguf" % dtype)
            r = mkmodel(path, dtype, 1)
            if check(r.returncode == 0, "mkmodel %s failed: %s" % (dtype, r.stderr)):
                check_file(path, dtype, ref_kv)
                check(not os.path.exists(path + ".partial"), "partial file left")
        q8 = os.path.join(tmp, "m_q8_0.gguf")
        again, other = os.path.join(tmp, "again.gguf"), os.path.join(tmp, "other.gguf")
        check(mkmodel(again, "q8_0", 1).returncode == 0, "mkmodel again")
        check(mkmodel(other, "q8_0", 2).returncode == 0, "mkmodel seed 2")
        check(sha256(q8) == sha256(again), "same seed gave different files")
        check(sha256(q8) != sha256(other), "different seeds gave the same file")
        # --ctx changes the declared context and nothing else: the tensors' bytes
        # are the same as the preset's
        longer = os.path.join(tmp, "ctx.gguf")
        check(mkmodel(longer, "q8_0", 1, ["--ctx", "1000"]).returncode == 0, "mkmodel --ctx")
        kv_l, t_l, st_l, d_l = parse_gguf(longer)
        kv_q, t_q, st_q, d_q = parse_gguf(q8)
        check(kv_l.get("llama.context_length") == 1000,
              "--ctx 1000: context_length %r" % kv_l.get("llama.context_length"))
        check(d_l[st_l:] == d_q[st_q:], "--ctx changed the tensor data")
        r = mkmodel(os.path.join(tmp, "bad.gguf"), "q8_0", 1, ["--ctx", "0"])
        check(r.returncode == 2 and "context" in r.stderr, "--ctx 0: rc %d" % r.returncode)
        check_errors(tmp)
        check_tokenize(os.path.join(tmp, "m_f32.gguf"))
        for dtype in ("f32", "f16", "q8_0", "q4_0"):
            check_generate(os.path.join(tmp, "m_%s.gguf" % dtype), dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("test_mkmodel: %d checks passed, %d failed" % (passes[0], len(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
