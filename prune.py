"""
Find each task's circuit in a weight-sparse GPT (Gao et al. 2025, sections 3, 5 and 6): train one
mask per node with everything masked off mean-ablated, keep the fewest nodes that still reach the
target task loss, check the circuit, and write it out as JSON, a readable listing and an SVG.
Read top to bottom: task data -> node means -> masks -> training the masks -> discretizing ->
checks -> edges -> writers -> main.

    python prune.py                                  # every task the model solves (acc >= 90%)
    python prune.py --tasks=single_double_quote,bracket_counting
    python prune.py --ckpt=out/A/ckpt.pt --compare=out/B/ckpt.pt   # edge ratio B/A per task
"""

import hashlib
import html
import json
import math
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import sparse_gpt
import tasks

DEFAULTS = dict(
    ckpt="out/ckpt.pt",  # circuits go to circuits/ beside it
    tasks="",  # comma-separated names; empty = every task the model solves at >= solved_acc
    compare="",  # a second checkpoint: prune both on the same tasks, print the edge ratio B/A
    solved_acc=0.9,  # accuracy (train pairs) at which a task counts as solved
    target_loss=0.15,  # task loss (nats) the circuit must reach on the train pairs (paper 5)
    k_coef="1e-3,1e-2",  # penalty per kept node; one mask run per value, smallest circuit wins
    heaviside_temp=1.0,  # temperature of the sigmoid whose derivative is the mask's gradient
    lr=3e-2,  # the paper's 3e-3 assumes thousands of steps; ours are few (see README)
    steps=100,  # mask-training steps per k_coef
    n_pairs=64,  # train pairs and test pairs per task (paper: a batch of 64 datapoints)
    batch_pairs=16,  # pairs per mask-training step
    mean_batches=20,  # val.bin batches (of the checkpoint's batch_size x block_size) for means
    seed=0,
    device="auto",
)
LOG_EVERY = 25  # mask-training steps between progress lines


# -----------------------------------------------------------------------------
# task data: tokenized once, reused by every forward of the mask training


def encode_pairs(tokenizer, pairs, block_size: int, device) -> dict:
    """Rows 2i / 2i+1 are prompt_a / prompt_b of pair i, right-padded (invisible to a causal model
    at the positions we read), exactly as tasks.answer_logits tokenizes them. sign is +1 where
    token_a is the right answer, -1 where token_b is."""
    rows, tok_a, tok_b = [], [], []
    for p in pairs:
        a, b = tasks.answer_id(tokenizer, p.token_a), tasks.answer_id(tokenizer, p.token_b)
        rows += [tokenizer.encode_ordinary(p.prompt_a)[-block_size:],
                 tokenizer.encode_ordinary(p.prompt_b)[-block_size:]]
        tok_a += [a, a]
        tok_b += [b, b]
    idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row)
    data = dict(idx=idx, last=torch.tensor([len(r) - 1 for r in rows]), tok_a=torch.tensor(tok_a),
                tok_b=torch.tensor(tok_b), sign=torch.tensor([1.0, -1.0] * len(pairs)))
    return {k: v.to(device) for k, v in data.items()}


def subset(data: dict, rows) -> dict:
    """Some rows of the task data, padding trimmed to their longest prompt."""
    out = {k: v[rows] for k, v in data.items()}
    out["idx"] = out["idx"][:, : int(out["last"].max()) + 1]
    return out


def answer_diff(model, data: dict) -> torch.Tensor:
    """logit(token_a) - logit(token_b) at the last position of every prompt. GPT.forward, except
    that only the answer position is unembedded, and only for the two answers: the full
    vocabulary at every position would cost a third of each mask-training step."""
    rows = torch.arange(len(data["last"]), device=data["idx"].device)
    x = model.wte(data["idx"])
    for block in model.blocks:
        x = block(x)
    h = model.final_in(model.final_norm(x[rows, data["last"]][:, None]))[:, 0]
    w = model.lm_head.weight
    z = (h * (w[data["tok_a"]] - w[data["tok_b"]])).sum(-1)
    if model.bigram is not None:
        table, now = model.bigram.weight, data["idx"][rows, data["last"]]
        z = z + table[now, data["tok_a"]] - table[now, data["tok_b"]]
    return z


