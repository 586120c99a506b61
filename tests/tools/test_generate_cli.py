"""`pdctl generate` as a user drives it: strict JSON for any prompt bytes, the
generated text never inherits the prompt's broken tail, sampling reproducible by seed,
text mode echoing the prompt, and clear errors (exit 1 for a bad model or prompt,
exit 2 for bad usage) instead of crashes."""
import json
import os
import subprocess

from pdtest import MODELS, PDCTL, Failures, require

f = Failures()
M = require(os.path.join(MODELS, "stories260K.gguf"))


def run(*args):
    p = subprocess.run([require(PDCTL), "generate", *map(str, args)], capture_output=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def gen(*args):
    rc, out, err = run("--model", M, "--format", "json", *args)
    f.check(rc == 0, f"generate {args} exited {rc}: {err}")
    return json.loads(out.decode("utf-8"))  # strict: invalid UTF-8 would raise here


# invalid UTF-8 in the prompt: valid JSON out, prompt sanitized, text clean
bad = os.fsencode("\udcff\udcfe once \udcc3")  # raw bytes ff fe ... c3
p = subprocess.run([require(PDCTL), "generate", "--model", M, "--format", "json", "--prompt", bad,
                    "--max-tokens", "8", "--ignore-eos"], capture_output=True, timeout=120)
f.check(p.returncode == 0, f"invalid UTF-8 prompt: exit {p.returncode}")
try:
    d = json.loads(p.stdout.decode("utf-8"))
    f.check(d["prompt"] == "\ufffd\ufffd once \ufffd", f"sanitized prompt {d['prompt']!r}")
    f.check(not d["text"].startswith("\ufffd"),
            f"generated text starts with the prompt's broken tail: {d['text']!r}")
    f.check(len(d["ids"]) == 8, "8 tokens generated")
except (UnicodeDecodeError, json.JSONDecodeError) as e:
    f.check(False, f"output is not strict UTF-8 JSON: {e}")

# sampling: same seed same tokens, another seed other tokens
a = gen("--prompt", "Once", "--max-tokens", 40, "--temperature", 1, "--seed", 11,
        "--ignore-eos")
b = gen("--prompt", "Once", "--max-tokens", 40, "--temperature", 1, "--seed", 11,
        "--ignore-eos")
c = gen("--prompt", "Once", "--max-tokens", 40, "--temperature", 1, "--seed", 12,
        "--ignore-eos")
f.check(a["ids"] == b["ids"] and a["seed"] == 11, "same seed, same tokens")
f.check(a["ids"] != c["ids"], "another seed, other tokens")
g = gen("--prompt", "Once", "--max-tokens", 40, "--ignore-eos")
f.check(g["ids"] != a["ids"], "default (greedy) differs from a sampled run")

# how the weights are loaded and the KV cache dtype
mm = gen("--prompt", "Tom and his dog", "--max-tokens", 60, "--ignore-eos", "--load", "mmap")
cp = gen("--prompt", "Tom and his dog", "--max-tokens", 60, "--ignore-eos", "--load", "copy")
f.check(mm["load"] == "mmap" and cp["load"] == "copy", "load mode reported")
f.check(mm["ids"] == cp["ids"], "mmap and copy loads generate the same tokens")
f.check(cp["kv_dtype"] == "f32", f"auto KV dtype of an F32 model is f32, got {cp['kv_dtype']}")
h = gen("--prompt", "Tom and his dog", "--max-tokens", 60, "--ignore-eos", "--kv-dtype", "f16")
f.check(h["kv_dtype"] == "f16" and len(h["ids"]) == 60, "an F16 KV cache runs")
tiny = gen("--model", require(os.path.join(MODELS, "llama-2-tiny-random.gguf")), "--prompt",
           "hello", "--max-tokens", 4)
f.check(tiny["kv_dtype"] == "f16", f"auto KV dtype of an F16 model is f16, got {tiny['kv_dtype']}")

# max-tokens 0; text mode echoes the prompt then the generation
z = gen("--prompt", "Once", "--max-tokens", 0)
f.check(z["ids"] == [] and z["text"] == "", "max-tokens 0 generates nothing")
rc, out, err = run("--model", M, "--prompt", "Tom and his dog", "--max-tokens", 20,
                   "--ignore-eos")
j = gen("--prompt", "Tom and his dog", "--max-tokens", 20, "--ignore-eos")
f.check(rc == 0 and out.decode() == "Tom and his dog" + j["text"] + "\n",
        f"text mode prints prompt + generation: {out!r}")

# errors: usage -> 2, runtime -> 1, always with a message on stderr
for args, want in [(["--prompt", "x"], 2),
                   (["--model", M, "--prompt", "x", "--top-p", "0"], 2),
                   (["--model", M, "--prompt", "x", "--bogus", "1"], 2),
                   (["--model", M, "--prompt", "x", "--max-tokens"], 2),
                   (["--model", M, "--prompt", "x", "--format", "xml"], 2),
                   (["--model", M, "--prompt", "x", "--load", "disk"], 2),
                   (["--model", M, "--prompt", "x", "--kv-dtype", "q8_0"], 2),
                   (["--model", "/nonexistent.gguf", "--prompt", "x"], 1),
                   (["--model", "/tmp", "--prompt", "x"], 1),
                   (["--model", M, "--prompt", "word " * 3000, "--max-tokens", 4], 1),
                   (["--model", M, "--prompt", "x", "--isa", "bogus"], 1)]:
    rc, out, err = run(*args)
    f.check(rc == want and err.strip() != "",
            f"{args[:6]}: exit {rc} (want {want}), stderr {err.strip()[:120]!r}")
f.finish()
