"""pd-router: every frame check answers ERROR with the right code (and the request id
when readable), parameters out of range are INVALID_ARGUMENT, DUPLICATE ids, a past
deadline; the router keeps serving others and counts bad frames."""
import math

from routerlib import pb, envelope, run


def expect_error(f, peer, code, what, rid=None):
    e = peer.expect(pb.ERROR, rid=rid)
    f.check(e.error.code == code,
            f"{what}: {pb.ErrorCode.Name(e.error.code)} ({e.error.message}), want "
            f"{pb.ErrorCode.Name(code)}")
    return e


def test_frame_checks(f, make):
    c = make()
    cl = c.client()
    other = c.client()
    n_bad = 0
    cl.send_raw(b"\xff\xff\xff garbage")
    expect_error(f, cl, pb.BAD_REQUEST, "garbage")
    n_bad += 1
    cl.send(envelope(pb.GENERATE, 11, "generate", pb.GenerateRequest(prompt="x"), version=2))
    e = expect_error(f, cl, pb.UNSUPPORTED_VERSION, "version 2")
    f.check(e.request_id == 11, "the request id is echoed")
    n_bad += 1
    env = envelope(pb.GENERATE, 12, "generate", pb.GenerateRequest(prompt="x"))
    env.method = 99
    cl.send(env)
    expect_error(f, cl, pb.UNKNOWN_METHOD, "method 99", rid=12)
    n_bad += 1
    cl.send(envelope(pb.GENERATE, 13, "stats"))
    expect_error(f, cl, pb.BAD_REQUEST, "GENERATE with a stats body", rid=13)
    n_bad += 1
    raw = envelope(pb.HEALTH, 14, "health").SerializeToString()
    cl.send_raw(raw, b"data", b"more")
    expect_error(f, cl, pb.BAD_REQUEST, "three frames")
    n_bad += 1
    cl.send_raw(raw, b"data")
    expect_error(f, cl, pb.BAD_REQUEST, "a data frame on HEALTH")
    n_bad += 1
    big = envelope(pb.GENERATE, 15, "generate", pb.GenerateRequest(prompt="a" * (5 << 20)))
    cl.send(big)
    e = expect_error(f, cl, pb.TOO_LARGE, "a 5 MiB frame")
    f.check(e.request_id == 15, f"TOO_LARGE names the request: {e.request_id}")
    n_bad += 1
    cl.send(envelope(pb.REGISTER, 16, "register", pb.Register(name="x")))
    expect_error(f, cl, pb.UNKNOWN_METHOD, "REGISTER on the client socket", rid=16)
    n_bad += 1
    cl.send(envelope(pb.CHUNK, 17, "chunk"))
    expect_error(f, cl, pb.UNKNOWN_METHOD, "CHUNK from a client", rid=17)
    n_bad += 1
    w = c.worker(pb.DECODE, "d0")
    w.send(envelope(pb.GENERATE, 18, "generate", pb.GenerateRequest(prompt="x")))
    expect_error(f, w, pb.UNKNOWN_METHOD, "GENERATE on the worker socket", rid=18)
    n_bad += 1
    w.send_raw(b"\x08")
    expect_error(f, w, pb.BAD_REQUEST, "truncated envelope from a worker")
    n_bad += 1
    w.send(envelope(pb.HEARTBEAT, 19, "heartbeat", pb.Heartbeat(), version=7))
    rep = w.expect(pb.REGISTER_REPLY).register_reply
    f.check(not rep.accepted and "version" in rep.reason, f"worker version 7: {rep}")
    n_bad += 1

    # the router still serves the other client, and counted the bad frames
    h = other.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=1).health_reply
    f.check(h.model == "stories260K.gguf", "still serving")
    s = other.call(pb.STATS, "stats", pb.STATS_REPLY, rid=2).stats_reply
    f.check(s.bad_frames == n_bad, f"bad frames counted: {s.bad_frames} (sent {n_bad})")
    f.check(c.stop() == 0, "exit 0")


def test_parameters(f, make):
    c = make()
    cl = c.client()
    bad = [
        ("token id 512", dict(prompt_ids=[1, 512])),
        ("token id -1", dict(prompt_ids=[1, -1])),
        ("prompt over the context", dict(prompt_ids=[1] * (c.ctx_len + 1))),
        ("prompt filling the context", dict(prompt_ids=[1] * c.ctx_len)),
        ("text prompt over the context", dict(prompt="Once upon a time " * c.ctx_len)),
        ("max_tokens -2", dict(max_tokens=-2)),
        ("top_p 1.5", dict(top_p=1.5)),
        ("top_p -0.1", dict(top_p=-0.1)),
        ("top_p nan", dict(top_p=math.nan)),
        ("temperature -1", dict(temperature=-1.0)),
        ("temperature inf", dict(temperature=math.inf)),
        ("min_p 2", dict(min_p=2.0)),
    ]
    for i, (what, kw) in enumerate(bad):
        cl.generate(100 + i, **kw)
        expect_error(f, cl, pb.INVALID_ARGUMENT, what, rid=100 + i)
    g = pb.GenerateRequest(prompt="x")
    g.stop_ids.append(9999)
    cl.send(envelope(pb.GENERATE, 130, "generate", g))
    expect_error(f, cl, pb.INVALID_ARGUMENT, "stop id out of range", rid=130)

    # in range: accepted (queued: no worker yet); the same id again is a DUPLICATE,
    # but not from another client
    cl.generate(200, max_tokens=-1, top_p=0.0, temperature=0.7, min_p=1.0)
    cl.generate(200)
    expect_error(f, cl, pb.DUPLICATE, "request 200 twice", rid=200)
    cl2 = c.client()
    cl2.generate(200)
    f.check(cl2.quiet(pb.ERROR, 0.2), "the same id from another client is no duplicate")
    cl.generate(201, deadline_ms=1000)
    expect_error(f, cl, pb.DEADLINE_EXCEEDED, "a deadline in the past", rid=201)
    # an empty text prompt is BOS alone (as pdctl generate takes it), not an error
    cl.generate(202, prompt="")
    f.check(cl.quiet(pb.ERROR, 0.1), "an empty text prompt is accepted")
    cl.send(envelope(pb.CANCEL, 202, "cancel"))
    cl.expect(pb.CANCEL_REPLY, rid=202)
    cl.stream(202)
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=3).stats_reply
    f.check(s.requests_in_flight == 2 and s.requests_total == 3,
            f"two accepted and queued: {s.requests_in_flight}/{s.requests_total}")
    for peer in (cl, cl2):
        peer.send(envelope(pb.CANCEL, 200, "cancel"))
        r = peer.expect(pb.CANCEL_REPLY, rid=200).cancel_reply
        f.check(r.found, "the queued request is cancelled")
        chunks, err = peer.stream(200)
        f.check(err is None and chunks[-1].finish_reason == "cancelled",
                "a cancelled chunk ends the queued request")
    f.check(c.stop() == 0, "exit 0")


if __name__ == "__main__":
    run([test_frame_checks, test_parameters])