def pair_loss(z, data: dict, scale=1.0, shift=0.0) -> tuple[torch.Tensor, float]:
    """Cross-entropy over the two answers and accuracy, as tasks.score computes them; scale and
    shift calibrate the logit difference (a shift favours token_a, never 'the right answer')."""
    margin = data["sign"] * (scale * z + shift)
    return F.softplus(-margin).mean(), (margin > 0).float().mean().item()


# -----------------------------------------------------------------------------
# node means: every node location's per-channel mean over the pretraining distribution


def node_spans(model) -> dict[str, tuple[int, int]]:
    """Each node location's slice of the flat vector of all nodes, in forward order."""
    spans, start = {}, 0
    for node in model.nodes():
        spans[node.name] = (start, start + node.width)
        start += node.width
    return spans


def node_names(model) -> list[str]:
    """Paper-style names: 0.mlp.post_act.460, 1.attn.q.head3.ch1, final.resid_in.12."""
    d_head, names = model.cfg.d_head, []
    for node in model.nodes():
        if node.name.split(".")[-1] in ("q", "k", "v"):
            names += [f"{node.name}.head{i // d_head}.ch{i % d_head}" for i in range(node.width)]
        else:
            names += [f"{node.name}.{i}" for i in range(node.width)]
    return names


@torch.no_grad()
def compute_means(model, tokens: np.ndarray, n_batches: int, batch_size: int, seed=0) -> torch.Tensor:
    """Mean of every node (after AbsTopK, as the hook sees it) over all positions of n_batches
    random windows of the token array."""
    spans, device = node_spans(model), next(model.parameters()).device
    sums = torch.zeros(max(b for _, b in spans.values()), dtype=torch.float64, device=device)

    def accumulate(name, x):
        a, b = spans[name]
        sums[a:b] += x.double().sum(dim=(0, 1))
        return x

    gen = torch.Generator().manual_seed(seed)
    with hooked(model, accumulate):
        for _ in range(n_batches):
            x, _ = sparse_gpt.get_batch(tokens, model.cfg.block_size, batch_size, gen, device)
            model(x)
    return (sums / (n_batches * batch_size * model.cfg.block_size)).float()


def load_means(model, cfg_model, ckpt_path: str, n_batches: int, device) -> torch.Tensor:
    """Node means, cached beside the checkpoint as node_means.pt and keyed to its bytes."""
    with open(ckpt_path, "rb") as f:
        key = f"{hashlib.sha1(f.read()).hexdigest()}|{n_batches}"
    path = os.path.join(os.path.dirname(ckpt_path) or ".", "node_means.pt")
    if os.path.exists(path):
        cached = torch.load(path, map_location=device)
        if cached.get("key") == key:
            return cached["means"]
    val_path = os.path.join(cfg_model.data_path, "val.bin")
    if not os.path.exists(val_path):
        sys.exit(f"error: {val_path} (the checkpoint's validation tokens) not found; node means "
                 "need it: run from the folder the model was trained in")
    t0 = time.time()
    tokens = np.memmap(val_path, dtype=np.uint16, mode="r")
    means = compute_means(model, tokens, n_batches, cfg_model.batch_size)
    torch.save({"key": key, "means": means}, path)
    print(f"node means: {len(means)} nodes over {n_batches * cfg_model.batch_size * cfg_model.block_size:,} "
          f"val tokens in {time.time() - t0:.1f}s, cached in {path}")
    return means


# -----------------------------------------------------------------------------
# masks: a kept node passes through, a pruned one is frozen at its mean (paper 5)


@contextmanager
def hooked(model, fn):
    for node in model.nodes():
        node.hook = fn
    try:
        yield
    finally:
        for node in model.nodes():
            node.hook = None


def ablated(model, means: torch.Tensor, keep: torch.Tensor, record: dict | None = None):
    """Runs the model with node i kept where keep[..., i] is 1 and mean-ablated where it is 0.
    keep may carry a gradient, and a leading batch dimension (B, 1, N) for per-prompt gates.
    lerp is exact at 0 and 1, so keeping every node reproduces the model bit for bit."""
    spans = node_spans(model)

    def gate(name, x):
        a, b = spans[name]
        x = torch.lerp(means[a:b].expand_as(x), x, keep[..., a:b].expand_as(x))
        if record is not None:
            record[name] = x.detach()
        return x

    return hooked(model, gate)


