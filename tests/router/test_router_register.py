"""pd-router: worker registration accepted and refused (version, digest, layout,
block size, dtype, transport, role, UCX address; with --kv-transport cuda-ipc the GPU,
the node and the IPC handles, and the prefill worker's handles relayed in the decode
task), with the reasons in the reply and the log; heartbeats from unknown workers;
HEALTH; the bound-endpoint line; exit 0."""
import subprocess

from routerlib import ROUTER, MODEL, pb, envelope, model_digest, run


def test_accept_and_refuse(f, make):
    c = make()
    p = c.worker(pb.PREFILL, "p0")
    rep = p.register()
    f.check(rep.accepted and rep.worker_id > 0, f"prefill accepted: {rep}")
    f.check(rep.heartbeat_ms == 50, f"heartbeat_ms from the flag: {rep.heartbeat_ms}")
    d = c.worker(pb.DECODE, "d0")
    rep = d.register()
    f.check(rep.accepted and rep.worker_id not in (0, p.id), f"decode accepted: {rep}")

    cases = [
        ("version", dict(version=2), "version"),
        ("digest", dict(model_digest=b"\x01" * 16), "digest"),
        ("no digest", dict(model_digest=b""), "digest"),
        ("layers", dict(layout={"n_layers": c.layout["n_layers"] + 1}), "layers"),
        ("kv heads", dict(layout={"n_kv_heads": c.layout["n_kv_heads"] * 2}), "KV heads"),
        ("head dim", dict(layout={"head_dim": 3}), "head dim"),
        ("block size", dict(layout={"block_size": 32}), "block size"),
        ("dtype", dict(layout={"dtype": 1}), "dtype"),
        ("transport", dict(kv_transport=pb.ZMQ), "transport"),
        ("role", dict(role=pb.ROLE_UNSPECIFIED), "role"),
        ("ucx address", dict(no_ucx=True), "UCX"),
    ]
    for i, (what, over, word) in enumerate(cases):
        w = c.worker(pb.PREFILL, f"bad{i}")
        version = over.pop("version", 1)
        rep = w.register(version=version, **over)
        f.check(not rep.accepted, f"{what}: refused")
        f.check(word.lower() in rep.reason.lower(), f"{what}: reason {rep.reason!r}")
    log = c.log()
    f.check(log.count("refused") >= len(cases), "every refusal is logged")
    f.check("is not the router's model's" in log, "the digest refusal says why")

    # a heartbeat from a worker the router does not know: register again
    u = c.worker(pb.DECODE, "ghost")
    u.send(envelope(pb.HEARTBEAT, 0, "heartbeat", pb.Heartbeat(worker_id=999)))
    rep = u.expect(pb.REGISTER_REPLY).register_reply
    f.check(not rep.accepted and "register" in rep.reason, f"unknown heartbeat: {rep}")
    # a known socket with the wrong worker id is unknown too
    d.send(envelope(pb.HEARTBEAT, 0, "heartbeat", pb.Heartbeat(worker_id=d.id + 100)))
    rep = d.expect(pb.REGISTER_REPLY).register_reply
    f.check(not rep.accepted, "heartbeat with a foreign worker id refused")
    d.heartbeat()

    cl = c.client()
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=5)
    f.check(h.request_id == 5, "HEALTH_REPLY echoes the request id")
    h = h.health_reply
    f.check(h.ok and h.prefill_workers == 1 and h.decode_workers == 1, f"health: {h}")
    f.check(h.model == "stories260K.gguf" and not h.draining, f"health model: {h}")

    # deregistration removes a worker
    p.auto_hb = False
    p.send(envelope(pb.DEREGISTER, 0, "deregister", pb.Deregister(worker_id=p.id)))
    c.sleep(0.2)
    h = cl.call(pb.HEALTH, "health", pb.HEALTH_REPLY, rid=6).health_reply
    f.check(not h.ok and h.prefill_workers == 0 and h.decode_workers == 1,
            f"health after deregister: {h}")
    f.check(c.stop() == 0, "pd-router exits 0 on SIGTERM")


def test_flags_fix_layout(f, make):
    c = make("--block-size", "32", "--kv-dtype", "f16", "--kv-transport", "zmq")
    w = c.worker(pb.DECODE, "d16", transport=pb.ZMQ)
    rep = w.register()
    f.check(not rep.accepted and "block size" in rep.reason, f"--block-size: {rep}")
    w2 = c.worker(pb.DECODE, "d32", transport=pb.ZMQ, block_size=32)
    rep = w2.register()
    f.check(not rep.accepted and "dtype" in rep.reason, f"--kv-dtype: {rep}")
    w3 = c.worker(pb.PREFILL, "p32", transport=pb.ZMQ, block_size=32, dtype=1)
    rep = w3.register(no_ucx=True)
    f.check(rep.accepted, f"zmq transport, no UCX address, f16, 32: accepted {rep}")
    f.check(c.stop() == 0, "exit 0")


