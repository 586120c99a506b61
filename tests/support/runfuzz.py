"""Runs one libFuzzer target of tests/<module>/fuzz_*.c for a bounded number of inputs
(CTest's fuzz_* tests; PD_FUZZ=ON builds them, with clang): writes its seeds into a
fresh directory, runs the fuzzer over them with a fixed seed, and passes when the
fuzzer ran every input and found nothing. PD_FUZZ_RUNS scales the count.

Seeds: model - tiny GGUF models (F32, F16, Q8_0 and Q4_0 weights, the tokenizer
embedded) written here byte by byte; tokenizer - the shared tokenizer.bin files;
rpc - one envelope of every method with random fields (tests/support/pdfuzz.py).

Usage: runfuzz.py FUZZER KIND RUNS"""
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile

SHARED = os.environ.get("PD_SHARED_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared")


def _s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key, typ, payload):
    return _s(key) + struct.pack("<I", typ) + payload


def tiny_gguf(dtype):
    """A llama GGUF of 1 layer with byte tokens; dtype: GGML type of the matrices."""
    r = random.Random(dtype)
    dim, hid, n_heads, n_kv = (32, 32, 4, 2) if dtype in (2, 8) else (8, 16, 2, 1)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + \
        ["\u2581", "\u2581t", "he", "\u2581the", "on", "ce", "up", "\u2581time"]
    types = [2, 3, 3] + [6] * 256 + [1] * 8
    scores = [0.0] * 259 + [-float(i) for i in range(8)]
    u32 = lambda k, v: _kv(k, 4, struct.pack("<I", v))  # noqa: E731
    f32 = lambda k, v: _kv(k, 6, struct.pack("<f", v))  # noqa: E731
    kvs = [_kv("general.architecture", 8, _s("llama")), u32("llama.embedding_length", dim),
           u32("llama.feed_forward_length", hid), u32("llama.block_count", 1),
           u32("llama.attention.head_count", n_heads),
           u32("llama.attention.head_count_kv", n_kv), u32("llama.context_length", 32),
           f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
           f32("llama.rope.freq_base", 10000.0), u32("general.alignment", 32),
           _kv("tokenizer.ggml.model", 8, _s("llama")),
           _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(toks)) +
               b"".join(_s(t) for t in toks)),
           _kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, len(scores)) +
               b"".join(struct.pack("<f", x) for x in scores)),
           _kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(types)) +
               b"".join(struct.pack("<i", x) for x in types)),
           u32("tokenizer.ggml.bos_token_id", 1), u32("tokenizer.ggml.eos_token_id", 2)]
    hd = dim // n_heads
    tensors = [("token_embd.weight", [dim, len(toks)]), ("output_norm.weight", [dim]),
               ("blk.0.attn_norm.weight", [dim]), ("blk.0.attn_q.weight", [dim, dim]),
               ("blk.0.attn_k.weight", [dim, n_kv * hd]),
               ("blk.0.attn_v.weight", [dim, n_kv * hd]),
               ("blk.0.attn_output.weight", [dim, dim]), ("blk.0.ffn_norm.weight", [dim]),
               ("blk.0.ffn_gate.weight", [dim, hid]), ("blk.0.ffn_down.weight", [hid, dim]),
               ("blk.0.ffn_up.weight", [dim, hid])]
    info, data = b"", b""
    for name, ne in tensors:
        n = 1
        for e in ne:
            n *= e
        t = 0 if len(ne) == 1 else dtype
        if t == 0:
            d = b"".join(struct.pack("<f", r.uniform(-1, 1) if len(ne) > 1 else 1.0)
                         for _ in range(n))
        elif t == 1:
            d = b"".join(struct.pack("<e", r.uniform(-1, 1)) for _ in range(n))
        else:  # Q8_0 (8): f16 scale + 32 int8; Q4_0 (2): f16 scale + 16 nibble bytes
            qb = 32 if t == 8 else 16
            d = b"".join(struct.pack("<e", 0.01) + bytes(r.randrange(256) for _ in range(qb))
                         for _ in range(n // 32))
        info += _s(name) + struct.pack("<I", len(ne)) + \
            b"".join(struct.pack("<Q", e) for e in ne) + struct.pack("<IQ", t, len(data))
        data += d + b"\0" * ((-len(d)) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + info
    return head + b"\0" * ((-len(head)) % 32) + data


def write_seeds(kind, out):
    if kind == "model":
        for dtype, name in ((0, "f32"), (1, "f16"), (8, "q8_0"), (2, "q4_0")):
            with open(os.path.join(out, name), "wb") as fh:
                fh.write(tiny_gguf(dtype))
    elif kind == "tokenizer":
        for name in ("tok105.bin", "tok512.bin", "aidreams_tok512.bin"):
            with open(os.path.join(SHARED, "models", name), "rb") as fh:
                body = fh.read()
            with open(os.path.join(out, name), "wb") as fh:
                fh.write(b"\0" + body)  # first byte: take every record
    elif kind == "rpc":
        sys.path.insert(0, os.path.join(os.environ["PD_BIN_DIR"], "..", "python"))
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import pd_pb2 as pb
        import pdfuzz
        r = random.Random(1)
        for fd in pb.Envelope.DESCRIPTOR.oneofs[0].fields:
            env = pb.Envelope(version=1, request_id=r.randrange(1, 100))
            if fd.name.upper() in pb.Method.keys():
                env.method = pb.Method.Value(fd.name.upper())
            pdfuzz.fill(r, getattr(env, fd.name))
            getattr(env, fd.name).SetInParent()
            with open(os.path.join(out, fd.name), "wb") as fh:
                fh.write(b"\0" + env.SerializeToString())
    else:
        raise SystemExit(f"runfuzz: unknown kind {kind}")


def main():
    fuzzer, kind, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = int(runs * float(os.environ.get("PD_FUZZ_RUNS", "1")))
    work = tempfile.mkdtemp(prefix=f"pd-fuzz-{kind}-")
    try:
        corpus = os.path.join(work, "corpus")
        os.mkdir(corpus)
        write_seeds(kind, corpus)
        n_seeds = len(os.listdir(corpus))
        argv = [fuzzer, corpus, f"-runs={runs}", "-seed=1", "-max_len=40000",
                "-timeout=30", "-rss_limit_mb=4096", f"-artifact_prefix={work}/",
                "-print_final_stats=1"]
        p = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                           timeout=1800)
        log = p.stderr
        m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
        done = int(m.group(1)) if m else 0
        ok = p.returncode == 0 and done >= runs
        print(f"{os.path.basename(fuzzer)}: {done} inputs from {n_seeds} seeds and their "
              f"mutations ({len(os.listdir(corpus))} kept for new coverage), status "
              f"{p.returncode}", flush=True)
        if not ok:
            print(log[-6000:])
            for f in os.listdir(work):
                if f.startswith(("crash-", "leak-", "timeout-", "oom-")):
                    print(f"reproducer kept: {shutil.copy(os.path.join(work, f), '/tmp')}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
