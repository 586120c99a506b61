"""test_tokenizer_oracle.py - `pdctl tokenize` against SentencePiece itself.

An independent oracle: the `sentencepiece` package loads the .model files behind the
shared vocabularies and encodes a few hundred strings (seeded RNG: words,
punctuation, digits, whitespace runs, newlines, tabs, accents, CJK, emoji, combining
marks, literal "<s>" / "<0x41>" / U+2581, plus the golden prompts and their
generated text). Every string must give [BOS] + sp.encode(text) from pdctl for
every vocabulary file (llama2.c .bin and GGUF), and --decode must give the text back
wherever SentencePiece's own decode does.

One class of strings differs for a principled reason and is normalised here
rather than excluded: tok512 and tok105 were trained with SentencePiece's
remove_extra_whitespaces (leading/trailing spaces dropped, runs of spaces collapsed
to one). That is part of the .model's normalizer spec, which neither tokenizer.bin
nor these GGUF files carry, and llama2.c's encode() (the golden reference) does
not apply it, so pdctl is given the text with the spaces already normalised the way
SentencePiece does it. The Llama-2 vocabulary does not remove them and gets the
raw text. Everything else (NFKC is not used by any of the three: identity rule)
is compared as is.

Needs PD_BIN_DIR, PD_SHARED_DIR and Debian's python3-sentencepiece; a missing file
or module is a failure. Exits non-zero on any mismatch, printing the first few.
"""
import json
import os
import random
import re
import subprocess
import sys

import sentencepiece as spm

BIN = os.environ.get("PD_PDCTL") or os.path.join(os.environ.get("PD_BIN_DIR", "build/bin"),
                                                  "pdctl")
SHARED = os.environ.get("PD_SHARED_DIR", "../shared")
MODELS = os.path.join(SHARED, "models")
GOLDEN = os.path.join(SHARED, "golden")
TIMEOUT = 30
N_RANDOM = 300

# (SentencePiece model, [pdctl vocabulary arguments]) for each vocabulary.
VOCABS = [
    ("tok512.model", [["--tokenizer", "tok512.bin", "--vocab-size", "512"],
                      ["--model", "stories260K.gguf"]]),
    ("llama2_tokenizer.model", [["--tokenizer", "llama2_tokenizer.bin",
                                 "--vocab-size", "32000"],
                                ["--model", "llama-2-tiny-random.gguf"]]),
    ("tok105.model", [["--tokenizer", "tok105.bin", "--vocab-size", "105"]]),
]

WORDS = ("Once upon a time there was little girl named Lily She loved to play outside "
         "Tom and his dog went park The sun shining birds singing happy friends "
         "don't can't it's Mr. Mrs. ball tree house big small red blue jumped ran "
         "banana 2023 3.14 x=1+2 foo_bar CamelCase URL http://example.com/a?b=c "
         "e-mail user@example.com #hashtag $100 50% (parens) [brackets] {braces}").split()
UNICODE = ["é", "è", "à", "ü", "ö", "ñ", "ç", "Ångström", "naïve", "café", "über",
           "中文", "日本語", "한국어", "你好世界", "Привет", "Ελληνικά", "عربى", "עברית",
           "😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "\u200a", "\u00a0", "\u3000",
           "ﬁ", "①", "™", "€", "…", "—", "“quoted”", "‘x’", "\u2581", "\u2581x",
           "<s>", "</s>", "<unk>", "<0x41>", "<0x0A>", "<<s>>", "\x7f", "\x01"]
PUNCT = list(".,;:!?'\"-()[]{}<>/\\|@#$%^&*_+=~`")
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", " \t "]


def random_text(rng):
    parts = []
    for _ in range(rng.randint(1, 25)):
        r = rng.random()
        if r < 0.45:
            w = rng.choice(WORDS)
            parts.append(w.upper() if rng.random() < 0.05 else w)
        elif r < 0.6:
            parts.append(rng.choice(UNICODE))
        elif r < 0.7:
            parts.append(rng.choice(PUNCT))
        elif r < 0.78:
            parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
        else:
            parts.append(rng.choice(SPACES))
        if rng.random() < 0.6:
            parts.append(" ")
    s = "".join(parts)
    if rng.random() < 0.2:
        s = rng.choice(SPACES) + s
    if rng.random() < 0.2:
        s = s + rng.choice(SPACES)
    return s


