"""pd-router: failures. A decode worker that falls silent mid-stream (the request is
re-run on the other decode worker with the prompt + the tokens sent, first_index and
the last rng state; the client sees no gap and no repeat; the dead worker is fenced
off); TASK_FAILED -> re-run; re-runs exhausted -> WORKER_LOST; a late message for an
unknown task -> TASK_CANCEL; a message from a worker outside the task -> dropped;
strings from a worker (finish_reason, a failure's message, its name) never reach a
client as anything but valid UTF-8."""
import time

from routerlib import SLOW, pb, envelope, run


def first_of(workers, method, timeout=5.0):
    """The worker among workers that receives method first, and the envelope."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for w in workers:
            for i, (e, _) in enumerate(w.inbox):
                if e.method == method:
                    del w.inbox[i]
                    return w, e
            w.cluster.tick()
            w._recv_some(0.01)
    raise TimeoutError(f"no {pb.Method.Name(method)}")


def handshake(p, d, t, first, rng):
    d.task_msg(pb.KV_TARGET, t, "kv_target", pb.KvTarget(n_blocks=1))
    p.expect(pb.KV_TARGET)
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=first, rng_state=rng))
    d.expect(pb.KV_DONE)
    d.task_msg(pb.KV_RELEASE, t, "kv_release", pb.KvRelease(ok=True))
    p.expect(pb.KV_RELEASE)


def test_decode_dies_midstream(f, make):
    c = make("--dead-ms", "300")
    p = c.worker(pb.PREFILL, "p0")
    d1, d2 = c.worker(pb.DECODE, "d1"), c.worker(pb.DECODE, "d2")
    for w in (p, d1, d2):
        w.register()
    cl = c.client()
    prompt = [1, 403, 407, 261]
    cl.generate(9, prompt_ids=prompt, max_tokens=6, temperature=1.0, seed=5, has_seed=True)
    dA, e = first_of([d1, d2], pb.DECODE_TASK)
    dB = d2 if dA is d1 else d1
    t1 = e.request_id
    p.expect(pb.PREFILL_TASK)
    handshake(p, dA, t1, 100, [11, 12, 13, 14])
    dA.task_msg(pb.TOKEN_CHUNK, t1, "token_chunk",
                pb.TokenChunk(index=0, ids=[100, 101, 102], rng_state=[21, 22, 23, 24]))
    got = [cl.expect(pb.CHUNK).chunk for _ in range(2)]
    # D goes silent: no heartbeat, no chunk
    dA.auto_hb = False
    e = dB.expect(pb.DECODE_TASK, timeout=5)
    t2, dt = e.request_id, e.decode_task
    f.check(t2 != t1, "a fresh task id for the re-run")
    f.check(list(dt.ids) == prompt + [100, 101, 102], f"re-run ids {list(dt.ids)}")
    f.check(dt.first_index == 3 and dt.max_tokens == 3, f"first_index {dt.first_index}, "
            f"max_tokens {dt.max_tokens}")
    pt = p.expect(pb.PREFILL_TASK)
    f.check(pt.request_id == t2 and list(pt.prefill_task.rng_state) == [21, 22, 23, 24],
            f"P restarts from the last chunk's rng state {list(pt.prefill_task.rng_state)}")
    f.check(list(pt.prefill_task.ids) == prompt + [100, 101, 102], "P prefills them all")
    f.check("lost: silent for" in c.log(), "the death is logged")
    # the dead worker is fenced off: its late chunk is not relayed, it must register
    dA.task_msg(pb.TOKEN_CHUNK, t1, "token_chunk", pb.TokenChunk(index=3, ids=[666]))
    e = dA.expect(pb.REGISTER_REPLY)
    rep = e.register_reply
    f.check(not rep.accepted, "a dead worker is told to register again")
    # ... with request id 0, never the task id: a worker whose registration number
    # equals the task id would take it for the refusal of its new registration
    f.check(e.request_id == 0, f"the refusal carries request id {e.request_id}, not 0")
    handshake(p, dB, t2, 103, [31, 32, 33, 34])
    # D numbers from first_index, the first token included; a repeat of old indices
    dB.task_msg(pb.TOKEN_CHUNK, t2, "token_chunk", pb.TokenChunk(index=2, ids=[102, 103, 104]))
    dB.task_msg(pb.TOKEN_CHUNK, t2, "token_chunk",
                pb.TokenChunk(index=5, ids=[105], finish_reason="length"))
    rest, err = cl.stream(9)
    f.check(err is None, f"no error {err}")
    chunks = got + rest
    seen = []
    for ch in chunks:
        f.check(ch.index == len(seen), f"index {ch.index} continues at {len(seen)}")
        seen += list(ch.ids)
    f.check(seen == [100, 101, 102, 103, 104, 105], f"no gap, no repeat: {seen}")
    u = chunks[-1].usage
    f.check(u.retries == 1 and u.completion_tokens == 6 and u.decode_worker == dB.name,
            f"usage after a re-run: {u.retries} {u.completion_tokens} {u.decode_worker}")
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=1).stats_reply
    dead = [w for w in s.workers if w.name == dA.name]
    f.check(s.retries == 1 and dead and not dead[0].alive,
            f"STATS: one retry, a dead worker (retries {s.retries}, workers "
            f"{[(w.name, w.alive, w.last_heartbeat_ms_ago) for w in s.workers]})")
    f.check(c.stop() == 0, "exit 0")


def test_task_failed_and_exhausted(f, make):
    c = make("--max-retries", "1")
    p = c.worker(pb.PREFILL, "p0")
    d1, d2 = c.worker(pb.DECODE, "d1"), c.worker(pb.DECODE, "d2")
    for w in (p, d1, d2):
        w.register()
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 2, 3], max_tokens=2)
    dA, e = first_of([d1, d2], pb.DECODE_TASK)
    t1 = e.request_id
    p.expect(pb.PREFILL_TASK)
    err = pb.TaskFailed(error=pb.Error(code=pb.LEASE_EXPIRED, message="lease"))
    dA.task_msg(pb.TASK_FAILED, t1, "task_failed", err)
    e = p.expect(pb.TASK_CANCEL)
    f.check(e.request_id == t1, "P is told to cancel the failed attempt")
    dB, e = first_of([d1, d2], pb.DECODE_TASK)
    t2 = e.request_id
    f.check(dB is not dA and t2 != t1, "re-run on the other decode worker, a fresh task")
    f.check(p.expect(pb.PREFILL_TASK).request_id == t2, "P gets the re-run")
    # this time P fails: D is cancelled; no re-run left
    p.task_msg(pb.TASK_FAILED, t2, "task_failed",
               pb.TaskFailed(error=pb.Error(code=pb.INTERNAL, message="boom")))
    f.check(dB.expect(pb.TASK_CANCEL).request_id == t2, "D is told to cancel")
    e = cl.expect(pb.ERROR, rid=1)
    f.check(e.error.code == pb.WORKER_LOST, f"re-runs spent: {pb.ErrorCode.Name(e.error.code)}"
            f" {e.error.message}")
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=2).stats_reply
    f.check(s.requests_failed == 1 and s.retries == 1 and s.requests_in_flight == 0,
            f"stats {s.requests_failed} {s.retries} {s.requests_in_flight}")
    f.check(c.stop() == 0, "exit 0")


def test_unknown_task_and_outsider(f, make):
    c = make()
    p, p2 = c.worker(pb.PREFILL, "p0"), c.worker(pb.PREFILL, "p1")
    d = c.worker(pb.DECODE, "d0")
    for w in (p, p2, d):
        w.register()
    # late message for a task nobody knows, from a prefill worker: TASK_CANCEL back
    p.task_msg(pb.KV_DONE, 4242, "kv_done", pb.KvDone(first_token=5))
    e = p.expect(pb.TASK_CANCEL)
    f.check(e.request_id == 4242, "TASK_CANCEL answers a late KV_DONE")
    p.task_msg(pb.KV_READY, 4243, "kv_ready", pb.KvReady(layers_done=1))
    f.check(p.expect(pb.TASK_CANCEL).request_id == 4243, "and a late KV_READY")
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 2, 3], max_tokens=2)
    t = d.expect(pb.DECODE_TASK).request_id
    pin, e = first_of([p, p2], pb.PREFILL_TASK)
    out = p2 if pin is p else p
    # a worker outside the task: dropped and logged, nothing relayed
    out.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=7))
    f.check(d.quiet(pb.KV_DONE, 0.3), "an outsider's KV_DONE is not relayed")
    f.check(cl.quiet(pb.CHUNK, 0.01), "nor streamed")
    f.check("not its sender" in c.log(), "and it is logged")
    # wrong direction from a participant: KV_DONE from D is dropped too
    d.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=7))
    f.check(pin.quiet(pb.KV_DONE, 0.2), "D's KV_DONE is not relayed")
    # the request is still alive and completes
    pin.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=8))
    d.expect(pb.KV_DONE)
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=0, ids=[8, 9], finish_reason="length"))
    chunks, err = cl.stream(1)
    ids = [i for ch in chunks for i in ch.ids]
    f.check(err is None and ids == [8, 9], f"completes: {ids}")
    f.check(c.stop() == 0, "exit 0")


def with_bytes(env, mark, raw):
    """env serialized with the string mark replaced by raw bytes of the same length:
    protobuf in Python cannot put invalid UTF-8 in a string field; a C peer can."""
    b = env.SerializeToString()
    assert len(mark) == len(raw) and b.count(mark) == 1
    return b.replace(mark, raw)


def raw_frames(peer, secs):
    """The first frame of every message peer gets within secs, unparsed."""
    out = []
    end = time.monotonic() + secs * SLOW
    while time.monotonic() < end:
        peer.cluster.tick()
        if peer.sock.poll(20):
            out.append(peer.sock.recv_multipart()[0])
    return out


def parses(frame):
    try:
        return pb.Envelope.FromString(frame)
    except Exception:  # DecodeError: e.g. a string field that is not UTF-8
        return None


def test_worker_strings_stay_utf8(f, make):
    c = make("--max-retries", "1")
    p, d = c.worker(pb.PREFILL, "p0"), c.worker(pb.DECODE, "d0")
    for w in (p, d):
        w.register()
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 2, 3], max_tokens=2)
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    # D ends the task with a finish_reason that is no finish reason (nor UTF-8): the
    # attempt is abandoned and run again, nothing of it goes to the client
    env = envelope(pb.TOKEN_CHUNK, t, "token_chunk",
                   pb.TokenChunk(index=0, ids=[8, 9], finish_reason="QQQQ"))
    d.send_raw(with_bytes(env, b"QQQQ", b"\xff\xfe\xc3("))
    got = raw_frames(cl, 0.5)
    envs = [parses(x) for x in got]
    f.check(all(e is not None for e in envs),
            f"every message to the client parses ({len(got)} frames)")
    f.check(not any(e and e.method == pb.CHUNK for e in envs),
            "the chunk with the bad finish_reason is not streamed")
    e = d.expect(pb.DECODE_TASK)
    t2 = e.request_id
    f.check(t2 != t and list(e.decode_task.ids) == [1, 2, 3],
            f"the request runs again as task {t2}, from its prompt")
    p.expect(pb.PREFILL_TASK)
    # P fails the re-run with a message of broken UTF-8 and a long one of two-byte
    # characters: the re-runs are spent, and the client's ERROR still parses
    env = envelope(pb.TASK_FAILED, t2, "task_failed",
                   pb.TaskFailed(error=pb.Error(code=pb.INTERNAL,
                                                message="QQQQ" + "\u00e9" * 400)))
    p.send_raw(with_bytes(env, b"QQQQ", b"\xe2\x82\xff\xc0"))
    got = [parses(x) for x in raw_frames(cl, 0.5)]
    errs = [e for e in got if e and e.method == pb.ERROR and e.request_id == 1]
    f.check(all(e is not None for e in got) and len(errs) == 1,
            f"one ERROR, parsed: {[e and pb.Method.Name(e.method) for e in got]}")
    if errs:
        msg = errs[0].error.message
        f.check(errs[0].error.code == pb.WORKER_LOST and "\ufffd" in msg and "\u00e9" in msg,
                f"WORKER_LOST with the worker's message made valid: {msg[:80]!r}")
    # names: valid UTF-8 without control characters, shorter than 128 bytes
    cases = [("not UTF-8", b"\xff\xfeab"), ("a newline", b"ab\ncd"),
             ("a DEL", b"ab\x7fc")]
    for what, raw in cases:
        w = c.worker(pb.DECODE, "QQ" + "x" * (len(raw) - 2))
        body = w.register_body()
        body.ucx.worker_address = b"ucx-bad"  # the mark only in the name
        env = envelope(pb.REGISTER, 0, "register", body)
        w.send_raw(with_bytes(env, ("QQ" + "x" * (len(raw) - 2)).encode(), raw))
        rep = w.expect(pb.REGISTER_REPLY).register_reply
        f.check(not rep.accepted and "name" in rep.reason,
                f"a name with {what}: refused ({rep.reason!r})")
    long_w = c.worker(pb.DECODE, "d" * 128)
    rep = long_w.register()
    f.check(not rep.accepted and "name" in rep.reason, f"a 128-byte name: refused {rep}")
    ok_w = c.worker(pb.DECODE, "d\u00e9codeur-x" + "\u00e9" * 58)
    f.check(ok_w.register().accepted, "a name of 127 bytes, not all ASCII: accepted")
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=2).stats_reply
    f.check(sorted(w.name for w in s.workers if w.alive) ==
            sorted(["p0", "d0", "d\u00e9codeur-x" + "\u00e9" * 58]),
            f"STATS names the workers: {[w.name for w in s.workers]}")
    f.check(c.stop() == 0, "exit 0")


if __name__ == "__main__":
    run([test_decode_dies_midstream, test_task_failed_and_exhausted,
         test_unknown_task_and_outsider, test_worker_strings_stay_utf8])