class HeavisideSTE(torch.autograd.Function):
    """Forward: the Heaviside step H(tau). Backward: the derivative of sigmoid(tau / temp), a
    straight-through surrogate (paper 5)."""

    @staticmethod
    def forward(ctx, tau, temp: float):
        ctx.save_for_backward(tau)
        ctx.temp = temp
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temp)
        return grad * s * (1 - s) / ctx.temp, None


def top_k_mask(order: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(len(order), device=order.device)
    keep[order[:k]] = 1.0
    return keep


# -----------------------------------------------------------------------------
# training the masks: task loss + k_coef * (number of kept nodes)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 5% of steps, then linear decay to zero (paper 5)."""
    warm = max(1, round(0.05 * steps))
    return lr * ((step + 1) / warm if step < warm else (steps - step) / max(1, steps - warm))


def train_masks(model, means, train: dict, k_coef: float, cfg, log=print) -> torch.Tensor:
    """Returns tau, one real parameter per node; the node is kept where tau > 0."""
    gen = torch.Generator().manual_seed(cfg.seed)
    # every node starts kept: a bias of 0.1 plus noise of 0.01 breaks ties (paper 5)
    tau = (0.1 + 0.01 * torch.randn(len(means), generator=gen)).to(means.device).requires_grad_()
    opt = torch.optim.AdamW([tau], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=1e-3)
    n_rows, t0 = len(train["last"]), time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr)
        batch = subset(train, torch.randperm(n_rows, generator=gen)[: 2 * cfg.batch_pairs])
        keep = HeavisideSTE.apply(tau, cfg.heaviside_temp)
        with ablated(model, means, keep):
            task, _ = pair_loss(answer_diff(model, batch), batch)
        (task + k_coef * keep.sum()).backward()
        torch.nn.utils.clip_grad_norm_([tau], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            tau.clamp_(-1, 1)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps:
            left = (time.time() - t0) / (step + 1) * (cfg.steps - step - 1)
            log(f"  k_coef {k_coef:g} step {step + 1}/{cfg.steps} | task loss {task.item():.3f} | "
                f"kept {int(keep.sum())} | lr {group['lr']:.1e} | {left:.0f}s left")
    return tau.detach()


# -----------------------------------------------------------------------------
# discretizing: the fewest nodes, in order of preference, that reach the target loss


@torch.no_grad()
def diff_with(model, means, keep, data: dict, chunk=64) -> torch.Tensor:
    """answer_diff with the nodes outside keep mean-ablated, in chunks of prompts."""
    with ablated(model, means, keep):
        return torch.cat([answer_diff(model, subset(data, slice(i, i + chunk)))
                          for i in range(0, len(data["last"]), chunk)])


def smallest_circuit(model, means, data, order, target: float, start: int) -> int | None:
    """The smallest k whose first k nodes of `order` reach the target loss on `data`, or None.
    Gallops up from `start` (the masks' own choice of size) by doubling, then bisects between
    the last size that failed and the first that passed: bisection assumes the loss falls as k
    grows, which holds near a good ordering's answer but not everywhere."""
    def passes(k):
        return pair_loss(diff_with(model, means, top_k_mask(order, k), data), data)[0].item() <= target

    lo, hi = -1, min(start, len(order))  # lo = -1: the empty circuit may pass (the bigram table)
    while not passes(hi):
        if hi == len(order):
            return None
        lo, hi = hi, min(2 * hi + 1, len(order))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def fit_calibration(z: torch.Tensor, data: dict) -> tuple[float, float]:
    """Scale and shift of the logit difference, 16 LBFGS steps (paper 5): pruned circuits are
    often right but badly calibrated."""
    params = torch.tensor([1.0, 0.0], device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = pair_loss(z, data, params[0], params[1])[0]
        loss.backward()
        return loss

    opt.step(closure)
    return params[0].item(), params[1].item()


# -----------------------------------------------------------------------------
# checks: sufficiency, necessity, a random set of the same size, the attribution baseline


def attribution_order(model, means, data: dict, chunk=32) -> torch.Tensor:
    """Nodes by |gradient x (activation - mean)| of the task loss, summed over prompts: the
    gradient of each prompt's loss with respect to a per-prompt gate at 1."""
    score = torch.zeros(len(means), device=means.device)
    for i in range(0, len(data["last"]), chunk):
        batch = subset(data, slice(i, i + chunk))
        keep = torch.ones(len(batch["last"]), 1, len(means), device=means.device, requires_grad=True)
        with ablated(model, means, keep):
            loss = F.softplus(-batch["sign"] * answer_diff(model, batch)).sum()
        (grad,) = torch.autograd.grad(loss, keep)
        score += grad.abs().sum(dim=(0, 1))
    return score.argsort(descending=True)


def run_checks(model, means, circuit: torch.Tensor, test: dict, calib, seed: int) -> dict:
    """Test-split loss and accuracy: the full model, the circuit alone (calibrated), the model
    without the circuit, and the model without a random node set of the same size."""
    n = len(means)
    random_set = top_k_mask(torch.randperm(n, generator=torch.Generator().manual_seed(seed)), int(circuit.sum()))
    runs = {"full": (torch.ones(n), (1.0, 0.0)), "sufficiency": (circuit, calib),
            "necessity": (1 - circuit, (1.0, 0.0)), "random_ablation": (1 - random_set, (1.0, 0.0))}
    out = {}
    for name, (keep, (scale, shift)) in runs.items():
        loss, acc = pair_loss(diff_with(model, means, keep.to(means.device), test), test, scale, shift)
        out[name] = {"loss": loss.item(), "acc": acc}
    return out


# -----------------------------------------------------------------------------
# edges: nonzero weights between two kept nodes inside a block (paper 3)


def weight_links(model) -> list[tuple[torch.Tensor, str, str]]:
    """(weight of shape (targets, sources), source location, target location) for every matrix
    between two node locations. Residual channels join a write to later reads of the same
    channel directly; they are drawn as lines, not counted as edges."""
    d, links = model.cfg.d_model, []
    for l, block in enumerate(model.blocks):
        w = block.attn.c_attn.weight
        links += [(w[i * d : (i + 1) * d], f"{l}.attn.resid_in", f"{l}.attn.{kind}")
                  for i, kind in enumerate("qkv")]
        links += [(block.attn.c_proj.weight, f"{l}.attn.v", f"{l}.attn.resid_delta"),  # y_i = sum of v_i
                  (block.mlp.c_fc.weight, f"{l}.mlp.resid_in", f"{l}.mlp.post_act"),
                  (block.mlp.c_proj.weight, f"{l}.mlp.post_act", f"{l}.mlp.resid_delta")]
    return links


@torch.no_grad()
def circuit_edges(model, keep: torch.Tensor) -> list[tuple[int, int, float]]:
    """(source node, target node, weight) for every nonzero weight between two kept nodes."""
    spans, keep, edges = node_spans(model), keep.cpu().bool(), []
    for w, src, dst in weight_links(model):
        (s0, s1), (d0, d1) = spans[src], spans[dst]
        live = (w.cpu() != 0) & keep[d0:d1, None] & keep[None, s0:s1]
        edges += [(s0 + j, d0 + i, w[i, j].item()) for i, j in live.nonzero().tolist()]
    return edges


@torch.no_grad()
def token_edges(model, keep: torch.Tensor, prompt_tokens, answer_tokens) -> tuple[int, list]:
    """Embedding edges (nonzero wte entries from the task's prompt tokens to a channel some kept
    read node reads) and unembedding edges (final read node -> answer token), reported apart."""
    spans, keep, d = node_spans(model), keep.cpu().bool(), model.cfg.d_model
    reads = [spans[n.name] for n in model.nodes() if n.name.endswith("resid_in")]
    channels = torch.stack([keep[a:b] for a, b in reads]).any(0)
    n_embed = int((model.wte.weight.cpu()[prompt_tokens][:, channels] != 0).sum())
    a = spans["final.resid_in"][0]
    unembed = [(a + c, tok, model.lm_head.weight[tok, c].item()) for tok in answer_tokens
               for c in range(d) if keep[a + c] and model.lm_head.weight[tok, c] != 0]
    return n_embed, unembed


# -----------------------------------------------------------------------------
# what each kept node responds to, for the listing


@torch.no_grad()
def node_profiles(model, means, keep, data: dict, tokenizer, names, n_top=3) -> dict[int, dict]:
    """For each kept node: mean activation at the answer position on prompt_a vs prompt_b, and
    the tokens (anywhere in the prompts) where it is largest in magnitude."""
    record, spans = {}, node_spans(model)
    with ablated(model, means, keep, record):
        model(data["idx"])
    rows = torch.arange(len(data["last"]))
    pad = torch.arange(data["idx"].shape[1])[None] > data["last"][:, None].cpu()
    out = {}
    for loc, (a, b) in spans.items():
        for i in keep[a:b].nonzero()[:, 0].tolist():
            acts = record[loc][..., i].cpu().masked_fill(pad, 0.0)
            at_answer = acts[rows, data["last"].cpu()]
            top, seen = [], set()
            for flat in acts.abs().flatten().argsort(descending=True).tolist():
                tok = int(data["idx"].view(-1)[flat])
                if tok not in seen:
                    seen.add(tok)
                    top.append((tokenizer.decode([tok]), acts.view(-1)[flat].item()))
                if len(top) == n_top:
                    break
            out[a + i] = {"mean_a": at_answer[0::2].mean().item(), "mean_b": at_answer[1::2].mean().item(),
                          "top_tokens": top}
    return out


# -----------------------------------------------------------------------------
# writers: <task>.json, <task>.txt, <task>.svg in circuits/ beside the checkpoint


def location(name: str) -> str:
    """'1.attn.q.head3.ch1' -> '1.attn.q', '0.mlp.post_act.460' -> '0.mlp.post_act'."""
    parts = name.split(".")
    return ".".join(parts[:3] if parts[2] in ("q", "k", "v") else parts[:-1])


def write_json(path: str, result: dict):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def write_txt(path: str, result: dict):
    c, checks = result["circuit"], result["checks"]
    lines = [f"{result['task']}: {c['n_nodes']} nodes, {c['n_edges']} edges "
             f"(+{c['n_embed_edges']} embedding, {len(c['unembed_edges'])} unembedding edges)",
             f"checkpoint {result['ckpt']} | k_coef {result['k_coef']} | target loss {result['target_loss']}",
             "test split: " + " | ".join(f"{k} loss {v['loss']:.3f} acc {v['acc']:.1%}" for k, v in checks.items()),
             f"attribution baseline: {result['attribution']['n_nodes']} nodes, "
             f"{result['attribution']['n_edges']} edges", ""]
    into, out_of = {}, {}
    for src, dst, w in c["edges"] + [(s, f"logit {t!r}", w) for s, t, w in c["unembed_edges"]]:
        into.setdefault(dst, []).append(f"{src} ({w:+.3f})")
        out_of.setdefault(src, []).append(f"{dst} ({w:+.3f})")
    current = None
    for name in c["nodes"]:
        if location(name) != current:
            current = location(name)
            lines.append(f"[{current}]")
        p = c["profiles"][name]
        tops = ", ".join(f"{tok!r} {v:+.2f}" for tok, v in p["top_tokens"])
        lines.append(f"  {name}   at answer: a {p['mean_a']:+.3f}  b {p['mean_b']:+.3f}   most active on: {tops}")
        lines += [f"      <- {e}" for e in into.get(name, [])] + [f"      -> {e}" for e in out_of.get(name, [])]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


COL, ROW, BOX_W, BOX_H, LEFT, TOP = 84, 64, 72, 22, 200, 80  # SVG layout, in pixels
FILL = {"resid_in": "#dfe9fa", "resid_delta": "#fadddd", "q": "#dcf1df", "k": "#dcf1df",
        "v": "#dcf1df", "post_act": "#fff0c2", "logit": "#eeeeee"}


def row_of(name: str) -> str:
    """The SVG row of a node: its location, with q, k and v of a layer on one row."""
    if name.startswith("logit"):
        return "answer logits"
    loc = location(name)
    return loc[:-1] + "qkv" if loc[-2:] in (".q", ".k", ".v") else loc


def short_label(name: str) -> str:
    """The text in a box; the row label and the tooltip carry the rest of the name."""
    parts = name.split(".")
    if name.startswith("logit"):
        return name[6:]
    if parts[2] in ("q", "k", "v"):
        return f"{parts[2]} h{parts[3][4:]}.{parts[4][2:]}"
    return {"post_act": "n", "resid_in": "r", "resid_delta": "w"}[parts[-2]] + parts[-1]


def svg_layout(nodes: list[str], edges) -> tuple[list[str], dict, list[int]]:
    """Rows in forward order; each residual read/write sits on its channel's column; every
    other node as close as it can get to the mean column of its residual neighbours."""
    rows = list(dict.fromkeys(row_of(n) for n in nodes))
    channels = sorted({int(n.split(".")[-1]) for n in nodes if "resid" in n})
    pos = {n: (LEFT + COL * channels.index(int(n.split(".")[-1])), TOP + ROW * rows.index(row_of(n)))
           for n in nodes if "resid" in n}
    near = {}
    for s, d, _ in edges:
        near.setdefault(s, []).append(d)
        near.setdefault(d, []).append(s)
    for r, row in enumerate(rows):
        free = [n for n in nodes if row_of(n) == row and n not in pos]
        want = {n: np.mean([pos[m][0] for m in near.get(n, []) if m in pos] or [LEFT]) for n in free}
        x = -math.inf
        for n in sorted(free, key=want.get):
            x = max(want[n], x + COL)
            pos[n] = (x, TOP + ROW * r)
    return rows, pos, channels


def write_svg(path: str, result: dict):
    """In the style of the paper's figures, written as SVG text: layers top to bottom, residual
    channels as vertical grey lines, nodes as labelled boxes, edges blue (+) / red (-) with width
    by magnitude, the answer logits at the bottom. Hover a box or edge for its full name."""
    c = result["circuit"]
    edges = c["edges"] + [(s, f"logit {t!r}", w) for s, t, w in c["unembed_edges"]]
    nodes = c["nodes"] + sorted({d for _, d, _ in edges if d.startswith("logit")})
    rows, pos, channels = svg_layout(nodes, edges)
    width, height = max(x for x, _ in pos.values()) + BOX_W + 30, TOP + ROW * len(rows)
    checks = result["checks"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{html.escape(result["task"])}: '
           f'{c["n_nodes"]} nodes, {c["n_edges"]} edges</text>',
           f'<text x="10" y="38" fill="#555">circuit alone: test loss {checks["sufficiency"]["loss"]:.3f}, '
           f'acc {checks["sufficiency"]["acc"]:.0%}; without it: acc {checks["necessity"]["acc"]:.0%}. '
           'r/w = residual read/write, n = neuron, blue/red = positive/negative weight</text>']
    out += [f'<text x="10" y="{TOP + ROW * r + 4}" fill="#333">{html.escape(row)}</text>'
            for r, row in enumerate(rows)]
    for i, ch in enumerate(channels):
        ys = [y for n, (_, y) in pos.items() if "resid" in n and int(n.split(".")[-1]) == ch]
        x = LEFT + COL * i
        out.append(f'<line x1="{x}" y1="{min(ys) - 16}" x2="{x}" y2="{max(ys) + 16}" stroke="#c8c8c8" '
                   f'stroke-width="4"/><text x="{x}" y="{min(ys) - 20}" text-anchor="middle" '
                   f'fill="#999">ch {ch}</text>')
    top_w = max([abs(w) for *_, w in edges] or [1.0])
    for s, d, w in edges:
        (x1, y1), (x2, y2) = pos[s], pos[d]
        out.append(f'<line x1="{x1:.0f}" y1="{y1 + BOX_H / 2}" x2="{x2:.0f}" y2="{y2 - BOX_H / 2}" '
                   f'stroke="{"#2b6cb0" if w > 0 else "#c53030"}" stroke-opacity="0.75" '
                   f'stroke-width="{0.8 + 4 * abs(w) / top_w:.1f}"><title>'
                   f'{html.escape(f"{s} -> {d}: {w:+.3f}")}</title></line>')
    for n, (x, y) in pos.items():
        kind = "logit" if n.startswith("logit") else location(n).split(".")[-1]
        out.append(f'<g><title>{html.escape(n)}</title><rect x="{x - BOX_W / 2:.0f}" y="{y - BOX_H / 2}" '
                   f'width="{BOX_W}" height="{BOX_H}" rx="4" fill="{FILL[kind]}" stroke="#444"/>'
                   f'<text x="{x:.0f}" y="{y + 4}" text-anchor="middle">{html.escape(short_label(n))}</text></g>')
    with open(path, "w") as f:
        f.write("\n".join(out + ["</svg>"]) + "\n")


# -----------------------------------------------------------------------------
# main: pick the tasks, prune each on every checkpoint, write, summarise


def find_circuit(model, means, train: dict, cfg, log=print) -> tuple[torch.Tensor | None, list]:
    """One mask run per k_coef, each discretized by bisection; the circuit with the fewest edges
    (then nodes) that reaches the target wins. Returns (0/1 keep vector or None, the sweep)."""
    best, sweep = None, []
    for k_coef in (float(k) for k in str(cfg.k_coef).split(",")):
        tau = train_masks(model, means, train, k_coef, cfg, log)
        order = tau.argsort(descending=True)
        k = smallest_circuit(model, means, train, order, cfg.target_loss, int((tau > 0).sum()))
        n_edges = len(circuit_edges(model, top_k_mask(order, k))) if k else None
        sweep.append({"k_coef": k_coef, "masks_kept": int((tau > 0).sum()), "n_nodes": k, "n_edges": n_edges})
        log(f"  k_coef {k_coef:g}: " + (f"{k} nodes, {n_edges} edges reach the target" if k else
                                         "no node set reaches the target loss"))
        if k and (best is None or (n_edges, k) < best[0]):
            best = ((n_edges, k), top_k_mask(order, k))
    return (best[1] if best else None), sweep


def describe(model, tokenizer, means, keep, train, test, cfg) -> dict:
    """Calibration, checks, edges, node profiles and the attribution baseline of one circuit."""
    names = node_names(model)
    calib = fit_calibration(diff_with(model, means, keep, train), train)
    attr_order = attribution_order(model, means, train)
    k_attr = smallest_circuit(model, means, train, attr_order, cfg.target_loss, 1)
    attr_edges = len(circuit_edges(model, top_k_mask(attr_order, k_attr))) if k_attr else None
    n_embed, unembed = token_edges(model, keep, test["idx"].unique().tolist(),
                                   torch.cat([test["tok_a"], test["tok_b"]]).unique().tolist())
    profiles = node_profiles(model, means, keep, test, tokenizer, names)
    return {"circuit": {
                "nodes": [names[i] for i in keep.nonzero()[:, 0].tolist()], "n_nodes": int(keep.sum()),
                "edges": [(names[s], names[d], w) for s, d, w in circuit_edges(model, keep)],
                "n_embed_edges": n_embed,
                "unembed_edges": [(names[s], tokenizer.decode([t]), w) for s, t, w in unembed],
                "profiles": {names[i]: p for i, p in profiles.items()}},
            "calibration": {"scale": calib[0], "shift": calib[1]},
            "checks": run_checks(model, means, keep, test, calib, cfg.seed),
            "attribution": {"n_nodes": k_attr, "n_edges": attr_edges}}


def prune_checkpoint(path: str, names: list[str], cfg) -> dict[str, dict]:
    """Prunes every task on one checkpoint; writes circuits/ beside it; returns task -> result."""
    device = sparse_gpt.pick_device(cfg.device)
    model, tokenizer, cfg_model = sparse_gpt.load_checkpoint(path, device)
    for p in model.parameters():
        p.requires_grad_(False)
    means = load_means(model, cfg_model, path, cfg.mean_batches, device)
    out_dir = os.path.join(os.path.dirname(path) or ".", "circuits")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name in names:
        t0 = time.time()
        print(f"{path}: pruning {name} ({len(means)} nodes)")
        data = {}
        for split in ("train", "test"):
            pairs = tasks.make_pairs(name, cfg.n_pairs, cfg.seed, split)
            tasks.check_pairs(tokenizer, name, pairs)
            data[split] = encode_pairs(tokenizer, pairs, model.cfg.block_size, device)
        keep, sweep = find_circuit(model, means, data["train"], cfg)
        result = {"task": name, "ckpt": path, "target_loss": cfg.target_loss, "sweep": sweep,
                  "config": dict(cfg)}
        if keep is None:
            print(f"{name}: no circuit reaches target loss {cfg.target_loss} (try a larger --target_loss)")
        else:
            result["k_coef"] = min((s for s in sweep if s["n_nodes"]), key=lambda s: (s["n_edges"], s["n_nodes"]))["k_coef"]
            result.update(describe(model, tokenizer, means, keep, data["train"], data["test"], cfg))
            c = result["circuit"]
            c["n_edges"] = len(c["edges"])
            base = os.path.join(out_dir, name)
            write_json(base + ".json", result)
            write_txt(base + ".txt", result)
            write_svg(base + ".svg", result)
            print(f"{name}: {c['n_nodes']} nodes, {c['n_edges']} edges in {time.time() - t0:.0f}s -> {base}.{{json,txt,svg}}")
        results[name] = result
    return results


def solved_tasks(path: str, cfg) -> list[str]:
    """The tasks this checkpoint answers with accuracy >= solved_acc on the train pairs."""
    model, tokenizer, _ = sparse_gpt.load_checkpoint(path, sparse_gpt.pick_device(cfg.device))
    solved = []
    for name in tasks.TASKS:
        try:
            (_, acc, _), = tasks.evaluate(model, tokenizer, [name], cfg.n_pairs, cfg.seed, "train").values()
        except ValueError as e:  # an answer that is not one token under this tokenizer
            print(f"skipping {name}: {e}")
            continue
        solved += [name] * (acc >= cfg.solved_acc)
    print(f"{path}: solves {len(solved)} of {len(tasks.TASKS)} tasks at accuracy >= {cfg.solved_acc:.0%}")
    return solved


def print_summary(results: dict[str, dict]):
    print(f"{'task':<28}{'nodes':>6}{'edges':>7}{'suff loss':>10}{'acc':>6}{'nec loss':>9}{'acc':>6}"
          f"{'rand loss':>10}{'attr edges':>11}")
    edges = []
    for name, r in results.items():
        if "circuit" not in r:
            print(f"{name:<28}  no circuit reaches the target loss")
            continue
        c, ch = r["circuit"], r["checks"]
        edges.append(c["n_edges"])
        print(f"{name:<28}{c['n_nodes']:>6}{c['n_edges']:>7}{ch['sufficiency']['loss']:>10.3f}"
              f"{ch['sufficiency']['acc']:>6.0%}{ch['necessity']['loss']:>9.3f}{ch['necessity']['acc']:>6.0%}"
              f"{ch['random_ablation']['loss']:>10.3f}{str(r['attribution']['n_edges'] or '-'):>11}")
    if edges:
        print(f"geometric mean of edges over {len(edges)} tasks: {geomean(edges):.1f}")


def geomean(xs) -> float:
    return math.exp(sum(math.log(max(x, 1)) for x in xs) / len(xs))


def main(argv=None):
    cfg = sparse_gpt.parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, presets=None)
    paths = [cfg.ckpt] + [cfg.compare] * bool(cfg.compare)
    for path in paths:
        sparse_gpt.read_checkpoint(path)  # a missing or broken file fails here, before any work
    if cfg.tasks:
        names = cfg.tasks.split(",")
        unknown = [t for t in names if t not in tasks.ALL]
        if unknown:
            sys.exit(f"error: unknown task '{unknown[0]}'; valid tasks: {' '.join(tasks.ALL)}")
    else:
        solved = [solved_tasks(path, cfg) for path in paths]
        names = [t for t in solved[0] if all(t in s for s in solved)]
        if not names:
            sys.exit(f"error: no task is solved at accuracy >= {cfg.solved_acc:.0%}; "
                     "choose some with --tasks=a,b or lower --solved_acc")
    runs = [prune_checkpoint(path, names, cfg) for path in paths]
    for path, results in zip(paths, runs):
        print(f"\nsummary for {path} (test split; target loss {cfg.target_loss} on train)")
        print_summary(results)
    if cfg.compare:
        print(f"\nedge ratio {cfg.compare} / {cfg.ckpt}")
        ratios = []
        for name in names:
            a, b = (r[name].get("circuit", {}).get("n_edges") for r in runs)
            if a and b:
                ratios.append(b / a)
            print(f"{name:<28}{a or '-':>8}{b or '-':>8}" + (f"{b / a:>8.2f}" if a and b else ""))
        if ratios:
            print(f"geometric mean of the ratio over {len(ratios)} tasks: {geomean(ratios):.2f}")


if __name__ == "__main__":
    main()
