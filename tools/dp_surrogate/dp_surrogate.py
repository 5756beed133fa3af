"""PyTorch surrogate of the ewtune_tf main job, for fast hyperparameter screening on a GPU.

Mirrors trainers.glue: MiniLM-L6 (sentence-transformers weights), logits head on
the masked token mean, KerasHub-style LoRA (per-head A for q/k/v), Poisson
sampling with q = B/N, floor(1/q) steps per epoch, per-example clipping, Gaussian
noise sigma*C once per logical step, division by the expected batch size, Adam
(Keras defaults: eps 1e-7). sigma comes from ewtune_tf's certified calibration
(computed on the CPU machine, passed in). Screening only: reported numbers come
from the TF trainer.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.func import grad, vmap

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Inputs written by prepare.py; default: next to this file (how it travels to the device).
HERE = os.environ.get("SURROGATE_DATA", os.path.dirname(os.path.abspath(__file__)))
NL, H, DH, D = 6, 12, 32, 384


def load():
    w = np.load(os.path.join(HERE, "weights_fp16.npz"))
    W = {k: torch.tensor(w[k].astype(np.float32), device=DEV) for k in w.files}
    d = np.load(os.path.join(HERE, "sst2.npz"))
    data = {k: d[k] for k in d.files}
    return W, data


def ln(x, g, b):
    return torch.nn.functional.layer_norm(x, (D,), g, b, eps=1e-12)


def lin(x, W, name, P, lora_scale):
    """x @ W^T + b with optional LoRA/full-FT overrides from P."""
    wk, bk = name + ".weight", name + ".bias"
    w = P.get(wk, W[wk])
    b = P.get(bk, W[bk])
    y = x @ w.t() + b
    a = P.get(name + ".lora_a")
    if a is not None:
        bb = P[name + ".lora_b"]
        if a.dim() == 3:  # per-head A (in, H, r), B (r, DH): KerasHub EinsumDense
            z = torch.einsum("...i,ihr->...hr", x, a)
            y = y + lora_scale * torch.einsum("...hr,ro->...ho", z, bb).reshape(*x.shape[:-1], -1)
        else:
            y = y + lora_scale * (x @ a) @ bb
    return y


def forward(P, W, ids, mask, cfg):
    """ids, mask: [b, T]. Returns logits [b, 2]."""
    T = ids.shape[1]
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:T][None]
    x = x + W["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    bias = (1.0 - mask[:, None, None, :].float()) * -1e9
    ls = cfg.get("lora_alpha", cfg["lora_rank"]) / max(1, cfg["lora_rank"])
    for i in range(NL):
        p = f"encoder.layer.{i}."
        g = lambda n: P.get(p + n, W[p + n])
        q = lin(x, W, p + "attention.self.query", P, ls).view(x.shape[0], T, H, DH).transpose(1, 2)
        k = lin(x, W, p + "attention.self.key", P, ls).view(x.shape[0], T, H, DH).transpose(1, 2)
        v = lin(x, W, p + "attention.self.value", P, ls).view(x.shape[0], T, H, DH).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DH) + bias, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(x.shape[0], T, D)
        a = lin(a, W, p + "attention.output.dense", P, ls)
        x = ln(x + a, g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias"))
        h = torch.nn.functional.gelu(lin(x, W, p + "intermediate.dense", P, ls))
        h = lin(h, W, p + "output.dense", P, ls)
        x = ln(x + h, g("output.LayerNorm.weight"), g("output.LayerNorm.bias"))
    m = mask[..., None].float()
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
    if cfg.get("normalize"):
        pooled = cfg.get("norm_scale", 1.0) * pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return pooled @ P["head.w"] + P["head.b"]


TARGETS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "i": "intermediate.dense",
    "f": "output.dense",
}


def init_params(W, cfg, gen):
    P = {}
    r = cfg["lora_rank"]
    full = cfg.get("full", False)
    for i in range(NL):
        p = f"encoder.layer.{i}."
        if full:
            for n in list(TARGETS.values()):
                P[p + n + ".weight"] = W[p + n + ".weight"].clone()
                P[p + n + ".bias"] = W[p + n + ".bias"].clone()
            for n in ("attention.output.LayerNorm", "output.LayerNorm"):
                P[p + n + ".weight"] = W[p + n + ".weight"].clone()
                P[p + n + ".bias"] = W[p + n + ".bias"].clone()
            continue
        if not r:
            continue
        for t in cfg.get("lora_targets", "qv"):
            n = p + TARGETS[t]
            out_dim, in_dim = W[n + ".weight"].shape
            if t in "qkv" and not cfg.get("std_lora"):
                lim = math.sqrt(6.0 / (H * in_dim))
                P[n + ".lora_a"] = (torch.rand(in_dim, H, r, generator=gen, device=DEV) * 2 - 1) * lim
                P[n + ".lora_b"] = torch.zeros(r, DH, device=DEV)
            else:
                fan_in = in_dim
                lim = math.sqrt(6.0 / fan_in)
                P[n + ".lora_a"] = (torch.rand(in_dim, r, generator=gen, device=DEV) * 2 - 1) * lim
                P[n + ".lora_b"] = torch.zeros(r, out_dim, device=DEV)
            if not cfg.get("freeze_bias"):
                P[n + ".bias"] = W[n + ".bias"].clone()
    hw = torch.nn.init.trunc_normal_(torch.empty(D, 2, device=DEV), std=0.02, a=-0.04, b=0.04, generator=gen)
    if cfg.get("head_init") == "zero":
        hw = torch.zeros(D, 2, device=DEV)
    P["head.w"] = hw
    P["head.b"] = torch.zeros(2, device=DEV)
    frozen_a = cfg.get("freeze_a", False)
    train = {k: v for k, v in P.items() if not (frozen_a and k.endswith("lora_a"))}
    fixed = {k: v for k, v in P.items() if k not in train}
    return train, fixed


def ce(logits, y):
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def evaluate(P, W, data, cfg, split="dev"):
    ids, lens, y = data[split + "_ids"], data[split + "_len"], data[split + "_y"]
    order = np.argsort(lens)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(order), 512):
            idx = order[s : s + 512]
            T = int(lens[idx].max())
            x = torch.tensor(ids[idx, :T].astype(np.int64), device=DEV)
            m = x != 0
            lg = forward(P, W, x, m, cfg)
            yy = torch.tensor(y[idx].astype(np.int64), device=DEV)
            correct += int((lg.argmax(-1) == yy).sum())
            loss += float(ce(lg, yy).sum())
    return correct / len(order), loss / len(order)


def per_example_clipped_sum(P, W, fixed, x, m, yy, cfg, C):
    def f(p, xi, mi, yi):
        lg = forward({**p, **fixed}, W, xi[None], mi[None], cfg)
        return ce(lg, yi[None])[0]

    g = vmap(grad(f), in_dims=(None, 0, 0, 0))(P, x, m, yy)
    keys = list(g)
    head = [k for k in keys if k.startswith("head.")]
    sq = {k: g[k].reshape(g[k].shape[0], -1).pow(2).sum(1) for k in keys}
    norm = torch.sqrt(sum(sq.values()))
    mode = cfg.get("clip_mode", "clip")
    if cfg.get("head_share"):
        s = cfg["head_share"]
        nh = torch.sqrt(sum(sq[k] for k in head))
        nr = torch.sqrt(sum(sq[k] for k in keys if k not in head))
        fh = torch.clamp(C * math.sqrt(s) / nh.clamp(min=1e-12), max=1.0)
        fr = torch.clamp(C * math.sqrt(1 - s) / nr.clamp(min=1e-12), max=1.0)
        fac = {k: (fh if k in head else fr) for k in keys}
    else:
        if mode == "normalize":
            f1 = C / (norm + cfg.get("norm_gamma", 0.01))
        else:
            f1 = torch.clamp(C / norm.clamp(min=1e-12), max=1.0)
        fac = {k: f1 for k in keys}
    out = {k: torch.tensordot(fac[k], g[k], dims=([0], [0])) for k in keys}
    return out, norm


def adam_update(P, G, state, t, cfg, phi):
    lr = cfg["lr"]
    wu = cfg.get("warmup", 0)
    if wu:
        lr = lr * min(1.0, t / wu)
    if cfg.get("schedule") == "linear":
        lr = lr * max(0.0, 1 - (t - 1) / cfg["_T"])
    b1, b2, eps = 0.9, cfg.get("beta2", 0.999), cfg.get("eps", 1e-7)
    if cfg.get("opt") == "sgdm":
        for k in P:
            if k not in state:
                state[k] = torch.zeros_like(P[k])
            state[k].mul_(0.9).add_(G[k])
            lrk = lr * cfg.get("head_lr_mult", 1.0) if k.startswith("head.") else lr
            P[k] = P[k] - lrk * state[k]
        return
    for k in P:
        if k not in state:
            state[k] = (torch.zeros_like(P[k]), torch.zeros_like(P[k]))
        m, v = state[k]
        m.mul_(b1).add_(G[k], alpha=1 - b1)
        v.mul_(b2).addcmul_(G[k], G[k], value=1 - b2)
        mh = m / (1 - b1**t)
        vh = v / (1 - b2**t)
        if cfg.get("adambc"):
            den = torch.sqrt(torch.clamp(vh - phi, min=cfg.get("bc_gamma", 0.1) * phi))
        else:
            den = vh.sqrt() + eps
        lrk = lr * cfg.get("head_lr_mult", 1.0) if k.startswith("head.") else lr
        P[k] = P[k] - lrk * mh / den


def run(cfg, W, data):
    t0 = time.time()
    seed = cfg.get("seed", 0)
    torch.manual_seed(seed + 777)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    rng = np.random.default_rng(seed + 12345)
    P, fixed = init_params(W, cfg, gen)
    ntrain = sum(v.numel() for v in P.values())
    ids, lens, y = data["train_ids"], data["train_len"], data["train_y"]
    N = len(y)
    B, E = cfg["B"], cfg["E"]
    q = B / N
    spe = max(1, int(math.floor(1.0 / q + 1e-9)))
    T = int(math.ceil(E * spe - 1e-9))
    cfg["_T"] = T
    dp = not cfg.get("no_dp", False)
    sigma, C = cfg.get("sigma", 0.0), cfg.get("C", 1.0)
    phi = (sigma * C / B) ** 2
    state = {}
    chunk = cfg.get("chunk", 512)
    losses, norms_log = [], []
    perm = None
    for t in range(1, T + 1):
        if dp:
            idx = np.nonzero(rng.random(N) < q)[0]
        else:
            if perm is None or len(perm) < B:
                perm = rng.permutation(N)
            idx, perm = perm[:B], perm[B:]
        idx = idx[np.argsort(lens[idx])]
        G = {k: torch.zeros_like(v) for k, v in P.items()}
        tl = 0.0
        for s in range(0, len(idx), chunk):
            c = idx[s : s + chunk]
            Tm = int(lens[c].max())
            x = torch.tensor(ids[c, :Tm].astype(np.int64), device=DEV)
            m = x != 0
            yy = torch.tensor(y[c].astype(np.int64), device=DEV)
            if dp:
                gs, nrm = per_example_clipped_sum(P, W, fixed, x, m, yy, cfg, C)
                for k in G:
                    G[k] += gs[k]
                if t in (1, T):
                    norms_log.append(float(nrm.median()))
            else:
                Pg = {k: v.detach().requires_grad_(True) for k, v in P.items()}
                lg = forward({**Pg, **fixed}, W, x, m, cfg)
                lo = ce(lg, yy).sum()
                gr = torch.autograd.grad(lo, list(Pg.values()))
                for k, gk in zip(Pg, gr):
                    G[k] += gk
                tl += float(lo.detach())
        if dp:
            for k in G:
                G[k] = (G[k] + sigma * C * torch.randn(G[k].shape, device=DEV)) / B
        else:
            for k in G:
                G[k] = G[k] / len(idx)
        adam_update(P, G, state, t, cfg, phi)
        if t % spe == 0 or t == T:
            tr_acc, tr_loss = evaluate(
                {**P, **fixed}, W, {"x_ids": ids[:4000], "x_len": lens[:4000], "x_y": y[:4000]}, cfg, "x"
            )
            losses.append(round(tr_loss, 4))
    acc, dl = evaluate({**P, **fixed}, W, data, cfg)
    res = dict(cfg)
    res.update(
        acc=round(acc, 4),
        dev_loss=round(dl, 4),
        steps=T,
        trainable=ntrain,
        secs=round(time.time() - t0, 1),
        train_loss_by_epoch=losses,
        median_norms=[round(v, 3) for v in norms_log[:1] + norms_log[-1:]],
    )
    return res


def main():
    cfgs = json.load(open(sys.argv[1]))
    outp = sys.argv[2]
    W, data = load()
    # Fidelity check: frozen masked-mean embeddings vs the TF backbone's.
    ref = data["ref_mean"]
    x = torch.tensor(data["dev_ids"][:4].astype(np.int64), device=DEV)
    m = x != 0
    cfg0 = {"lora_rank": 0}
    with torch.no_grad():
        P0 = {"head.w": torch.eye(D, device=DEV), "head.b": torch.zeros(D, device=DEV)}
        emb = forward(P0, W, x, m, cfg0).cpu().numpy()
    print("fidelity max|diff|", float(np.abs(emb - ref).max()), "ref max", float(np.abs(ref).max()), flush=True)
    budget = float(sys.argv[3]) if len(sys.argv) > 3 else 1e9
    t_start = time.time()
    with open(outp, "a") as f:
        for cfg in cfgs:
            if time.time() - t_start > budget:
                print("budget reached; skipping", cfg.get("name"), flush=True)
                continue
            r = run(cfg, W, data)
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
