"""Multi-host on one machine: the router, a prefill worker and a decode worker each in
a network namespace of their own (ip netns), joined by veth pairs to a bridge in a
fourth, on private addresses this test creates and removes. Control (ZeroMQ over
TCP) and the KV (UCX restricted to its TCP transport) really cross network
interfaces, and every golden line still comes out exact, alone and 16 in flight,
with the decode worker's free blocks back at the end. Needs root (CI runs as root)."""
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "support"))

INNER = "--inner" in sys.argv


def sh(*args, check=True):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p


def setup(tag, net):
    hub = f"pdhub{tag}"
    names = {"router": f"pdr{tag}", "prefill": f"pdp{tag}", "decode": f"pdd{tag}"}
    sh("ip", "netns", "add", hub)
    sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", hub, "link", "set", "br0", "up")
    addrs, devs = {}, {}
    for i, (role, ns) in enumerate(names.items()):
        sh("ip", "netns", "add", ns)
        a, b = f"v{tag}{i}a", f"v{tag}{i}b"
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", ns)
        sh("ip", "link", "set", b, "netns", hub)
        addr = f"{net}.{i + 1}"
        addrs[role] = addr
        devs[role] = a
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", a)
        sh("ip", "-n", ns, "link", "set", a, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", hub, "link", "set", b, "master", "br0")
        sh("ip", "-n", hub, "link", "set", b, "up")
    return hub, names, addrs, devs


def teardown(hub, names):
    for ns in list(names.values()) + [hub]:
        sh("ip", "netns", "del", ns, check=False)


def outer():
    from pdcluster import Failures
    f = Failures()
    tag = f"{os.getpid() % 100000}"
    net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
    hub, names, addrs, devs = None, None, None, None
    try:
        hub, names, addrs, devs = setup(tag, net)
        # each host routes to the router through its veth, not loopback
        for role in ("prefill", "decode"):
            p = sh("ip", "-n", names[role], "route", "get", addrs["router"], check=False)
            f.check(p.returncode == 0 and f"dev {devs[role]}" in p.stdout,
                    f"{role}: no route to the router over its veth: {p.stdout}{p.stderr}")
        env = dict(os.environ, PD_NETNS=json.dumps({"names": names, "addrs": addrs,
                                                    "devs": devs}))
        p = subprocess.run(["ip", "netns", "exec", names["router"], sys.executable,
                            os.path.abspath(__file__), "--inner"], env=env,
                           capture_output=True, text=True, timeout=600)
        print(p.stdout[-6000:], p.stderr[-6000:], flush=True)
        f.check(p.returncode == 0, f"the run inside the namespaces failed ({p.returncode})")
    finally:
        if hub:
            teardown(hub, names)
    left = sh("ip", "netns", "list").stdout
    f.check(tag not in left, f"namespaces left behind: {left}")
    f.finish()


def inner():
    """Runs in the router's namespace: the router here, workers in theirs."""
    from pdcluster import (Cluster, Failures, free_blocks, golden_lines, model_args,
                           wait_blocks_back)
    cfg = json.loads(os.environ["PD_NETNS"])
    names, addrs, devs = cfg["names"], cfg["addrs"], cfg["devs"]

    def rx_bytes(role):
        p = subprocess.run(["ip", "netns", "exec", names[role], "cat",
                            f"/sys/class/net/{devs[role]}/statistics/rx_bytes"],
                           capture_output=True, text=True, timeout=30)
        return int(p.stdout.strip() or 0)
    f = Failures()
    # UCX may only use TCP (no shared memory or CMA between these "hosts")
    env = dict(os.environ, UCX_TLS="tcp", UCX_NET_DEVICES="all")
    by_model = {}
    for g in golden_lines():
        by_model.setdefault(g["model"], []).append(g)
    for model, glines in by_model.items():
        with Cluster(model_args(glines[0]), 1, 1, "ucx", router_host=addrs["router"],
                     ns={"prefill": names["prefill"], "decode": names["decode"]},
                     env=env, prefill_args=["--kv-layerwise-min", "1"]) as cl:
            cl.wait_ready(timeout=60)
            c = cl.client()
            start = free_blocks(c)
            rx0 = rx_bytes("decode")
            reqs = []
            for g in glines:
                reqs.append((g, c.generate(prompt=g["prompt"],
                                           max_tokens=len(g["greedy_ids"]))))
            for i in range(16):
                g = glines[i % len(glines)]
                reqs.append((g, c.generate(prompt=g["prompt"],
                                           max_tokens=len(g["greedy_ids"]))))
            res = c.wait_all([r for _, r in reqs], timeout=300)
            for (g, _), r in zip(reqs, res):
                want = g["greedy_ids"][: g["exact_prefix"]]
                f.check(not r.error and r.ids[: len(want)] == want and
                        len(r.ids) == len(g["greedy_ids"]),
                        f"{model} {g['prompt']!r}: {r.error} {len(r.ids)} ids")
            s = c.stats()
            moved = sum(w.load.kv_bytes for w in s.workers) if s else 0
            f.check(moved > 0, f"{model}: no KV bytes moved across the namespaces")
            rx = rx_bytes("decode") - rx0
            f.check(rx > moved, f"{model}: the decode worker's veth received {rx} bytes, "
                                f"less than the {moved} KV bytes it read")
            print(f"{model}: {moved} KV bytes read, {rx} bytes in on the decode veth",
                  flush=True)
            ok, now = wait_blocks_back(c, start)
            f.check(ok, f"{model}: free blocks {now} != {start}")
            c.close()
    f.finish()


if __name__ == "__main__":
    inner() if INNER else outer()
