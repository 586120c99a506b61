"""pd-router: cancel (TASK_CANCEL reaches both workers, a cancelled chunk, CANCEL_REPLY),
deadlines (running and queued), a client that disappears, HEALTH and STATS content,
SIGTERM: new work refused while in-flight requests finish, then exit 0."""
import time

from routerlib import pb, envelope, run


def cluster(make, *args):
    c = make(*args)
    p, d = c.worker(pb.PREFILL, "p0"), c.worker(pb.DECODE, "d0")
    p.register()
    d.register()
    return c, p, d


def test_cancel(f, make):
    c, p, d = cluster(make)
    cl = c.client()
    cl.generate(5, prompt_ids=[1, 2, 3], max_tokens=10)
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=40))
    d.expect(pb.KV_DONE)
    f.check(list(cl.expect(pb.CHUNK).chunk.ids) == [40], "first token streamed")
    cl.send(envelope(pb.CANCEL, 5, "cancel"))
    f.check(p.expect(pb.TASK_CANCEL).request_id == t, "TASK_CANCEL reaches P")
    f.check(d.expect(pb.TASK_CANCEL).request_id == t, "TASK_CANCEL reaches D")
    chunks, err = cl.stream(5)
    f.check(err is None and chunks[-1].finish_reason == "cancelled" and
            chunks[-1].index == 1 and chunks[-1].usage.completion_tokens == 1,
            f"cancelled chunk: {chunks[-1] if chunks else None}")
    r = cl.expect(pb.CANCEL_REPLY, rid=5).cancel_reply
    f.check(r.found, "CANCEL_REPLY found")
    cl.send(envelope(pb.CANCEL, 5, "cancel"))
    f.check(not cl.expect(pb.CANCEL_REPLY, rid=5).cancel_reply.found, "again: not found")
    # late chunks of the cancelled task: TASK_CANCEL again, nothing to the client
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk", pb.TokenChunk(index=1, ids=[41]))
    f.check(d.expect(pb.TASK_CANCEL).request_id == t, "a late chunk is answered TASK_CANCEL")
    f.check(cl.quiet(pb.CHUNK, 0.1), "and not streamed")
    f.check(c.stop() == 0, "exit 0")


def test_deadlines(f, make):
    c, p, d = cluster(make)
    cl = c.client()
    now = int(time.time() * 1000)
    cl.generate(1, prompt_ids=[1, 2], max_tokens=5, deadline_ms=now + 300)
    env = d.expect(pb.DECODE_TASK)
    t = env.request_id
    f.check(env.deadline_ms == now + 300, "the deadline travels with the task")
    p.expect(pb.PREFILL_TASK)
    e = cl.expect(pb.ERROR, rid=1)
    late = int(time.time() * 1000) - (now + 300)
    f.check(e.error.code == pb.DEADLINE_EXCEEDED and -10 <= late <= 1000,
            f"DEADLINE_EXCEEDED {late} ms after the deadline")
    f.check(p.expect(pb.TASK_CANCEL).request_id == t and
            d.expect(pb.TASK_CANCEL).request_id == t, "both workers cancel the task")
    # queued (no worker can take it): ends at its deadline too
    c2 = make("--queue-timeout", "300ms")
    cl2 = c2.client()
    cl2.generate(2, prompt_ids=[1, 2], deadline_ms=int(time.time() * 1000) + 200)
    cl2.generate(3, prompt_ids=[1, 2])
    e = cl2.expect(pb.ERROR, rid=2)
    f.check(e.error.code == pb.DEADLINE_EXCEEDED, "queued past its deadline")
    e = cl2.expect(pb.ERROR, rid=3)
    f.check(e.error.code == pb.UNAVAILABLE, f"queue timeout: {pb.ErrorCode.Name(e.error.code)}")
    f.check(c.stop() == 0 and c2.stop() == 0, "exit 0")


def test_client_gone(f, make):
    c, p, d = cluster(make)
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 2, 3], max_tokens=5)
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    cl.close()
    c.peers.remove(cl)
    c.sleep(0.3)  # the router sees the disconnect
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=40))
    f.check(d.expect(pb.TASK_CANCEL).request_id == t, "D cancels the orphaned task")
    f.check(p.expect(pb.TASK_CANCEL).request_id == t, "P too")
    other = c.client()
    s = other.call(pb.STATS, "stats", pb.STATS_REPLY, rid=1).stats_reply
    f.check(s.requests_in_flight == 0, "the request is gone")
    f.check(c.stop() == 0, "exit 0")


def test_health_stats(f, make):
    c = make()
    cl = c.client()
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=1).health_reply
    f.check(not h.ok and h.prefill_workers == 0 and h.decode_workers == 0, "empty: not ok")
    p, d = c.worker(pb.PREFILL, "p0"), c.worker(pb.DECODE, "d0", n_blocks=100)
    p.register()
    d.register()
    d.auto_hb = False
    d.heartbeat(free_blocks=77, running=3, waiting=2, reserved_blocks=4, tokens_out=55)
    p.auto_hb = False
    p.heartbeat(queued_prefill_tokens=1234, held_blocks=6, kv_bytes=999)
    c.sleep(0.1)
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=2).health_reply
    f.check(h.ok and h.prefill_workers == 1 and h.decode_workers == 1, "ok")
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=3).stats_reply
    by = {w.name: w for w in s.workers}
    f.check(set(by) == {"p0", "d0"}, f"workers {set(by)}")
    dw, pw = by["d0"], by["p0"]
    f.check(dw.role == pb.DECODE and dw.alive and dw.worker_id == d.id, "decode info")
    f.check(dw.load.free_blocks == 77 and dw.load.total_blocks == 100 and
            dw.load.running == 3 and dw.load.waiting == 2 and dw.load.reserved_blocks == 4
            and dw.load.tokens_out == 55, f"decode load {dw.load}")
    f.check(pw.load.queued_prefill_tokens == 1234 and pw.load.held_blocks == 6 and
            pw.load.kv_bytes == 999, f"prefill load {pw.load}")
    f.check(0 <= dw.last_heartbeat_ms_ago < 1000, f"heartbeat age {dw.last_heartbeat_ms_ago}")
    f.check(s.requests_total == 0 and s.bad_frames == 0, "counters")
    f.check(c.stop() == 0, "exit 0")


def test_sigterm_drains(f, make):
    c, p, d = cluster(make)
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 2, 3], max_tokens=2)
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    import signal
    c.proc.send_signal(signal.SIGTERM)
    c.sleep(0.1)
    f.check(c.proc.poll() is None, "still running while a request is in flight")
    cl.generate(2, prompt_ids=[1, 2])
    e = cl.expect(pb.ERROR, rid=2)
    f.check(e.error.code == pb.UNAVAILABLE and "draining" in e.error.message,
            f"new work refused: {e.error.message}")
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=3).health_reply
    f.check(h.draining, "HEALTH says draining")
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=50))
    d.expect(pb.KV_DONE)
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=0, ids=[50, 51], finish_reason="length"))
    chunks, err = cl.stream(1)
    ids = [i for ch in chunks for i in ch.ids]
    f.check(err is None and ids == [50, 51], f"the in-flight request finishes: {ids}")
    end = time.monotonic() + 5
    while c.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    f.check(c.proc.returncode == 0, f"exit 0 after the drain: {c.proc.returncode}")
    f.check("drained" in c.log(), "the drain is logged")


if __name__ == "__main__":
    run([test_cancel, test_deadlines, test_client_gone, test_health_stats,
         test_sigterm_drains])
