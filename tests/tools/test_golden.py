"""Every golden line of ../shared/golden reproduced by `pdctl generate`: prompt_ids
exact and the first exact_prefix greedy ids exact, loading the model as GGUF and as
the llama2.c pair, with every kernel ISA this CPU has, 1 and 2 threads, and prompt
chunking (--batch) from one token per pass to the whole prompt in one."""
import os

from pdtest import MODELS, Failures, cpu_flags, generate_json, golden_lines, require

f = Failures()
flags = cpu_flags()
isas = ["scalar"] + (["avx2"] if {"avx2", "fma", "f16c"} <= flags else []) + \
       (["avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else [])

for g in golden_lines():
    stem = os.path.splitext(g["model"])[0]
    gguf = require(os.path.join(MODELS, stem + ".gguf"))
    pair = [require(os.path.join(MODELS, g["model"])), "--tokenizer",
            require(os.path.join(MODELS, g["tokenizer"]))]
    n = len(g["greedy_ids"])
    want = g["greedy_ids"][: g["exact_prefix"]]
    variants = [([gguf], "gguf")] + [(pair, "llama2.c")]
    runs = []
    for model_args, label in variants:
        for isa in isas:
            for threads, batch in ((2, 512), (1, 1), (2, 3)):
                runs.append((model_args, f"{label} isa={isa} threads={threads} batch={batch}",
                             ["--isa", isa, "--threads", threads, "--batch", batch]))
    for model_args, label, extra in runs:
        what = f"{g['model']} prompt={g['prompt']!r} {label}"
        out = generate_json("--model", *model_args, "--prompt", g["prompt"], "--max-tokens", n,
                            "--temperature", 0, "--ignore-eos", *extra)
        f.check(out["prompt_ids"] == g["prompt_ids"],
                f"{what}: prompt_ids {out['prompt_ids']} != {g['prompt_ids']}")
        got = out["ids"][: len(want)]
        if got != want:
            first = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want))
                         if a != b)
            f.check(False, f"{what}: ids differ from golden at position {first}")
        else:
            f.check(len(out["ids"]) == n, f"{what}: generated {len(out['ids'])} != {n}")
    # The decoded text, as run.c printed it (prompt then generation).
    out = generate_json("--model", gguf, "--prompt", g["prompt"], "--max-tokens", n,
                        "--temperature", 0, "--ignore-eos")
    if g["exact_prefix"] == n:
        f.check(g["prompt"] + out["text"] == g["run_c_stdout"],
                f"{g['model']} {g['prompt']!r}: text differs from run.c's stdout:\n"
                f"{(g['prompt'] + out['text'])[:200]!r}\nvs\n{g['run_c_stdout'][:200]!r}")
f.finish()
