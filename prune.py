"""
Find each task's circuit in a weight-sparse GPT (Gao et al. 2025, sections 3, 5 and 6): train one
mask per node with everything masked off mean-ablated, keep the fewest nodes that still reach the
target task loss, check the circuit, and write it out as JSON, a readable listing and an SVG.
Read top to bottom: task data -> node means -> masks -> training the masks -> discretizing ->
checks -> edges -> the search -> writers -> steering a dense model through a bridged one -> main.

    python prune.py                                  # every task the model solves (acc >= 90%)
    python prune.py --tasks=single_double_quote,bracket_counting
    python prune.py --ckpt=out/bridged/ckpt.pt --steer=True   # a bridged run: steer its dense model
"""

import html
import itertools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from contextlib import contextmanager
from statistics import geometric_mean, median_low

import numpy as np
import torch
import torch.nn.functional as F

import sparse_gpt
import tasks

DEFAULTS = dict(
    ckpt="out/ckpt.pt",  # circuits go to circuits/ beside it
    tasks="",  # comma-separated names; empty = every task the model solves at >= solved_acc
    solved_acc=tasks.SOLVED_ACC,  # accuracy (train pairs) at which a task counts as solved
    unsolved=False,  # prune a task the full model does not solve too (marked UNSOLVED)
    target_loss=0.15,  # task loss (nats) the circuit must reach on the train pairs (paper 5)
    k_coef=1e-4,  # penalty per kept node at the start (paper 5); then it follows the target
    heaviside_temp=1.0,  # temperature of the sigmoid whose derivative is the mask's gradient
    lr=1e-2,  # AdamW on the masks: beta2 0.95, weight decay 1e-3 (paper 5; its lr: 3e-3)
    steps=200,  # mask-training steps, each on all n_pairs train pairs (README: the search)
    n_pairs=64,  # train pairs and test pairs per task (paper: batches of 64 datapoints)
    control=True,  # also search the same prompts with shuffled answers (a circuit must beat it)
    mean_batches=20,  # val.bin batches (of the checkpoint's batch_size x block_size) for means
    data_dir="",  # a released model's means: this corpus (empty = the stdlib) in its tokenizer
    cache_dir="data",  # where that corpus's tokens are cached, keyed by corpus and tokenizer
    seed=0,  # mask initialisation, the shuffled-answer control, the random-set check
    seeds=2,  # searches from seeds seed, seed + 1, ...; the smallest circuit wins (README: why 2)
    steer=False,  # a bridged checkpoint: then steer its dense model through the circuit (A.4)
    steer_node="",  # steer this read alone, e.g. 1.attn.resid_in.37; empty = the circuit's there
    device="auto",  # auto | cpu | cuda | mps
)
RULES = dict(  # what each value must be (see sparse_gpt.RULES); tasks: see tasks.task_names
    ckpt=(lambda v, c: v != "", "a checkpoint file"), solved_acc=sparse_gpt.FRACTION,
    **dict.fromkeys(["k_coef", "target_loss", "heaviside_temp", "lr"], sparse_gpt.POSITIVE),
    steps=sparse_gpt.up_to(10**6), n_pairs=sparse_gpt.up_to(10**4), seeds=sparse_gpt.up_to(100),
    mean_batches=sparse_gpt.up_to(10**4), seed=sparse_gpt.SEED, device=sparse_gpt.DEVICE,
    steer_node=(lambda v, c: v == "" or re.fullmatch(r"\d+\.(attn|mlp)\.resid_in\.\d+", v),
                "empty or a residual read such as 1.attn.resid_in.37"))
LOG_EVERY = 100  # mask-training steps (or drop-pass nodes) between progress lines
MAX_SCALE = 4.0  # the calibration may scale the logit difference by at most this much
K_AIM = 0.5  # mask training aims k_coef at this fraction of the target loss (see train_masks)
K_RATE = 0.05  # k_coef moves by a factor e^K_RATE per mask step: up to e^10 over 200 steps
AT_BOUND = 0.95  # a scale above this fraction of MAX_SCALE is flagged: the signal is weak


# ---- task data: tokenized once, reused by every forward of the mask training


def real_positions(data: dict) -> torch.Tensor:
    """(prompts, positions) booleans: True on the prompts' own tokens, False on the padding."""
    positions = torch.arange(data["idx"].shape[1], device=data["idx"].device)
    return positions[None] <= data["last"][:, None]


def subset(data: dict, rows) -> dict:
    """Some rows of the task data, padding trimmed to their longest prompt."""
    out = {k: v[rows] for k, v in data.items()}
    out["idx"] = out["idx"][:, : int(out["last"].max()) + 1]
    return out


def answer_diff(model, data: dict) -> torch.Tensor:
    """logit(token_a) - logit(token_b) at each prompt's answer (GPT.answer_diff), in chunks of
    prompts of similar length: about 40% fewer padded positions than one batch."""
    chunks = data["last"].argsort().split(32)
    z = torch.cat([model.answer_diff(d["idx"], d["last"], d["tok_a"], d["tok_b"])
                   for d in (subset(data, rows) for rows in chunks)])
    return z[torch.cat(chunks).argsort()]  # back to the prompts' own order


def pair_loss(z, data: dict, scale=1.0, shift=0.0) -> tuple[torch.Tensor, float]:
    """tasks.score of the calibrated logit differences (a shift favours token_a, not the answer)."""
    return tasks.score(data["sign"] * (scale * z + shift))


# ---- node means: every node location's per-channel mean over the pretraining distribution


def node_spans(model) -> dict[str, tuple[int, int]]:
    """Each node location's slice of the flat vector of all nodes, in forward order."""
    ends = itertools.accumulate(node.width for node in model.nodes())
    return {node.name: (end - node.width, end) for node, end in zip(model.nodes(), ends)}


def node_names(model) -> list[str]:
    """Paper-style names: 0.mlp.post_act.460, 1.attn.q.head3.ch1, final.resid_in.12."""
    d = model.cfg.d_head
    return [f"{node.name}.head{i // d}.ch{i % d}" if node.name.split(".")[-1] in ("q", "k", "v")
            else f"{node.name}.{i}" for node in model.nodes() for i in range(node.width)]


@contextmanager
def hooked(model, fn):
    """Sets every node's hook to fn(name, x) -> x for the duration of a with block."""
    for node in model.nodes():
        node.hook = fn
    try:
        yield
    finally:
        for node in model.nodes():
            node.hook = None


@torch.no_grad()
def compute_means(model, tokens: np.ndarray, n_batches: int, batch_size: int) -> torch.Tensor:
    """Every node's mean (after AbsTopK, as the hook sees it) over n_batches random windows."""
    spans, device, t0 = node_spans(model), next(model.parameters()).device, time.time()
    sums = torch.zeros(max(b for _, b in spans.values()), dtype=torch.float64, device=device)

    def accumulate(name, x):
        a, b = spans[name]
        sums[a:b] += x.double().sum(dim=(0, 1))
        return x

    gen = torch.Generator().manual_seed(0)  # the same windows every time
    with hooked(model, accumulate):
        for _ in range(n_batches):
            x, _ = sparse_gpt.get_batch(tokens, model.cfg.block_size, batch_size, gen, device)
            model(x)
    n_tokens = n_batches * batch_size * model.cfg.block_size
    print(f"node means: {len(sums)} nodes over {n_tokens:,} val tokens in {time.time() - t0:.1f}s")
    return (sums / n_tokens).float()


