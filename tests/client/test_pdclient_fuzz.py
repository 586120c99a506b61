"""`pdctl complete` (libpdclient) against a HOSTILE fake router: a pyzmq ROUTER in a
thread of this process that answers each GENERATE with a seeded random script:
CHUNKs with random indices, ids, text, finish reasons and usage (some with bytes
that are not UTF-8 in their strings), ERRORs, envelopes of other methods, other
request ids, mutated bytes, noise and extra frames, then a finishing chunk, an error
or silence. Whatever comes, pdctl must end on its own (the reply or its --timeout)
with status 0 or 1, never from a signal or a sanitizer; with --format json its
output must be one valid JSON object (strict UTF-8) when it succeeds, and text mode
must write valid UTF-8. Bounded in runs and time; PD_FUZZ_SEED picks another seed."""
import json
import os
import random
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
sys.path.insert(0, os.path.join(HERE, "..", "support"))
import pdtest  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(pdtest.BIN)), "python"))
import pd_pb2 as pb  # noqa: E402
import pdfuzz  # noqa: E402
from test_pdclient import FakeRouter  # noqa: E402

SEED = int(os.environ.get("PD_FUZZ_SEED", "1"))
SLOW = 3 if os.environ.get("PD_ASAN") else 1
RUNS = 60
MARK = "QQQQ"  # replaced by bytes that are not UTF-8 on the wire


def reply_frames(r, rid):
    """One random message for request rid: [envelope] or [envelope, extra]."""
    env = pb.Envelope(version=1, method=pb.CHUNK, request_id=rid)
    x = r.random()
    if x < 0.6:
        c = env.chunk
        c.index = r.choice([0, 0, 1, 2, r.randrange(100), 2 ** 32 - 1])
        c.ids.extend(r.randrange(-5, 70000) for _ in range(r.choice([0, 1, 3, 300])))
        c.text = r.choice(["", " hi", "\u00e9\u20ac", MARK, "x" * 5000, "a\x00b"])
        if r.random() < 0.3:
            c.finish_reason = r.choice(["length", "stop", "cancelled", "weird", MARK])
            pdfuzz.fill(r, c.usage)
            c.usage.SetInParent()
            if r.random() < 0.3:
                c.usage.prefill_worker = MARK
    elif x < 0.7:
        env.method = pb.ERROR
        env.error.code = r.choice([v.number for v in pb.ErrorCode.DESCRIPTOR.values] + [99])
        env.error.message = r.choice(["", "bad", MARK, "\u00e9" * 300])
    else:
        field = r.choice([fd.name for fd in pb.Envelope.DESCRIPTOR.oneofs[0].fields])
        env.method = r.choice([v.number for v in pb.Method.DESCRIPTOR.values])
        pdfuzz.fill(r, getattr(env, field))
        getattr(env, field).SetInParent()
    if r.random() < 0.1:
        env.request_id = r.randrange(2 ** 64)
    if r.random() < 0.1:
        env.version = r.choice([0, 2])
    data = env.SerializeToString()
    if MARK.encode() in data and r.random() < 0.7:
        data = data.replace(MARK.encode(), b"\xff\xc3(\xe2", 1)
    if r.random() < 0.15:
        data = pdfuzz.mutate(r, data)
    frames = [data]
    if r.random() < 0.05:
        frames.append(pdfuzz.noise(r))
    return frames