def golden_texts():
    texts = []
    names = sorted(f for f in os.listdir(GOLDEN) if f.endswith(".jsonl"))
    if not names:
        sys.exit("no golden files in %s" % GOLDEN)
    for name in names:
        with open(os.path.join(GOLDEN, name), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                texts.append(rec["prompt"])
                out = rec["run_c_stdout"]
                texts.append(out[:300])
                texts.extend(s for s in re.split(r"(?<=[.!?])\s+", out)[:20] if s)
    return texts


def strings():
    rng = random.Random(20240611)
    fixed = ["", " ", "a", "Hello  world", "  lead", "trail  ", "a\n\nb", "x\tz ",
             "<s>hi", "é中文😀", "中a文", "\u2581x", "a" * 300, "ab" * 200,
             " ".join(WORDS), "ｈｅｌｌｏ", "\n", "  ", "\t\t"]
    return fixed + golden_texts() + [random_text(rng) for _ in range(N_RANDOM)]


def removes_extra_whitespace(sp):
    return sp.encode("a  b") == sp.encode("a b") and sp.encode(" a ") == sp.encode("a")


def sp_normalize_spaces(s):
    """SentencePiece's remove_extra_whitespaces under the identity normalizer: leading
    ' ' dropped, runs of ' ' collapsed, and trailing whitespace dropped after spaces
    became U+2581, so a literal U+2581 at the end goes too."""
    return re.sub("[ \u2581]+\\Z", "", re.sub(" +", " ", s.lstrip(" ")))


def pdctl(args, data):
    p = subprocess.run([BIN, "tokenize"] + args, input=data, capture_output=True,
                       timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError("pdctl %s failed (%d): %s" % (" ".join(args), p.returncode,
                                                         p.stderr.decode(errors="replace")))
    return p.stdout


def vocab_args(args):
    return [os.path.join(MODELS, a) if a.endswith((".bin", ".gguf")) else a for a in args]


def check_vocab(model, arg_sets, texts, failures):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(MODELS, model))
    bos, unk = sp.bos_id(), sp.unk_id()
    norm = removes_extra_whitespace(sp)
    n_cmp = n_dec = 0
    for args in arg_sets:
        args = vocab_args(args)
        for text in texts:
            want = [bos] + sp.encode(text)
            given = sp_normalize_spaces(text) if norm else text
            data = given.encode("utf-8")
            got = json.loads(pdctl(args + ["--stdin"], data))
            n_cmp += 1
            if got != want:
                failures.append("%s %s: %r: pdctl %s != sentencepiece %s"
                                % (model, args[1], text, got, want))
                continue
            if unk in want:
                continue  # SentencePiece decodes UNK as " \u2047 ", pdctl as nothing
            dec = pdctl(args + ["--decode", "--stdin"], json.dumps(got).encode())
            n_dec += 1
            # Round trip: the text back, U+2581 being a space to SentencePiece.
            if dec != given.replace("\u2581", " ").encode("utf-8"):
                failures.append("%s %s: round trip %r: pdctl decoded %r"
                                % (model, args[1], given, dec))
            # SentencePiece drops every leading space when it removes extra
            # whitespace; run.c's rule (kept by pdctl) drops only the dummy prefix.
            sp_dec = sp.decode(want).encode("utf-8")
            if (dec.lstrip(b" ") if norm else dec) != sp_dec:
                failures.append("%s %s: decode %r: pdctl %r != sentencepiece %r"
                                % (model, args[1], text, dec, sp_dec))
    print("%s: %d encodings compared, %d decodings%s" % (
        model, n_cmp, n_dec, " (extra spaces normalised first)" if norm else ""))


def main():
    if not os.path.exists(BIN):
        sys.exit("missing %s" % BIN)
    texts = strings()
    failures = []
    for model, arg_sets in VOCABS:
        check_vocab(model, arg_sets, texts, failures)
    if failures:
        print("%d mismatches; the first ones:" % len(failures))
        for f in failures[:8]:
            print("  " + f)
        sys.exit(1)
    print("all %d strings match sentencepiece" % len(texts))


if __name__ == "__main__":
    main()