def release_tokens(tokenizer, cfg) -> str:
    """A released model has no val.bin of ours: the val split in its tokenizer, cached (folder)."""
    root = os.path.abspath(cfg.data_dir or sparse_gpt.stdlib_dir())
    made_with = sorted(tokenizer._mergeable_ranks.items()), tokenizer._pat_str
    folder = sparse_gpt.cache_folder(cfg.cache_dir, root, *made_with)
    if not os.path.exists(os.path.join(folder, "val.bin")):
        _, val = sparse_gpt.read_corpus(root)
        os.makedirs(folder, exist_ok=True)
        n = sparse_gpt.write_tokens(os.path.join(folder, "val.bin"), val, tokenizer)
        print(f"data: {n:,} val tokens in {tokenizer.name}, cached in {folder}")
    return folder


# ---- masks: a kept node passes through, a pruned one is frozen at its mean (paper 5)


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
    """Forward: step H(tau); backward: sigmoid(tau / temp)'s slope (straight-through, paper 5)."""

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


def keep_first(order: torch.Tensor, k: int) -> torch.Tensor:
    """The 0/1 keep vector of the first k nodes of `order`."""
    keep = torch.zeros(len(order), device=order.device)
    keep[order[:k]] = 1.0
    return keep


# ---- training the masks: task loss + k_coef * (number of kept nodes)


