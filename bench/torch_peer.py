"""The PyTorch peer of tests/gpu/run.sh: the mkmodel 1B shapes (dim 2048, hidden 8192,
16 layers, 32 heads, 8 KV heads of 64, vocab 32000, random BF16 weights) as a plain
eager Llama forward with a preallocated KV cache, the way a reader would write it
without a serving framework: decode tokens/s at 1, 8, 64 and 256 sequences (12-token
prompts, then greedy steps, as run.sh's pdserve runs), prefill tokens/s of a
2048-token prompt, and the device-to-device copy bandwidth. Prints one JSON object.
usage: python3 bench/torch_peer.py [--quick]"""
import json
import sys
import time

import torch
import torch.nn.functional as F

QUICK = "--quick" in sys.argv
DIM, HID, LAYERS, NH, NKV, HD, VOCAB = 2048, 8192, 16, 32, 8, 64, 32000
dev = torch.device("cuda")
dt = torch.bfloat16
torch.manual_seed(0)


def w(*shape):
    return (torch.randn(*shape, device=dev, dtype=torch.float32) * 0.02).to(dt)


layers = [dict(wq=w(NH * HD, DIM), wk=w(NKV * HD, DIM), wv=w(NKV * HD, DIM),
               wo=w(DIM, NH * HD), wg=w(HID, DIM), wu=w(HID, DIM), wd=w(DIM, HID),
               n1=torch.ones(DIM, device=dev, dtype=dt), n2=torch.ones(DIM, device=dev,
                                                                        dtype=dt))
          for _ in range(LAYERS)]
emb, out_w, norm = w(VOCAB, DIM), w(VOCAB, DIM), torch.ones(DIM, device=dev, dtype=dt)
inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, device=dev, dtype=torch.float32) / HD))


def rms(x, g):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * g


def rope(x, pos):  # x [B, T, H, HD], pos [B, T]
    ang = pos[..., None].float() * inv
    c, s = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(dt)


def forward(ids, pos, kc, vc, start):
    """ids [B, T] at positions start..start+T-1 (same for every row); caches
    [L, B, NKV, max, HD]. Returns the last row's logits [B, VOCAB]."""
    B, T = ids.shape
    x = emb[ids]
    for l, L in enumerate(layers):
        h = rms(x, L["n1"])
        q = rope((h @ L["wq"].T).view(B, T, NH, HD), pos)
        k = rope((h @ L["wk"].T).view(B, T, NKV, HD), pos)
        v = (h @ L["wv"].T).view(B, T, NKV, HD)
        kc[l, :, :, start:start + T] = k.transpose(1, 2)
        vc[l, :, :, start:start + T] = v.transpose(1, 2)
        kk, vv = kc[l, :, :, :start + T], vc[l, :, :, :start + T]
        a = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=T > 1,
                                           enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(B, T, NH * HD) @ L["wo"].T
        h = rms(x, L["n2"])
        x = x + (F.silu(h @ L["wg"].T) * (h @ L["wu"].T)) @ L["wd"].T
    return rms(x[:, -1], norm) @ out_w.T


res = {"device": torch.cuda.get_device_name()}
# copy bandwidth
a = torch.empty(1 << 28, device=dev, dtype=torch.float32)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
ts = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    ts.append((time.perf_counter() - t0) / 10)
res["copy_GBps"] = 2 * a.numel() * 4 / sorted(ts)[3] / 1e9
del a, b

with torch.inference_mode():
    steps = 32 if QUICK else 128
    for B in (1, 8, 64, 256):
        P = 12
        kc = torch.zeros(LAYERS, B, NKV, P + steps + 1, HD, device=dev, dtype=dt)
        vc = torch.zeros_like(kc)
        ids = torch.randint(0, VOCAB, (B, P), device=dev)
        pos = torch.arange(P, device=dev).expand(B, P)
        logits = forward(ids, pos, kc, vc, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            logits = forward(nxt, torch.full((B, 1), P + s, device=dev), kc, vc, P + s)
        nxt = logits.argmax(-1)
        nxt.cpu()
        dt_s = time.perf_counter() - t0
        res[f"decode_{B}"] = {"tokens_per_s": B * steps / dt_s, "steps_per_s": steps / dt_s}
        del kc, vc
    T = 2048
    kc = torch.zeros(LAYERS, 1, NKV, T, HD, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    ids = torch.randint(0, VOCAB, (1, T), device=dev)
    pos = torch.arange(T, device=dev)[None]
    forward(ids, pos, kc, vc, 0)
    torch.cuda.synchronize()
    ts = []
    for _ in range(3 if QUICK else 7):
        t0 = time.perf_counter()
        forward(ids, pos, kc, vc, 0).cpu()
        ts.append(time.perf_counter() - t0)
    res["prefill_2048_tokens_per_s"] = T / sorted(ts)[len(ts) // 2]
print(json.dumps(res, indent=1))