class HostileRouter(FakeRouter):
    """test_pdclient.py's fake router (its socket, thread and stop), answering with
    random scripts instead of well-formed streams."""

    def __init__(self, seed):
        super().__init__()
        self.r = random.Random(seed)

    def run(self):
        r = self.r
        while not self.stop_flag.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart()
            ident = frames[0]
            try:
                env = pb.Envelope.FromString(frames[1])
            except Exception:
                continue
            if env.method != pb.GENERATE:
                continue
            self.generates += 1
            if env.generate.prompt == "bad-utf8":  # a proper stream, strings not UTF-8
                last = pb.Envelope(version=1, method=pb.CHUNK, request_id=env.request_id)
                last.chunk.ids.append(7)
                last.chunk.text = "a" + MARK
                last.chunk.finish_reason = "ab" + MARK
                last.chunk.usage.completion_tokens = 1
                data = last.SerializeToString().replace(MARK.encode(), b"\xff\xc3(\xe2")
                self.sock.send_multipart([ident, data])
                continue
            for _ in range(r.randrange(1, 12)):
                self.sock.send_multipart([ident] + reply_frames(r, env.request_id))
            end = r.random()
            if end < 0.4:  # a proper last chunk
                last = pb.Envelope(version=1, method=pb.CHUNK, request_id=env.request_id)
                last.chunk.index = r.choice([0, 1, 5])
                last.chunk.ids.append(7)
                last.chunk.finish_reason = "length"
                last.chunk.usage.completion_tokens = 1
                self.sock.send_multipart([ident, last.SerializeToString()])
            elif end < 0.6:
                err = pb.Envelope(version=1, method=pb.ERROR, request_id=env.request_id)
                err.error.code = pb.INTERNAL
                err.error.message = "fake failure"
                self.sock.send_multipart([ident, err.SerializeToString()])
            # else: silence; pdctl's --timeout ends it

def utf8(b):
    try:
        b.decode("utf-8", errors="strict")
        return True
    except UnicodeDecodeError:
        return False


def main():
    f = pdtest.Failures()
    router = HostileRouter(SEED)
    router.start()
    pdctl = pdtest.require(os.path.join(pdtest.BIN, "pdctl"))
    counts = {}
    try:
        # first a well-formed stream whose text and finish_reason are not UTF-8:
        # both formats print U+FFFD for the bad bytes
        for fmt in ("text", "json"):
            p = subprocess.run([pdctl, "complete", "--router", router.endpoint, "--prompt",
                                "bad-utf8", "--timeout", str(5 * SLOW), "--format", fmt],
                               capture_output=True, timeout=30 * SLOW)
            out = p.stdout.decode("utf-8", errors="replace")
            f.check(p.returncode == 0 and utf8(p.stdout) and "a\ufffd" in out,
                    f"bad-utf8 ({fmt}): status {p.returncode}, output {p.stdout!r}")
            if fmt == "json" and p.returncode == 0 and utf8(p.stdout):
                j = json.loads(out)
                f.check(j.get("finish_reason", "").startswith("ab\ufffd"),
                        f"bad-utf8: finish_reason {j.get('finish_reason')!r}")
        for i in range(RUNS):
            fmt = "json" if i % 2 else "text"
            argv = [pdctl, "complete", "--router", router.endpoint, "--prompt",
                    "Once upon a time", "--max-tokens", "8", "--timeout", str(0.5 * SLOW),
                    "--format", fmt]
            try:
                p = subprocess.run(argv, capture_output=True, timeout=30 * SLOW)
            except subprocess.TimeoutExpired:
                f.check(False, f"run {i}: pdctl complete did not end within {30 * SLOW} s")
                continue
            counts[p.returncode] = counts.get(p.returncode, 0) + 1
            err = p.stderr.decode(errors="replace")[-600:]
            if not f.check(p.returncode in (0, 1),
                           f"run {i} ({fmt}): status {p.returncode}, stderr: {err}"):
                continue
            if fmt == "json" and p.returncode == 0:
                try:
                    j = json.loads(p.stdout.decode("utf-8", errors="strict"))
                    ok = isinstance(j, dict) and isinstance(j.get("ids"), list)
                except (UnicodeDecodeError, ValueError) as e:
                    ok, j = False, e
                f.check(ok, f"run {i}: json output is one valid object: {j!r:.300}")
            if fmt == "text":
                f.check(utf8(p.stdout), f"run {i}: text output is UTF-8: {p.stdout[-200:]!r}")
        f.check(router.generates >= RUNS + 2,
                f"the router got every request ({router.generates})")
        print(f"seed {SEED}: {RUNS} runs of pdctl complete, exit statuses {counts}",
              flush=True)
    finally:
        router.stop()
    f.finish()


if __name__ == "__main__":
    main()