def train_masks(model, means, train: dict, cfg) -> torch.Tensor:
    """Returns tau, one real parameter per node; the node is kept where tau > 0."""
    gen = torch.Generator().manual_seed(cfg.seed)
    # every node starts kept: a bias of 0.1 plus noise of 0.01 breaks ties (paper 5)
    tau = (0.1 + 0.01 * torch.randn(len(means), generator=gen)).to(means.device).requires_grad_()
    opt = torch.optim.AdamW([tau], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=1e-3)
    t0, k_coef = time.time(), cfg.k_coef
    # the paper's target, or a stricter one: masks that do not depend on a looser target let
    # search() reuse them at 0.15 (a looser target never gives a larger circuit)
    aim = K_AIM * min(cfg.target_loss, DEFAULTS["target_loss"])
    for step in range(cfg.steps):
        # warmup over the first 5% of steps, then linear decay to zero (paper 5)
        opt.param_groups[0]["lr"] = lr = cfg.lr * sparse_gpt.warmup_decay(step, cfg.steps, 0.05)
        keep = HeavisideSTE.apply(tau, cfg.heaviside_temp)
        with ablated(model, means, keep):  # every step sees all train pairs (paper: 64)
            task, _ = pair_loss(answer_diff(model, train), train)
        (task + k_coef * keep.sum()).backward()
        torch.nn.utils.clip_grad_norm_([tau], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            tau.clamp_(-1, 1)
        # The penalty follows the target: up while under the aim (nodes can still go), down above
        # it. A fixed k_coef balances at a size that depends on the model: on the quick start's,
        # 1e-4 kept 256 nodes and the circuit had 115 (README: the search).
        k_coef *= math.exp(K_RATE if task.item() < aim else -K_RATE)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps:
            left = (time.time() - t0) / (step + 1) * (cfg.steps - step - 1)
            print(f"  seed {cfg.seed} step {step + 1}/{cfg.steps} | task loss {task.item():.3f} | "
                  f"kept {int(keep.sum())} | k_coef {k_coef:.0e} | lr {lr:.1e} | {left:.0f}s left")
    return tau.detach()


# ---- discretizing: the fewest nodes, in order of preference, that reach the target loss


@torch.no_grad()
def diff_with(model, means, keep, data: dict) -> torch.Tensor:
    with ablated(model, means, keep):
        return answer_diff(model, data)


def circuit_loss(model, means, keep, data: dict) -> float:
    """The task loss of a node set on `data` after its own calibration (paper 5)."""
    z = diff_with(model, means, keep, data)
    return pair_loss(z, data, *fit_calibration(z, data))[0].item()


def smallest_circuit(model, means, data, order, target: float, start: int) -> int | None:
    """The smallest k whose first k nodes of `order` reach the target calibrated loss, or None.
    Doubles from `start` (the masks' own size), then bisects between the last fail and the first
    pass: bisection assumes the loss falls as k grows, true near a good ordering's answer."""
    def passes(k):
        return circuit_loss(model, means, keep_first(order, k), data) <= target

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
    """Scale and shift of the logit difference by 16 LBFGS steps (paper 5: pruned circuits are
    often right but badly calibrated). The scale stays in (0, MAX_SCALE): unbounded, any node set
    that merely separates the pairs would reach loss 0."""
    params = torch.zeros(2, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=16, line_search_fn="strong_wolfe")

    def scale_shift():  # the scale in (0, MAX_SCALE) by a sigmoid; zeros give (1, 0)
        return MAX_SCALE * torch.sigmoid(params[0] - math.log(MAX_SCALE - 1)), params[1]

    def closure():
        opt.zero_grad()
        loss = pair_loss(z.detach(), data, *scale_shift())[0]
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(v.item() for v in scale_shift())


# ---- checks: sufficiency, necessity, a random node set of the same size, the attribution baseline


def run_checks(model, means, circuit: torch.Tensor, test: dict, calib, seed: int) -> dict:
    """Test-split loss and accuracy with each node set below kept and every other node ablated."""
    every, as_is = torch.ones_like(circuit), (1.0, 0.0)
    perm = torch.randperm(len(circuit), generator=torch.Generator().manual_seed(seed))
    random_set = keep_first(perm.to(circuit.device), int(circuit.sum()))
    runs = {"full": (every, as_is), "sufficiency": (circuit, calib),
            "sufficiency_uncalibrated": (circuit, as_is), "necessity": (every - circuit, as_is),
            "random_ablation": (every - random_set, as_is),
            "empty_circuit": (0 * every, as_is)}  # what the bigram table and the means do alone
    scores = {name: pair_loss(diff_with(model, means, keep, test), test, *scale_shift)
              for name, (keep, scale_shift) in runs.items()}
    return {name: {"loss": loss.item(), "acc": acc} for name, (loss, acc) in scores.items()}


def attribution_order(model, means, data: dict, chunk=32) -> torch.Tensor:
    """Nodes by |gradient x (activation - mean)| of the task loss, summed over prompts: that is
    the gradient of each prompt's loss with respect to its own gate, held at 1."""
    score = torch.zeros_like(means)
    for i in range(0, len(data["last"]), chunk):
        batch = subset(data, slice(i, i + chunk))
        gates = torch.ones(len(batch["last"]), 1, len(means), device=means.device).requires_grad_()
        with ablated(model, means, gates):
            z = model.answer_diff(batch["idx"], batch["last"], batch["tok_a"], batch["tok_b"])
            loss = F.softplus(-batch["sign"] * z).sum()
        score += torch.autograd.grad(loss, gates)[0].abs().sum(dim=(0, 1))
    return score.argsort(descending=True)


# ---- edges: nonzero weights between two kept nodes inside a block (paper 3)


@torch.no_grad()
def circuit_edges(model, keep: torch.Tensor) -> list[tuple[int, int, float]]:
    """(source node, target node, weight) for every nonzero weight between two kept nodes of one
    block. A write reaching later reads of its residual channel is no edge (the SVG draws it)."""
    spans, keep, edges = node_spans(model), keep.cpu().bool(), []
    for l, block in enumerate(model.blocks):
        q, k, v = block.attn.c_attn.weight.chunk(3)  # rows: q, k, v channels
        # attention output channel i is a mixture of v channel i, so c_proj's columns are v nodes
        links = [(q, "attn.resid_in", "attn.q"), (k, "attn.resid_in", "attn.k"),
                 (v, "attn.resid_in", "attn.v"),
                 (block.attn.c_proj.weight, "attn.v", "attn.resid_delta"),
                 (block.mlp.c_fc.weight, "mlp.resid_in", "mlp.post_act"),
                 (block.mlp.c_proj.weight, "mlp.post_act", "mlp.resid_delta")]
        for w, src, dst in links:  # w: (targets, sources)
            (s0, s1), (d0, d1), w = spans[f"{l}.{src}"], spans[f"{l}.{dst}"], w.cpu()
            live = (w != 0) & keep[d0:d1, None] & keep[None, s0:s1]
            edges += [(s0 + j, d0 + i, w[i, j].item()) for i, j in live.nonzero().tolist()]
    return edges


@torch.no_grad()
def token_edges(model, keep: torch.Tensor, prompt_tokens, answer_tokens) -> tuple[int, list]:
    """Embedding edges (nonzero wte weights from the prompts' tokens to channels a kept node reads)
    and unembedding edges (final.resid_in node -> answer logit: (node, token, weight))."""
    spans, keep = node_spans(model), keep.cpu().bool()
    read = torch.stack([keep[a:b] for n, (a, b) in spans.items() if n.endswith("resid_in")]).any(0)
    n_embed = int((model.wte.weight.cpu()[prompt_tokens][:, read] != 0).sum())
    start, lm_head = spans["final.resid_in"][0], model.lm_head.weight.cpu()
    unembed = [(start + c, t, lm_head[t, c].item()) for c in keep[start:].nonzero()[:, 0].tolist()
               for t in answer_tokens if lm_head[t, c] != 0]
    return n_embed, unembed


# ---- the search: masks, then the fewest nodes that reach the target, then a control


def find_circuit(model, means, train: dict, cfg) -> tuple:
    """The search from cfg.seeds seeds (each draws its masks' init noise): (keep or None, info)."""
    taus = {s: train_masks(model, means, train, sparse_gpt.Config({**cfg, "seed": s}))
            for s in range(cfg.seed, cfg.seed + cfg.seeds)}
    keep, info = search(model, means, train, taus, cfg.target_loss)
    if keep is not None:
        z = diff_with(model, means, keep, train)  # one forward for both losses
        info.update(n_nodes=int(keep.sum()), n_edges=len(circuit_edges(model, keep)),
                    loss_raw=pair_loss(z, train)[0].item(),
                    loss_calibrated=pair_loss(z, train, *fit_calibration(z, train))[0].item())
        print(f"  circuit: {info['n_nodes']} nodes, {info['n_edges']} edges; train loss "
              f"{info['loss_calibrated']:.3f} calibrated, {info['loss_raw']:.3f} raw")
    return keep, info


def search(model, means, train: dict, taus: dict, target: float) -> tuple:
    """Each seed's circuit (the fewest nodes in order of tau that reach the target, then the drop
    pass); the smallest by edges wins. Above the paper's target, the circuit found at the paper's
    (which reaches this one too) is a candidate after its own drop pass: never a larger circuit."""
    names, found, info = node_names(model), {}, {}
    for s, tau in taus.items():
        order = tau.argsort(descending=True)
        k = smallest_circuit(model, means, train, order, target, int((tau > 0).sum()))
        found[s] = None if k is None else drop_pass(model, means, train, keep_first(order, k),
                                                   order, target)
        info[s] = {"masks_kept": int((tau > 0).sum()), "bisection_nodes": k, "nodes": None if
                   found[s] is None else [names[i] for i in found[s].nonzero()[:, 0].tolist()]}
        print(f"  seed {s}: masks keep {info[s]['masks_kept']} nodes, bisection {k}, after the "
              f"drop pass {None if found[s] is None else int(found[s].sum())}")
    if target > DEFAULTS["target_loss"]:
        strict = search(model, means, train, taus, DEFAULTS["target_loss"])[0]
        order = (sum(taus.values()) / len(taus)).argsort(descending=True)  # the seeds' mean tau
        found["strict"] = None if strict is None else drop_pass(model, means, train, strict,
                                                                order, target)
    sizes = {k: (len(circuit_edges(model, c)), int(c.sum())) for k, c in found.items()
             if c is not None}
    return found[min(sizes, key=sizes.get)] if sizes else None, {"seeds": info}


def drop_pass(model, means, data: dict, keep, order, target: float) -> torch.Tensor:
    """Drops the kept nodes bisection did not need, weakest first, while the rest reach target."""
    keep, t0 = keep.clone(), time.time()
    todo = [i for i in order.flip(0).tolist() if keep[i]]
    for n, i in enumerate(todo, 1):  # one forward per node: log progress
        keep[i] = 0.0
        if circuit_loss(model, means, keep, data) > target:
            keep[i] = 1.0
        if n % LOG_EVERY == 0:
            print(f"  drop pass {n}/{len(todo)} | kept {int(keep.sum())} | "
                  f"{(time.time() - t0) / n * (len(todo) - n):.0f}s left")
    return keep


def shuffled(data: dict, seed: int) -> dict:
    """The same prompts with the answers of each pair swapped or not by a coin flip: the labels
    then carry no signal that a context feature could predict (the control of paper_notes 9)."""
    gen = torch.Generator().manual_seed(seed)
    flips = torch.randint(2, (len(data["last"]) // 2,), generator=gen)
    sign = (2.0 * flips - 1.0).repeat_interleave(2).to(data["sign"].device)
    return {**data, "sign": data["sign"] * sign}


def control(model, means, train: dict, cfg) -> dict:
    """The search from one seed on shuffled answers: a real circuit needs far fewer edges. (No
    test accuracy: shuffled test answers are coin flips, so any node set scores about 50%.)"""
    print("  control: the same search with the answers shuffled per pair")
    shuffled_train = shuffled(train, cfg.seed + 1)
    info = find_circuit(model, means, shuffled_train, sparse_gpt.Config({**cfg, "seeds": 1}))[1]
    return {"n_nodes": None, "n_edges": None, **{k: v for k, v in info.items() if k != "seeds"}}


def key_positions(data: dict) -> torch.Tensor:
    """(prompts, positions) booleans: where a pair's prompts differ (between common start, end)."""
    idx, key = data["idx"].cpu(), torch.zeros(data["idx"].shape, dtype=torch.bool)
    for i in range(0, len(idx), 2):
        a, b = (idx[j, : data["last"][j] + 1].tolist() for j in (i, i + 1))
        n = min(len(a), len(b))
        start = next((j for j in range(n) if a[j] != b[j]), n)
        end = next((j for j in range(n - start) if a[-1 - j] != b[-1 - j]), n - start)
        key[i, start : len(a) - end], key[i + 1, start : len(b) - end] = True, True
    return key


@torch.no_grad()
def read_circuit(model, means, keep, data: dict, tokenizer, n_top=3) -> dict:
    """The circuit alone on `data`: per kept node, its mean on each prompt's key tokens, on other
    tokens and at the answer, and its largest tokens; per head with a kept channel, where its query
    at the answer attends (attend_with_sink's softmax of the recorded q, k), for a and b apart."""
    record, nodes, heads, spans = {}, {}, {}, node_spans(model)
    with ablated(model, means, keep, record):
        model(data["idx"])
    last, real, key = data["last"].cpu(), real_positions(data).cpu(), key_positions(data)
    rows, d = torch.arange(len(last)), model.cfg.d_head
    side = (rows % 2 == 0)[:, None].expand_as(key)  # True on prompt_a rows
    decode = {t: tokenizer.decode([t]) for t in data["idx"].unique().tolist()}
    tokens = [[decode[t] for t in row.tolist()] for row in data["idx"].cpu()]

    def mean(x, where):
        return round(x[where].mean().item(), 3) if where.any() else None

    def top(values, where):  # the n_top tokens of largest magnitude, as (token, value)
        best = {}
        for (r, t), v in zip(where.nonzero().tolist(), values[where].tolist()):
            if v:
                best[tokens[r][t]] = max(best.get(tokens[r][t], v), v, key=abs)
        return [(t, round(v, 3)) for t, v in sorted(best.items(), key=lambda x: -abs(x[1]))][:n_top]

    for loc, (a, b) in spans.items():
        for i in keep[a:b].nonzero()[:, 0].tolist():
            acts = record[loc][..., i].cpu()
            answer = acts[rows, last]
            nodes[a + i] = {"key_a": mean(acts, key & side), "key_b": mean(acts, key & ~side),
                            "other": mean(acts, real & ~key), "mean_a": answer[0::2].mean().item(),
                            "mean_b": answer[1::2].mean().item(), "top_tokens": top(acts, real)}
    for l, block in enumerate(model.blocks):
        kept = torch.cat([keep[slice(*spans[f"{l}.attn.{x}"])] for x in "qkv"]).view(3, -1)
        for h in sorted({i // d for i in kept.any(0).nonzero()[:, 0].tolist()}):
            q, k = (record[f"{l}.attn.{x}"].cpu()[..., h * d : (h + 1) * d] for x in "qk")
            logit = (k @ q[rows, last][..., None])[..., 0].masked_fill(~real, -math.inf) * d**-0.5
            sink = -math.inf if block.attn.sink is None else block.attn.sink[h].item()
            w = torch.softmax(torch.cat([torch.full((len(rows), 1), sink), logit], 1), 1)
            heads[f"{l}.attn.head{h}"] = head = {"sink": round(w[:, 0].mean().item(), 3)}
            for x, where in (("a", real & side), ("b", real & ~side)):
                share = Counter()
                for (r, t), v in zip(where.nonzero().tolist(), w[:, 1:][where].tolist()):
                    share[tokens[r][t]] += 2 * v / len(rows)
                head[f"attends_{x}"] = [(t, round(v, 3)) for t, v in share.most_common(2)]
    keys = [Counter(tokens[r][t] for r, t in (key & s).nonzero().tolist()) for s in (side, ~side)]
    return {"nodes": nodes, "heads": heads,
            "key_tokens": [(c.most_common(1) or [("",)])[0][0] for c in keys]}


def describe(model, tokenizer, means, keep, train: dict, test: dict, cfg) -> dict:
    """Everything the outputs report about one circuit."""
    names = node_names(model)
    calib = fit_calibration(diff_with(model, means, keep, train), train)
    attr_order = attribution_order(model, means, train)
    k_attr = smallest_circuit(model, means, train, attr_order, cfg.target_loss, 1)
    edges = circuit_edges(model, keep)
    n_embed, unembed = token_edges(model, keep, test["idx"][real_positions(test)].unique().tolist(),
                                   torch.cat([test["tok_a"], test["tok_b"]]).unique().tolist())
    seen = read_circuit(model, means, keep, test, tokenizer)
    return {"circuit": {"n_nodes": int(keep.sum()), "n_edges": len(edges), "n_embed_edges": n_embed,
                        "nodes": [names[i] for i in keep.nonzero()[:, 0].tolist()],
                        "edges": [(names[s], names[d], w) for s, d, w in edges],
                        "unembed_edges": [(names[s], tokenizer.decode([t]), w)
                                          for s, t, w in unembed],
                        "profiles": {names[i]: p for i, p in seen["nodes"].items()},
                        "heads": seen["heads"], "key_tokens": seen["key_tokens"]},
            "calibration": {"scale": calib[0], "shift": calib[1]},
            "checks": run_checks(model, means, keep, test, calib, cfg.seed),
            "attribution": {"n_nodes": k_attr, "n_edges": None if k_attr is None else
                            len(circuit_edges(model, keep_first(attr_order, k_attr)))}}


def seed_spread(model, means, info: dict, train: dict, test: dict) -> dict:
    """Over the seeds' circuits: min / median / max nodes and edges; the core (the nodes every
    seed keeps) alone on the test pairs; the mean Jaccard overlap of two seeds' node sets."""
    names = node_names(model)
    sets = [set(s["nodes"]) for s in info["seeds"].values() if s["nodes"] is not None]
    core = set.intersection(*sets) if sets else set()
    *keeps, core_keep = [torch.tensor([float(n in s) for n in names], device=means.device)
                         for s in sets + [core]]
    sizes = {"n_nodes": [len(s) for s in sets],
             "n_edges": [len(circuit_edges(model, k)) for k in keeps]}
    calib = fit_calibration(diff_with(model, means, core_keep, train), train)
    loss, acc = pair_loss(diff_with(model, means, core_keep, test), test, *calib)
    pairs = [len(a & b) / max(1, len(a | b)) for i, a in enumerate(sets) for b in sets[:i]]
    return {"n_seeds": len(info["seeds"]), "n_reached": len(sets),
            **{k: [min(v), median_low(v), max(v)] if sets else None for k, v in sizes.items()},
            "core": [n for n in names if n in core],
            "core_sufficiency": {"loss": loss.item(), "acc": acc},
            "overlap": sum(pairs) / len(pairs) if pairs else None}


# ---- writers: <task>.json, <task>.txt and <task>.svg in circuits/ beside the checkpoint


def location(name: str) -> str:
    """'1.attn.q.head3.ch1' -> '1.attn.q', '0.mlp.post_act.460' -> '0.mlp.post_act'."""
    parts = name.split(".")
    return ".".join(parts[:3] if parts[2] in ("q", "k", "v") else parts[:-1])


def all_edges(c: dict) -> list[tuple[str, str, float]]:
    """The circuit's edges, then the unembedding edges as node -> 'logit <token>'."""
    unembed = [(s, f"logit {t!r}", w) for s, t, w in c["unembed_edges"]]
    return [tuple(e) for e in c["edges"]] + unembed


def verdict(r: dict) -> list[str]:
    """Every output's first lines: the full model beside the circuit, and the warning flags."""
    ch, (scale, shift) = r["checks"], r["calibration"].values()
    lines = [f"test pairs: full model acc {ch['full']['acc']:.1%} | circuit alone acc "
             f"{ch['sufficiency']['acc']:.1%}, loss {ch['sufficiency']['loss']:.3f} after the "
             f"calibration (scale {scale:.2f}, shift {shift:+.2f}; "
             f"{ch['sufficiency_uncalibrated']['loss']:.3f} before) | circuit ablated acc "
             f"{ch['necessity']['acc']:.1%}"]
    if r["full_train_acc"] < r["config"]["solved_acc"]:
        lines.append(f"UNSOLVED: the full model scores {r['full_train_acc']:.1%} on the train "
                     "pairs; a circuit for a skill the model lacks explains nothing in it")
    if scale > AT_BOUND * MAX_SCALE:
        lines.append(f"CALIBRATION AT ITS BOUND (scale {scale:.2f}, at most {MAX_SCALE:g}): the "
                     "circuit's own signal is weak, its loss was bought by scaling it up")
    return lines


def spread(values) -> str:
    """[min, median, max] -> 'min/median/max'; a number -> '0.62'; None -> '-'."""
    return "-" if values is None else f"{values:.2f}" if isinstance(values, float) else \
        "/".join(map(str, values))


def circuit_txt(r: dict) -> str:
    """The listing: checks, heads, seeds, then each node by location with its values and edges."""
    c, s, (ka, kb) = r["circuit"], r["seeds"], r["circuit"]["key_tokens"]
    lines = [f"{r['task']}: {c['n_nodes']} nodes, {c['n_edges']} edges (and {c['n_embed_edges']} "
             f"embedding, {len(c['unembed_edges'])} unembedding edges), k_coef {r['k_coef']:g}",
             *verdict(r), f"checkpoint {r['ckpt']}; target loss {r['target_loss']} on the train "
             "pairs; on the test pairs:"]
    lines += [f"  {k:<26} loss {v['loss']:.3f}  acc {v['acc']:.1%}" for k, v in r["checks"].items()]
    lines.append(f"  attribution baseline needs {r['attribution']['n_nodes']} nodes, "
                 f"{r['attribution']['n_edges']} edges\nnode values are means in the circuit alone"
                 f" on the test pairs; key tokens (where a pair's prompts differ): {ka!r} in "
                 f"prompt_a, {kb!r} in prompt_b")
    lines += [f"head {h}: at the answer its query attends on prompt_a to {a['attends_a']}, on "
              f"prompt_b to {a['attends_b']}, to the sink {a['sink']:.2f}\n"
              for h, a in c["heads"].items()]
    lines.append(f"over {s['n_seeds']} seeds ({s['n_reached']} reach the target): nodes "
                 f"{spread(s['n_nodes'])}, edges {spread(s['n_edges'])} (min/median/max); mean "
                 f"overlap (Jaccard) {spread(s['overlap'])}; core (kept by every seed) "
                 f"{len(s['core'])} nodes, alone: test loss {s['core_sufficiency']['loss']:.3f} "
                 f"acc {s['core_sufficiency']['acc']:.1%}\n  core: {' '.join(s['core'])}\n")
    edges = all_edges(c)
    for loc, names in itertools.groupby(c["nodes"], key=location):
        lines.append(f"[{loc}]")
        for name in names:
            p = c["profiles"][name]
            top = ", ".join(f"{tok!r} {v:+.2f}" for tok, v in p["top_tokens"])
            lines.append(f"  {name}: on {ka!r} {p['key_a']:+.3f}, on {kb!r} {p['key_b']:+.3f}, on"
                         f" other tokens {p['other']:+.3f}; at the answer {p['mean_a']:+.3f} on "
                         f"prompt_a, {p['mean_b']:+.3f} on prompt_b; most active on {top}")
            lines += [f"      <- {src} ({w:+.3f})" for src, dst, w in edges if dst == name]
            lines += [f"      -> {dst} ({w:+.3f})" for src, dst, w in edges if src == name]
    return "\n".join(lines) + "\n"


# SVG layout, in pixels; the colours of prompt_a's and prompt_b's key tokens and answers
BOX_W, BOX_H, GAP, ROW_GAP, LEFT, WIDTH = 160, 62, 12, 56, 150, 1560
COLOUR = {"a": "#7d3c98", "b": "#ca6f1e"}
FILL = {"resid_in": "#dfe9fa", "resid_delta": "#fadddd", "q": "#dcf1df", "k": "#dcf1df",
        "v": "#dcf1df", "post_act": "#fff0c2", "logit": "#eeeeee"}
KIND = {"resid_in": "read ch", "resid_delta": "write ch", "post_act": "neuron "}
ROW_WORDS = {"attn": "attention", "mlp": "MLP", "final": "unembedding", "resid_in": "reads",
             "resid_delta": "writes", "post_act": "neurons"}
HALO = 'stroke="white" stroke-width="3" paint-order="stroke"'  # text that stays readable on lines


def shown(token: str, n=8) -> str:
    """A token with its spaces, newlines and tabs made visible, cut to n characters."""
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")[:n]


def row_of(name: str) -> str:
    """A node's row: its location; a layer's q, k and v channels share one row, by head."""
    if name.startswith("logit"):
        return "answer logits"
    return location(name)[:-1] + "heads" if name.split(".")[2] in "qkv" else location(name)


def head_of(name: str) -> str:
    """'1.attn.k.head3.ch6' -> '1.attn.head3', the key of the circuit's 'heads'."""
    return re.sub(r"\.[qkv](\.head\d+)\..*", r"\1", name)


def svg_layout(nodes: list[str], edges) -> tuple[dict, list, float]:
    """Each box's centre, each row's (name, top) and the height: rows in forward order, packed by
    the x of their neighbours above, wrapping at WIDTH; a head's keys and values left of its q."""
    pos, rows, y = {}, [], 200.0
    for row in dict.fromkeys(map(row_of, nodes)):
        groups, head = {}, row.endswith("heads")
        for n in (n for n in nodes if row_of(n) == row):
            groups.setdefault(head_of(n) if head else n, []).append(n)
        for members in groups.values():
            members.sort(key=lambda n: head and ".q." in n)
        near = {g: np.mean([pos[m][0] for s, d, _ in edges for n in groups[g] if n in (s, d)
                            for m in (s, d) if m in pos] or [0]) for g in groups}
        y += 44 * head  # room for a head's title
        rows.append((row, y))
        x = LEFT
        for g in sorted(groups, key=near.get):
            if x + len(groups[g]) * (BOX_W + GAP) > WIDTH and x > LEFT:
                x, y = LEFT, y + BOX_H + ROW_GAP + 44 * head
            for n in groups[g]:
                pos[n], x = (x + BOX_W / 2, y + BOX_H / 2), x + BOX_W + GAP
            x += 2 * GAP
        y += BOX_H + ROW_GAP
    return pos, rows, y


def text(x, y, body, size=11, colour="#222", extra="") -> str:
    return f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" fill="{colour}" {extra}>{body}</text>'


def line(x1, y1, x2, y2, extra) -> str:
    return f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" {extra}'


def mono(body: str, colour="#222") -> str:
    return f'<tspan font-family="monospace" fill="{colour}">{html.escape(body)}</tspan>'


def box_lines(n: str, c: dict, answers) -> tuple[str, list[str]]:
    """A box's title and lines: a node's values and top tokens; an answer's token and prompt."""
    if n.startswith("logit"):
        tok = next(t for s, t, _ in c["unembed_edges"] if f"logit {t!r}" == n)
        side = "a" * (tok in answers[0]) or "b" * (tok in answers[1])
        return mono(shown(tok, 20), COLOUR.get(side, "#222")), [
            f"the answer after prompt_{side}" * bool(side)]

    def f(v: float | None) -> str:  # 5 characters at most
        return "-" if v is None else f"{v:+.2f}" if abs(v) < 9.995 else f"{v:+.0f}"

    p, parts = c["profiles"][n], n.split(".")
    ka, kb = (mono(shown(t), COLOUR[x]) for t, x in zip(c["key_tokens"], "ab"))
    a, b = (mono(x, COLOUR[x]) for x in "ab")
    title = f"{parts[2]} ch{parts[4][2:]}" if parts[2] in "qkv" else KIND[parts[-2]] + parts[-1]
    return title, [f"{ka} {f(p['key_a'])} {kb} {f(p['key_b'])} else {f(p['other'])}",
                   f"answer {a} {f(p['mean_a'])} {b} {f(p['mean_b'])}",
                   "top " + " ".join(mono(shown(t)) for t, _ in p["top_tokens"])]


def circuit_svg(r: dict) -> str:
    """The circuit drawn to be read without the TXT (the legend says how); hover for full names."""
    c, ex, esc, edges = r["circuit"], r["example"], html.escape, all_edges(r["circuit"])
    pos, rows, height = svg_layout(c["nodes"] + sorted({d for _, d, _ in edges if "logit" in d}),
                                   edges)
    top_w, (ka, kb) = max([abs(w) for *_, w in edges] or [1.0]), c["key_tokens"]
    width = max([WIDTH] + [x + BOX_W / 2 for x, _ in pos.values()]) + 20  # a head may be wider
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>',
           text(10, 24, f"{esc(r['task'])}: {c['n_nodes']} nodes, {c['n_edges']} edges", 17,
                extra='font-weight="bold"')]
    out += [text(10, 46 + 17 * i, f"prompt_{x}: ...{mono(ex[i][-60:].replace(chr(10), '↵'))} → "
                 f"right answer {mono(shown(ex[2 + i]), COLOUR[x])}", 12)
            for i, x in enumerate("ab")]
    out += [text(10, 86 + 16 * i, esc(s), 12, "#b00" if s[0].isupper() else "#222")
            for i, s in enumerate(verdict(r))]
    legend = ("Boxes: blue = a read of one residual channel (after RMSNorm), red = a write to one, "
              "yellow = an MLP neuron, green = a q, k or v channel (framed by head), grey = an "
              "answer's logit. Rows run in the order of the forward pass, top to bottom.¶In a box:"
              f" its mean on prompt_a's key token {ka!r} (purple) and prompt_b's {kb!r} (orange),"
              " where the prompts differ, and on other tokens; at the answer position of a and of"
              " b; the tokens it is largest on. The circuit alone (all else mean-ablated), test "
              "pairs.¶Lines: blue = positive weight, red = negative, width by |weight| (widest "
              f"{top_w:.2f}), the weight written on it; dashed grey = a write seen by a later read "
              "of its residual channel (a read without one reads the token embedding).")
    out += [text(10, 136 + 15 * i, esc(s), 11, "#444") for i, s in enumerate(legend.split("¶"))]
    for row, y in rows:
        words = " ".join(ROW_WORDS.get(w, w) for w in row.split("."))
        out += [text(8, y + 20, esc("layer " * row[0].isdigit() + words), 12, "#333",
                     'font-weight="bold"'), text(8, y + 36, esc(row), 10, "#888")]
    on_top = []  # where each head attends: drawn last, over the edges
    for h, seen in c["heads"].items():  # a frame around each head
        members = [n for n in pos if "heads" in row_of(n) and head_of(n) == h]
        (x0, y), x1 = min(pos[n] for n in members), max(pos[n][0] for n in members)
        out.append(f'<rect x="{x0 - BOX_W / 2 - 8:.0f}" y="{y - BOX_H / 2 - 44:.0f}" width="'
                   f'{x1 - x0 + BOX_W + 16:.0f}" height="{BOX_H + 52}" rx="8" fill="#f5fbf6" '
                   'stroke="#5a9"/>')
        att = " | ".join(f"after prompt_{x}: " + ", ".join(f"{mono(shown(t), COLOUR[x])} {v:.2f}"
                                                            for t, v in seen[f"attends_{x}"])
                         for x in "ab") + f" | the sink {seen['sink']:.2f}"
        x0, y = x0 - BOX_W / 2, y - BOX_H / 2
        q = "" if any(".q." in n for n in members) else " (no q channel kept: all at their means)"
        on_top += [text(x0, y - 28, f"layer {h.split('.')[0]} head {h.split('head')[1]}: at the "
                        f"answer position its query{q} attends to", 11, extra='font-weight="bold" '
                        + HALO), text(x0, y - 12, att, 11, extra=HALO)]
    for n, (x, y) in pos.items():  # dashed: a write to channel c feeds the next reads of c
        out += [line(pos[m][0], pos[m][1] + BOX_H / 2, x, y - BOX_H / 2, 'stroke="#aaa" '
                     'stroke-dasharray="5 4" stroke-width="1.5"/>') for m in pos if "resid_in" in n
                and "resid_delta" in m and m.split(".")[-1] == n.split(".")[-1] and pos[m][1] < y]
    for s, d, w in edges:
        (x1, y1), (x2, y2), colour = pos[s], pos[d], "#2b6cb0" if w > 0 else "#c53030"
        y1, y2 = y1 + BOX_H / 2, y2 - BOX_H / 2
        out += [line(x1, y1, x2, y2, f'stroke="{colour}" stroke-opacity="0.7" stroke-width="'
                     f'{0.8 + 5 * abs(w) / top_w:.1f}"><title>{esc(f"{s} -> {d}: {w:+.3f}")}'
                     '</title></line>'), text((x1 + 2 * x2) / 3, (y1 + 2 * y2) / 3, f"{w:+.2f}",
                                              10, colour, 'text-anchor="middle" ' + HALO)]
    for n, (x, y) in pos.items():
        title, lines = box_lines(n, c, r["answers"])
        kind = "logit" if "logit" in n else location(n).split(".")[-1]
        x, y = x - BOX_W / 2, y - BOX_H / 2
        out += [f'<g><title>{esc(n)}</title><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" '
                f'height="{BOX_H}" rx="5" fill="{FILL[kind]}" stroke="#444"/>',
                text(x + 6, y + 14, title, 12, extra='font-weight="bold"'),
                *(text(x + 6, y + 28 + 13 * i, s, 10.5) for i, s in enumerate(lines)), "</g>"]
    return "\n".join(out + on_top + ["</svg>"]) + "\n"


# ---- steering (paper A.4; README: Bridges): one residual read of the sparse model's circuit,
# pushed through its bridge into the dense model it was trained beside (a --bridge_to checkpoint)

STRENGTHS = [i / 10 for i in range(11)]


@torch.no_grad()
def steer(model, bridged, tokenizer, keep, test: dict, task: str, cfg) -> dict:
    """Per test prompt: each steered channel's counterfactual delta at every token (its value
    under the pair's other prompt minus this one's; pairs of two lengths left out) x its decoder
    column x RMS(sparse) / RMS(dense) at the site over val text (the read is after RMSNorm, the
    bridge before it) x a strength, added to the dense model's read -> its mean P(the other
    answer), beside random directions of the same norms and no steering."""
    last, rows, record = test["last"], torch.arange(len(test["last"])), {}
    with hooked(model, lambda name, x: record.setdefault(name, x)):  # stores x, returns it
        model(test["idx"])
    # at the last block's read the paper steers: the circuit's reads there, together (on our
    # bridged model one of them alone moved nothing: README, Bridges); a circuit without one
    # steers the channel that best separates the two prompts at the answer (|mean on a - mean
    # on b| / std); --steer_node names a single one
    loc = f"{model.cfg.n_layer - 1}.{'mlp' if task == 'while_return_true' else 'attn'}.resid_in"
    v, (a, b) = record[loc][rows, last], node_spans(model)[loc]
    chans = [] if keep is None else (keep[a:b] > 0).nonzero()[:, 0].tolist()
    score = (v[0::2].mean(0) - v[1::2].mean(0)).abs() / (v.std(0) + 1e-6)
    chans = chans or [score.argmax().item()]
    if cfg.steer_node:
        loc, c = cfg.steer_node.rsplit(".", 1)
        chans = [int(c)]
    site, x = 2 * int(loc.split(".")[0]) + loc.endswith("mlp.resid_in"), record[loc][..., chans]
    delta = x.view(-1, 2, *x.shape[1:]).flip(1).reshape(x.shape) - x  # (prompts, tokens, chans)
    same = (last.view(-1, 2)[:, 0] == last.view(-1, 2)[:, 1]).repeat_interleave(2).float()
    gen, h_s, h_d = torch.Generator().manual_seed(cfg.seed), [], []
    val = np.fromfile(os.path.join(bridged.cfg.data_path, "val.bin"), np.uint16)
    batch = sparse_gpt.get_batch(val, model.cfg.block_size, 32, gen, x.device)[0]
    model(batch, resids=h_s)
    bridged.dense(batch, resids=h_d)
    ratio = (h_s[site].pow(2).mean() / h_d[site].pow(2).mean()).sqrt().item()
    cols = bridged.dec[site].weight[:, chans] * ratio  # each channel's decoder column
    other = torch.where(test["sign"] > 0, test["tok_b"], test["tok_a"])

    def p_other(cols, strength) -> list[float]:  # means over prompt_a rows, prompt_b rows
        with hooked(bridged.dense, lambda name, h: h + strength * delta @ cols.T
                    if name == loc else h):
            p = bridged.dense(test["idx"])[0][rows, last].float().softmax(-1)[rows, other] * same
        return [(p[i::2].sum() / same[i::2].sum()).item() for i in (0, 1)]

    randoms = [torch.randn(cols.shape, generator=gen).to(cols) for _ in range(5)]
    curves = {"steered": [p_other(cols, s) for s in STRENGTHS], "none": p_other(cols, 0.0),
              "random": [np.mean([p_other(r * cols.norm(dim=0) / r.norm(dim=0), s)
                                  for r in randoms], 0).tolist() for s in STRENGTHS]}
    a, b = (tokenizer.decode([test[k][0].item()]) for k in ("tok_a", "tok_b"))
    node = f"{loc}.{chans[0]}" if len(chans) == 1 else f"{loc}.{{{','.join(map(str, chans))}}}"
    return {"task": task, "node": node, "site": site, "rms_ratio": ratio,
            "strength": STRENGTHS, "n_pairs": int(same.sum().item()) // 2, "directions": {
                f"{x!r} -> {y!r}": {k: v[i] if k == "none" else [p[i] for p in v]
                                for k, v in curves.items()} for i, x, y in ((0, a, b), (1, b, a))}}


def write_steering(base: str, r: dict):
    """Prints steer()'s table; writes it to base.json and its curves to base.svg (log axis)."""
    print(f"{r['task']}: the dense model steered through {r['node']} (site {r['site']}, RMS ratio "
          f"{r['rms_ratio']:.3f}, {r['n_pairs']} test pairs): mean P(the other answer)\n"
          f"{'strength':>8}" + "".join(f"{d:>16}{'random':>10}" for d in r["directions"]))
    for i, s in enumerate(r["strength"]):
        print(f"{s:>8.1f}" + "".join(f"{v['steered'][i]:>16.4f}{v['random'][i]:>10.4f}"
                                     for v in r["directions"].values()))
    for d, v in r["directions"].items():
        print(f"{d}: none {v['none']:.4f}; at strength 1, x{v['steered'][-1] / v['none']:.1f} "
              f"over none, x{v['steered'][-1] / v['random'][-1]:.1f} over random")
    curves = [(f"{d} {k}", v[k] if k != "none" else [v[k]] * len(r["strength"]), colour, dash)
              for (d, v), colour in zip(r["directions"].items(), ("#2b6cb0", "#c53030"))
              for k, dash in (("steered", ""), ("random", "6 3"), ("none", "2 3"))]
    logs = [math.log10(max(p, 1e-12)) for c in curves for p in c[1]]
    lo, hi = math.floor(min(logs)), max(math.ceil(max(logs)), math.floor(min(logs)) + 1)
    px = lambda s: 70 + 370 * s  # pixels
    py = lambda p: 60 + 260 * (hi - math.log10(max(p, 1e-12))) / (hi - lo)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="360" font-family='
           '"sans-serif"><rect width="100%" height="100%" fill="white"/>',
           text(10, 22, html.escape(f"{r['task']}: the dense model steered through {r['node']}"),
                15, extra='font-weight="bold"'),
           text(10, 42, "mean P(the other answer) against strength (0 = none, 1 = fully patched), "
                f"{r['n_pairs']} test pairs", colour="#555")]
    for e in range(lo, hi + 1):
        out += [line(70, py(10**e), 440, py(10**e), 'stroke="#e4e4e4"/>'),
                text(64, py(10**e) + 4, f"1e{e}", colour="#888", extra='text-anchor="end"')]
    out += [text(px(s), 340, s, colour="#888", extra='text-anchor="middle"') for s in (0, 0.5, 1)]
    for i, (label, ps, colour, dash) in enumerate(curves):
        points = " ".join(f"{px(s):.0f},{py(p):.1f}" for s, p in zip(r["strength"], ps))
        out += [text(450, 60 + 16 * i, html.escape(label), colour=colour),
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2" '
                f'stroke-dasharray="{dash}"/>']
    svg = "\n".join(out + ["</svg>"]) + "\n"
    sparse_gpt.write_files_together({  # replaced together or not at all, as the circuit's files
        base + ".json": lambda f: f.write(json.dumps(r, indent=1).encode()),
        base + ".svg": lambda f: f.write(svg.encode())})


# ---- main: pick the tasks, prune them, write the circuits, summarise


def solved_tasks(model, tokenizer, cfg) -> list[str]:
    print(f"which of the {len(tasks.TASKS)} tasks does the model solve? ({cfg.n_pairs} pairs each)")
    scores = {}
    for name in tasks.TASKS:
        try:
            scores |= tasks.evaluate(model, tokenizer, [name], cfg.n_pairs, cfg.seed, "train")
        except ValueError as e:  # an answer that is not one token under this tokenizer
            print(f"skipping {name}: {e}")
    return tasks.solved(scores, cfg.solved_acc)


def prune_checkpoint(path: str, model, tokenizer, means, names: list[str], cfg, bridged) -> dict:
    """Prunes each task and writes circuits/ beside the checkpoint; returns task -> result."""
    out_dir = os.path.join(os.path.dirname(path) or ".", "circuits")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name in names:
        t0, base = time.time(), os.path.join(out_dir, name)
        print(f"{name}: pruning {len(means)} nodes of {path}")
        try:  # train and test pairs in one call: a released tokenizer's rewrites print once
            made = [tasks.make_pairs(name, cfg.n_pairs, cfg.seed, s) for s in ("train", "test")]
            pairs = tasks.for_tokenizer(tokenizer, name, made[0] + made[1])
        except ValueError as e:
            print(f"{name}: skipped: {e}")
            continue
        test_pairs = pairs[cfg.n_pairs :]
        train, test = (tasks.encode_pairs(tokenizer, p, model.cfg.block_size, means.device)
                       for p in (pairs[: cfg.n_pairs], test_pairs))
        full_acc = pair_loss(diff_with(model, means, torch.ones_like(means), train), train)[1]
        if full_acc < cfg.solved_acc and not cfg.unsolved:
            print(f"{name}: refused: the full model scores {full_acc:.1%} on the train pairs, "
                  f"under solved_acc {cfg.solved_acc:.0%}, so a circuit would explain no skill of "
                  "it; --unsolved=True prunes it anyway, marked UNSOLVED in every output")
            continue
        keep, search = find_circuit(model, means, train, cfg)
        results[name] = r = {"task": name, "ckpt": path, "target_loss": cfg.target_loss,
                             "k_coef": cfg.k_coef, "search": search, "config": dict(cfg),
                             "full_train_acc": full_acc, "example": test_pairs[0],
                             "answers": [sorted({p[i] for p in test_pairs}) for i in (2, 3)]}
        if cfg.control:
            r["control"] = control(model, means, train, cfg)
        if bridged is not None:  # steered through the circuit, or the best channel without one
            r["steering"] = steer(model, bridged, tokenizer, keep, test, name, cfg)
            write_steering(base + ".steer", r["steering"])
        if keep is None:
            print(f"{name}: no circuit reaches target loss {cfg.target_loss}, nor does the model")
            for ext in ("json", "txt", "svg"):  # a previous run's circuit: not this one's answer
                if os.path.exists(f"{base}.{ext}"):
                    os.replace(f"{base}.{ext}", f"{base}.stale.{ext}")
                    print(f"{name}: the previous {base}.{ext} is renamed {name}.stale.{ext}")
            continue
        r.update(describe(model, tokenizer, means, keep, train, test, cfg),
                 seeds=seed_spread(model, means, search, train, test))
        r["seconds"] = round(time.time() - t0, 1)
        files = {"json": json.dumps(r, indent=1), "txt": circuit_txt(r), "svg": circuit_svg(r)}
        sparse_gpt.write_files_together({  # the three files change together or not at all
            f"{base}.{ext}": lambda f, body=body: f.write(body.encode())
            for ext, body in files.items()})
        print(f"{name}: {r['circuit']['n_nodes']} nodes, {r['circuit']['n_edges']} edges in "
              f"{r['seconds']:.0f}s -> {base}.json .txt .svg")
    return results


def print_summary(path: str, results: dict[str, dict]):
    print(f"\n{path}: circuits (<task>.txt and .json hold every number); test accuracy of the full "
          f"model, the circuit alone (calibrated: scale, '!' = at its bound {MAX_SCALE:g}) and the "
          "circuit ablated; control = the search on shuffled answers (nodes/edges; fail = no "
          "circuit); seeds = every seed's circuit: nodes and edges min/median/max, the core they "
          "all keep (its size, its test acc alone) and their mean Jaccard overlap\n"
          f"{'task':<28}{'nodes':>6}{'edges':>7}{'full':>6}{'alone':>7}{'scale':>7}{'ablated':>8}"
          f"{'control':>17}{'seeds: nodes':>13}{'edges':>10}{'core':>5}{'acc':>5}{'overlap':>8}")
    edges = []
    for name, r in results.items():
        ctrl = r.get("control")
        ctrl = "-" if ctrl is None else "fail" if ctrl["n_edges"] is None else \
            f"{ctrl['n_nodes']}/{ctrl['n_edges']}"
        unsolved = " UNSOLVED" * (r["full_train_acc"] < r["config"]["solved_acc"])
        if "circuit" not in r:
            print(f"{name:<28}  no circuit reaches the target loss; control {ctrl}{unsolved}")
            continue
        c, ch, scale, s = r["circuit"], r["checks"], r["calibration"]["scale"], r["seeds"]
        edges.append(max(c["n_edges"], 1))  # an empty circuit (the bigram table did it) counts as 1
        flag = "!" if scale > AT_BOUND * MAX_SCALE else " "
        print(f"{name:<28}{c['n_nodes']:>6}{c['n_edges']:>7}{ch['full']['acc']:>6.0%}"
              f"{ch['sufficiency']['acc']:>7.0%}{scale:>6.2f}{flag}{ch['necessity']['acc']:>8.0%}"
              f"{ctrl:>17}{spread(s['n_nodes']):>13}{spread(s['n_edges']):>10}{len(s['core']):>5}"
              f"{s['core_sufficiency']['acc']:>5.0%}{spread(s['overlap']):>8}{unsolved}")
    if edges:
        print(f"geometric mean of edges over {len(edges)} tasks: {geometric_mean(edges):.1f}")


@sparse_gpt.cli
def main(argv):
    cfg = sparse_gpt.parse_config(argv, DEFAULTS, presets=None, rules=RULES)
    names = tasks.task_names(cfg.tasks)
    device = sparse_gpt.pick_device(cfg.device)
    path = sparse_gpt.checkpoint_file(cfg.ckpt)
    model, tokenizer, cfg_model = sparse_gpt.load_checkpoint(path, device)  # bad files fail here
    out = os.path.join(os.path.dirname(path) or ".", "circuits")
    if not os.access(os.path.dirname(out), os.W_OK) or os.path.exists(out) and not (
            os.path.isdir(out) and os.access(out, os.W_OK)):  # fail now, not after the search
        sys.exit(f"error: cannot write {out}/ (no permission, or a file in the way); copy the "
                 "checkpoint and its tokenizer.tiktoken to a writable folder")
    if not names:
        names = solved_tasks(model, tokenizer, cfg)
        print(f"tasks solved at accuracy >= {cfg.solved_acc:.0%} on {cfg.n_pairs} train pairs "
              f"(tasks.py's table: test pairs): {' '.join(names) or 'none'}")
        if not names:
            sys.exit(f"error: no task is solved at accuracy >= {cfg.solved_acc:.0%}; "
                     "name some with --tasks=a,b or lower --solved_acc")
    bridged = sparse_gpt.load_bridged(path, device) if cfg.steer else None
    if cfg.steer_node and cfg.steer_node not in node_names(model):
        sys.exit(f"error: --steer_node={cfg.steer_node} is not a node of {path}")
    model.requires_grad_(False)  # only the masks learn
    val = os.path.join(cfg_model.data_path or release_tokens(tokenizer, cfg), "val.bin")
    tokens = np.fromfile(sparse_gpt.regular(val), np.uint16) if os.path.exists(val) else []
    if len(tokens) <= cfg_model.block_size + 1 or tokens.max() >= cfg_model.vocab_size:
        sys.exit(f"error: {val} (the checkpoint's validation tokens, for node means) is missing"
                 " or damaged: run from the folder the model was trained in, or rebuild it with "
                 "python sparse_gpt.py --init_from=resume --out_dir=<that folder>")
    means = compute_means(model, tokens, cfg.mean_batches, cfg_model.batch_size)
    print_summary(path, prune_checkpoint(path, model, tokenizer, means, names, cfg, bridged))


if __name__ == "__main__":
    main()
