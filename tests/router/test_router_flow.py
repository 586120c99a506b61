"""pd-router: one request through a fake prefill and a fake decode worker: the tasks
the router sends, the relay of KV_TARGET / KV_READY / KV_DATA (with its data frame) /
KV_DONE / KV_RELEASE, the first token streamed at KV_DONE (before D's chunk), chunks
with UTF-8-safe text, indices 0..n-1 exactly once, finish + usage; a request queued
until workers register; local prefill; prefix-aware affinity."""
from routerlib import pb, run


def setup(c, free=64):
    p = c.worker(pb.PREFILL, "p0")
    d = c.worker(pb.DECODE, "d0")
    assert p.register().accepted and d.register().accepted
    return p, d


def check_indices(f, chunks, n, what):
    seen = []
    for ch in chunks:
        f.check(ch.index == len(seen), f"{what}: chunk index {ch.index}, expected {len(seen)}")
        seen += list(ch.ids)
    f.check(len(seen) == n, f"{what}: {len(seen)} tokens, expected {n}")
    return seen


def test_full_request(f, make):
    c = make()
    p, d = setup(c)
    cl = c.client()
    cl.generate(7, prompt="Once upon a time", max_tokens=5, temperature=0.8, seed=42,
                has_seed=True, top_k=40)
    dt_env = d.expect(pb.DECODE_TASK)
    pt_env = p.expect(pb.PREFILL_TASK)
    t = dt_env.request_id
    dt, pt = dt_env.decode_task, pt_env.prefill_task
    f.check(pt_env.request_id == t and t != 7, f"one fresh task id for both: {t}")
    prompt = list(dt.ids)
    f.check(prompt[0] == 1 and len(prompt) == 5, f"tokenized with BOS: {prompt}")
    f.check(list(pt.ids) == prompt, "P gets the same ids")
    f.check(dt.first_index == 0 and dt.max_tokens == 5 and not dt.local_prefill,
            f"decode task: first {dt.first_index}, max {dt.max_tokens}")
    f.check(dt.prefill_worker_id == p.id and pt.decode_worker_id == d.id, "peers named")
    f.check(dt.source.worker_address == b"ucx-p0" and dt.source.base_v == 8192,
            "D gets P's UCX source")
    f.check(dt.kv_transport == pb.UCX and dt.lease_ms == 10000 and pt.lease_ms == 10000,
            "transport and lease")
    f.check(pt.sampling.seed == 42 and pt.sampling.has_seed and pt.sampling.top_k == 40
            and abs(pt.sampling.temperature - 0.8) < 1e-6, f"sampling: {pt.sampling}")
    f.check(len(pt.rng_state) == 0, "first attempt: rng from the seed")

    d.task_msg(pb.KV_TARGET, t, "kv_target", pb.KvTarget(n_blocks=1, lease_until_ms=123))
    e = p.expect(pb.KV_TARGET)
    f.check(e.request_id == t and e.kv_target.n_blocks == 1 and
            e.kv_target.lease_until_ms == 123, "KV_TARGET relayed to P")
    p.task_msg(pb.KV_READY, t, "kv_ready", pb.KvReady(src_blocks=[3], layers_done=2,
                                                       n_tokens=5))
    e = d.expect(pb.KV_READY)
    f.check(list(e.kv_ready.src_blocks) == [3] and e.kv_ready.layers_done == 2,
            "KV_READY relayed to D")
    payload = bytes(range(256)) * 40
    p.task_msg(pb.KV_DATA, t, "kv_data", pb.KvData(layer=1, pos0=0, n_pos=5), data=payload)
    e, data = d.expect(pb.KV_DATA, with_data=True)
    f.check(e.kv_data.layer == 1 and data == payload, "KV_DATA relayed with its data frame")
    # the "generated" tokens: ' Once upon a time' (the prompt without BOS)
    gen = prompt[1:] + [prompt[1]]
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=gen[0], checksum=99,
                                                   n_tokens=5, rng_state=[1, 2, 3, 4],
                                                   cached_tokens=2))
    e = d.expect(pb.KV_DONE)
    f.check(e.kv_done.checksum == 99 and list(e.kv_done.rng_state) == [1, 2, 3, 4],
            "KV_DONE relayed to D")
    first = cl.expect(pb.CHUNK)
    f.check(first.request_id == 7 and first.chunk.index == 0 and
            list(first.chunk.ids) == gen[:1], f"first token at KV_DONE: {first.chunk}")
    f.check(first.chunk.text == " Once", f"first text {first.chunk.text!r}")
    d.task_msg(pb.KV_RELEASE, t, "kv_release", pb.KvRelease(ok=True))
    f.check(p.expect(pb.KV_RELEASE).kv_release.ok, "KV_RELEASE relayed to P")
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=0, ids=gen[:3], rng_state=[5, 6, 7, 8]))
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=3, ids=gen[3:5], finish_reason="length"))
    chunks, err = cl.stream(7)
    f.check(err is None, f"no error: {err}")
    chunks = [first.chunk] + chunks
    seen = check_indices(f, chunks, 5, "full")
    f.check(seen == gen, f"tokens {seen} == {gen}")
    text = "".join(ch.text for ch in chunks)
    f.check(text == " Once upon a time Once", f"text {text!r}")
    last = chunks[-1]
    u = last.usage
    f.check(last.finish_reason == "length", "finish length")
    f.check(u.prompt_tokens == 5 and u.completion_tokens == 5 and u.seed == 42,
            f"usage counts: {u}")
    f.check(list(u.prompt_ids) == prompt and u.cached_tokens == 2, "usage prompt ids, cached")
    f.check(u.prefill_worker == "p0" and u.decode_worker == "d0" and u.retries == 0,
            "usage workers")
    f.check(0 <= u.queue_ms <= u.ttft_ms <= u.e2e_ms, f"usage times {u}")
    f.check(not p.inbox and not d.inbox, "nothing else sent to the workers")
    s = cl.call(pb.STATS, "stats", pb.STATS_REPLY, rid=1).stats_reply
    f.check(s.tokens_out == 5 and s.requests_total == 1 and s.requests_in_flight == 0,
            f"stats {s.tokens_out} {s.requests_total} {s.requests_in_flight}")
    f.check(c.stop() == 0, "exit 0")