def test_cuda_ipc(f, make):
    c = make("--kv-transport", "cuda-ipc")
    n_layers = c.layout["n_layers"]
    pool = 4096 * n_layers

    def source(node="node-a", k=b"k" * 64, v=b"v" * 64, length=pool):
        return dict(node=node, ipc_k=k, ipc_v=v, len_k=length, len_v=length, gpu="cuda:0")

    cases = [
        ("on the CPU", pb.PREFILL, dict(device="cpu", device_source=source()), "GPU"),
        ("no device", pb.PREFILL, dict(device_source=source()), "GPU"),
        ("no source", pb.PREFILL, dict(device="cuda"), "device source"),
        ("no node", pb.DECODE, dict(device="cuda", device_source=source(node="")), "node"),
        ("short handle", pb.PREFILL,
         dict(device="cuda", device_source=source(k=b"k" * 10)), "64-byte"),
        ("partial layers", pb.PREFILL,
         dict(device="cuda", device_source=source(length=pool + 1)), "whole layers"),
        ("ucx worker", pb.PREFILL, dict(device="cuda", device_source=source(),
                                        kv_transport=pb.UCX), "transport"),
    ]
    for i, (what, role, over, word) in enumerate(cases):
        rep = c.worker(role, f"bad{i}", transport=pb.CUDA_IPC).register(**over)
        f.check(not rep.accepted, f"{what}: refused")
        f.check(word.lower() in rep.reason.lower(), f"{what}: reason {rep.reason!r}")

    p = c.worker(pb.PREFILL, "p0", transport=pb.CUDA_IPC)
    rep = p.register(device="cuda:1", device_source=source())
    f.check(rep.accepted, f"cuda-ipc prefill worker accepted: {rep}")
    other = c.worker(pb.DECODE, "d-other-node", transport=pb.CUDA_IPC)
    rep = other.register(device="cuda", device_source=source(node="node-b", k=b"", v=b""))
    f.check(not rep.accepted and "node-b" in rep.reason and "node-a" in rep.reason,
            f"a decode worker on another node refused: {rep.reason!r}")
    d = c.worker(pb.DECODE, "d0", transport=pb.CUDA_IPC)
    rep = d.register(device="cuda", device_source=source(k=b"", v=b""))
    f.check(rep.accepted, f"cuda-ipc decode worker (no handles needed) accepted: {rep}")

    cl = c.client()
    cl.generate(3, prompt="Once upon a time", max_tokens=4)
    dt = d.expect(pb.DECODE_TASK).decode_task
    p.expect(pb.PREFILL_TASK)
    f.check(dt.kv_transport == pb.CUDA_IPC and dt.prefill_worker_id == p.id,
            f"decode task: transport {dt.kv_transport}, prefill {dt.prefill_worker_id}")
    f.check(dt.HasField("device_source") and dt.device_source.ipc_k == b"k" * 64 and
            dt.device_source.ipc_v == b"v" * 64 and dt.device_source.node == "node-a" and
            dt.device_source.len_k == pool, "D gets P's IPC handles, node and length")
    f.check(not dt.HasField("source"), "no UCX source with cuda-ipc")
    f.check(c.stop() == 0, "exit 0")


def test_cli(f, make):
    p = subprocess.run([ROUTER, "--model", MODEL, "--policy", "fastest"],
                       capture_output=True, timeout=30)
    f.check(p.returncode == 2 and b"usage" in p.stderr, "bad flag: usage, exit 2")
    p = subprocess.run([ROUTER], capture_output=True, timeout=30)
    f.check(p.returncode == 2, "no --model: exit 2")
    p = subprocess.run([ROUTER, "--help"], capture_output=True, timeout=30)
    f.check(p.returncode == 0 and b"--local-prefill-max" in p.stdout, "--help")
    f.check(len(model_digest()) == 16, "--print-digest prints 16 bytes of hex")
    c = make()
    f.check(c.client_ep.startswith("tcp://127.0.0.1:") and not c.client_ep.endswith(":0"),
            f"bound client endpoint {c.client_ep}")
    f.check(c.worker_ep != c.client_ep, "two endpoints")
    f.check(c.log().find(model_digest().hex()) >= 0, "the log names the model digest")
    f.check(c.stop() == 0, "exit 0")


if __name__ == "__main__":
    run([test_accept_and_refuse, test_flags_fix_layout, test_cuda_ipc, test_cli])