def test_utf8_and_no_text(f, make):
    c = make()
    p, d = setup(c)
    cl = c.client()
    cl.generate(1, prompt_ids=[1, 403], max_tokens=4, seed=1, has_seed=True)
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    em = [3 + 0xE2, 3 + 0x80, 3 + 0x94]  # byte tokens of U+2014
    p.task_msg(pb.KV_DONE, t, "kv_done", pb.KvDone(first_token=em[0]))
    d.expect(pb.KV_DONE)
    for i, tok in enumerate(em):
        d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk", pb.TokenChunk(index=i, ids=[tok]))
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=3, ids=[3 + 0xE2], finish_reason="length"))
    chunks, err = cl.stream(1)
    f.check(err is None, "no error")
    check_indices(f, chunks, 4, "utf8")
    texts = [ch.text for ch in chunks]
    f.check(texts == ["", "", "\u2014", "\ufffd"],
            f"an incomplete character is held back, flushed at the end: {texts}")
    # no_text: ids only
    from routerlib import envelope
    g = pb.GenerateRequest(prompt_ids=[1, 403], max_tokens=2, no_text=True)
    cl.send(envelope(pb.GENERATE, 2, "generate", g))
    t = d.expect(pb.DECODE_TASK).request_id
    p.expect(pb.PREFILL_TASK)
    d.task_msg(pb.TOKEN_CHUNK, t, "token_chunk",
               pb.TokenChunk(index=0, ids=[407, 261], finish_reason="length"))
    chunks, err = cl.stream(2)
    f.check(err is None and list(chunks[0].ids) == [407, 261] and chunks[0].text == "",
            "no_text: ids, no text")
    f.check(chunks[0].usage.seed != 0, "a seed is picked when none is given")
    f.check(c.stop() == 0, "exit 0")


def test_queued_then_local_prefill(f, make):
    c = make()
    cl = c.client()
    cl.generate(3, prompt_ids=[1, 403, 407], max_tokens=2)
    f.check(cl.quiet(pb.ERROR, 0.2), "queued while no worker is registered")
    d = c.worker(pb.DECODE, "dl", can_prefill=True)
    f.check(d.register().accepted, "decode worker that prefills")
    env = d.expect(pb.DECODE_TASK)
    dt = env.decode_task
    f.check(dt.local_prefill and dt.prefill_worker_id == 0 and list(dt.ids) == [1, 403, 407],
            f"no prefill worker: local prefill on D {dt}")
    d.task_msg(pb.TOKEN_CHUNK, env.request_id, "token_chunk",
               pb.TokenChunk(index=0, ids=[261, 378], finish_reason="length"))
    chunks, err = cl.stream(3)
    f.check(err is None and chunks[-1].usage.prefill_worker == "dl", "local: done")
    f.check(chunks[-1].usage.queue_ms >= 150, f"queue time counted {chunks[-1].usage.queue_ms}")
    c.stop()

    # --local-prefill-max: short prompts stay on D even with a prefill worker
    c = make("--local-prefill-max", "4", drain="0.3s")
    p = c.worker(pb.PREFILL, "p0")
    d = c.worker(pb.DECODE, "dl", can_prefill=True)
    p.register()
    d.register()
    cl = c.client()
    cl.generate(4, prompt_ids=[1, 2, 3, 4], max_tokens=1)
    f.check(d.expect(pb.DECODE_TASK).decode_task.local_prefill, "4 tokens: local")
    cl.generate(5, prompt_ids=[1, 2, 3, 4, 5], max_tokens=1)
    dt = d.expect(pb.DECODE_TASK).decode_task
    f.check(not dt.local_prefill and p.expect(pb.PREFILL_TASK), "5 tokens: disaggregated")
    f.check(c.stop() == 0, "exit 0 (the drain times out on the open requests)")


def test_prefix_affinity(f, make):
    c = make("--policy", "prefix-aware", drain="0.3s")
    p1, p2 = c.worker(pb.PREFILL, "pa"), c.worker(pb.PREFILL, "pb")
    d = c.worker(pb.DECODE, "d0")
    for w in (p1, p2, d):
        w.register()
    cl = c.client()
    a = [1] + list(range(10, 50))
    b = [1] + list(range(60, 100))

    def where(rid, ids):
        cl.generate(rid, prompt_ids=ids, max_tokens=1)
        d.expect(pb.DECODE_TASK)
        end = __import__("time").monotonic() + 5
        while __import__("time").monotonic() < end:
            for w in (p1, p2):
                w._recv_some(0.01)
                for i, (e, _) in enumerate(w.inbox):
                    if e.method == pb.PREFILL_TASK:
                        del w.inbox[i]
                        return w.name
        return None
    first_a = where(1, a)
    first_b = where(2, b)
    f.check(first_a != first_b, f"two prompts spread over two workers: {first_a} {first_b}")
    f.check(where(3, a + [5, 6]) == first_a, "a shared 16+ token prefix goes back to its worker")
    f.check(where(4, b) == first_b, "and the other one to its worker")
    f.check(c.stop() == 0, "exit 0")


if __name__ == "__main__":
    run([test_full_request, test_utf8_and_no_text, test_queued_then_local_prefill,
         test_prefix_affinity])
