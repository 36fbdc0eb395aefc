"""
A weight-sparse GPT trained on Python code, after Gao et al. 2025, "Weight-sparse transformers
have interpretable circuits". Read top to bottom: config values -> the model (paper section 1)
-> weight sparsity (section 2) -> the optimizer -> the training loop -> bridges to a dense model
(section 2.3). One marked line then starts the machinery, read when you need it: corpus, BPE and
token cache; checkpoints and resume; the paper's released models; devices and DDP; the command
line; --bench; main.

    python sparse_gpt.py                      # cpu preset without a GPU, gpu preset with one
    python sparse_gpt.py --preset=tiny        # a one-minute smoke run
    python sparse_gpt.py --init_from=resume   # continue out/ckpt.pt where it stopped
    torchrun --standalone --nproc_per_node=8 sparse_gpt.py   # one model on 8 GPUs (DDP)
"""

import base64
import difflib
import fcntl
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import signal
import sys
import sysconfig
import time
from collections import Counter
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import regex
import tiktoken.load
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ---- config: flat defaults, overridden by a preset, then by --key=value

DEFAULTS = dict(
    preset="auto",  # auto = gpu with CUDA, else cpu; see PRESETS
    out_dir="out",  # checkpoint, tokenizer copy, circuits
    overwrite=False,  # let a scratch run replace a checkpoint already in out_dir
    data_dir="",  # folder of .py files; empty = this interpreter's standard library
    cache_dir="data",  # tokenizer and token files, keyed by corpus and vocab size
    init_from="scratch",  # scratch | resume (continue out_dir/ckpt.pt exactly, its own config)
    # model (paper section 1)
    vocab_size=2048,  # byte-level BPE, end-of-text included
    n_layer=2,  # transformer blocks
    d_model=128,  # residual stream width
    d_head=16,  # small heads are more monosemantic
    n_head=0,  # 0 = d_model // d_head; n_head * d_head may differ from d_model (official)
    d_mlp=512,  # MLP neurons per block
    block_size=128,  # context length in tokens
    afrac=0.25,  # fraction of activations AbsTopK keeps at every node location; 1.0 = off
    afrac_nodes="all",  # node locations with AbsTopK, e.g. attn.resid_in,mlp.post_act; all = 8
    activation="gelu",  # gelu | relu, the MLP's nonlinearity
    bias=False,  # biases in the four linear layers of every block (dense, not decayed)
    pos_embed=False,  # learned position embedding added to the token embedding (starts at 0)
    norm_eps=1e-6,  # RMSNorm's epsilon
    attn_sink=True,  # learnable per-head logit of an always-visible zero-valued key
    bigram_table=True,  # dense vocab x vocab table added to the logits
    # weight sparsity (paper section 2)
    density=1 / 16,  # fraction of each hidden matrix kept at the end of annealing
    embed_ratio=4.0,  # wte and lm_head keep this many times the hidden density (official ef)
    anneal_frac=0.5,  # density anneals linearly from 1.0 over this fraction of training
    min_per_neuron=4,  # the paper's j: no neuron or q/k/v channel drops below this many weights
    # optimization
    batch_size=32,  # the global batch: under torchrun each of N processes takes 1/N of it
    max_iters=3000,  # training steps
    learning_rate=1e-2,  # peak, before the 1/sqrt(density) factor of the sharkfin schedule
    warmup_frac=0.01,  # fraction of training spent warming the learning rate up
    weight_decay=0.1,  # on every matrix but the bigram table (official script)
    adam_eps=0.1,  # large on purpose (paper 2): the gradient Adam sees always has RMS 1
    # bridges (paper 2.3, A.3): train beside a frozen dense model (README: Bridges)
    bridge_to="",  # a dense run's ckpt.pt; its tokenizer and token cache are used
    c_nmse=0.1,  # weight of the bridges' reconstruction losses; 1 blew up here (README: Bridges)
    c_kl=1.0,  # weight of the hybrid paths' KL to the dense model
    hybrid_frac=0.25,  # share of each batch the hybrid paths see in training (eval: all): cost
    # loop and system
    eval_interval=250,  # steps between evaluations (each saves the checkpoint)
    eval_iters=20,  # batches per evaluation
    log_interval=25,  # steps between log lines
    device="auto",  # auto | cpu | cuda | mps
    compile=False,  # torch.compile the model (the gpu preset turns it on)
    seed=1337,  # model init and the batch sequence
    bench=False,  # time sparse vs dense steps on random tokens instead of training
)

PRESETS = {
    "tiny": dict(out_dir="out/tiny", n_layer=1, d_model=64, d_mlp=256, block_size=64, batch_size=16,
                 max_iters=200, eval_interval=100, eval_iters=5, log_interval=20),
    "cpu": dict(),  # the defaults: chosen for the smallest circuits in ~15 min on 2 cores (README)
    # official example's shape and densities, batch sized for 80 GB; ~1 h on an H100 (README)
    "gpu": dict(n_layer=8, d_model=1024, d_mlp=4096, block_size=256, batch_size=256,
                max_iters=10000, density=1 / 64, learning_rate=1.1e-3, eval_interval=500,
                compile=True),
}


def require(ok, message: str):  # a bad input's one line: "error: what is wrong; the fix"
    if not ok:
        sys.exit(f"error: {message}")


class Config(dict):
    """The flat config: a dict whose keys also read as attributes (cfg.n_layer)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:  # AttributeError, so that hasattr and copy.deepcopy work
            raise AttributeError(key) from None


# ---- model: GPT with RMSNorm, small heads, attention sinks, a bigram table, and AbsTopK at every
# node location (paper section 1)

# Where AbsTopK may act (afrac_nodes). The ninth node location, final.resid_in, has none.
NODE_LOCATIONS = ("attn.resid_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta",
                  "mlp.resid_in", "mlp.post_act", "mlp.resid_delta")


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k largest-magnitude entries of the last dimension (and ties, in practice zeros)."""
    a = x.abs()
    return x * (a >= kth_largest(a, k))


def kth_largest(a: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """The k-th largest of a (>= 0) along dim, keepdim: a selection, not a sort (paper B)."""
    a = a.detach()  # autograd then keeps no topk indices (memory)
    if a.device.type == "cpu" and a.dtype == torch.float32:
        return kth_largest_numpy(a, k, dim)
    return a.topk(k, dim=dim, sorted=False).values.amin(dim, keepdim=True)


def kth_largest_numpy(a: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """CPU float32: numpy's introselect on the float bits as int32 (same order for floats >= 0),
    several times faster than torch.topk; it would break a compiled graph (README: The GPU path)."""
    n = a.shape[dim]
    part = np.partition(a.numpy().view(np.int32), n - k, axis=dim)
    return torch.from_numpy(np.take(part, [n - k], axis=dim).view(np.float32))


class Node(nn.Module):
    """One node location: AbsTopK, then a hook (name, x) -> x by which prune.py ablates nodes."""

    def __init__(self, layer, location: str, width: int, cfg):
        super().__init__()
        self.name, self.width = f"{layer}.{location}", width  # e.g. 0.mlp.post_act
        chosen = NODE_LOCATIONS if cfg.afrac_nodes == "all" else cfg.afrac_nodes.split(",")
        afrac = cfg.afrac if location in chosen else 1.0
        self.k = max(1, int(afrac * width)) if afrac < 1 else None  # int() as the official code
        self.hook = None

    def forward(self, x):
        if self.k is not None:
            x = abstopk(x, self.k)
        if self.hook is not None:
            x = self.hook(self.name, x)
        return x


def attend_with_sink(q, k, v, sink):
    """Causal attention plus a key every query sees, of logit `sink` (per head) and value zero: a
    learnable term in the softmax's denominator (paper 1), built so SDPA's fast kernels run."""
    B, H, T, D = q.shape
    scale = D**-0.5
    # 1. one dimension more: 1 on every query, 0 on every real key and value, so real logits
    #    are unchanged and a key holding sink / scale there has logit `sink` with every query
    one, zero = q.new_ones(B, H, T, 1), q.new_zeros(B, H, T, 1)
    q, k, v = torch.cat([q, one], -1), torch.cat([k, zero], -1), torch.cat([v, zero], -1)
    # 2. that key, zero elsewhere, goes first: position 0, which the causal mask lets all see
    sink_key = torch.cat([q.new_zeros(H, D), (sink / scale).to(q.dtype)[:, None]], dim=-1)
    k = torch.cat([sink_key.expand(B, H, D + 1)[:, :, None], k], dim=2)
    # 3. its value is zero; a dummy query first keeps the mask square (query t+1 sees the sink
    #    and keys 1..t+1), and its own output is dropped
    first = q.new_zeros(B, H, 1, D + 1)
    q, v = torch.cat([first, q], dim=2), torch.cat([first, v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return y[:, :, 1:, :D]


class Attention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head or cfg.d_model // cfg.d_head, cfg.d_head
        d, hd = cfg.d_model, self.n_head * cfg.d_head
        self.c_attn = nn.Linear(d, 3 * hd, bias=cfg.bias)  # rows: q, k, v channels
        self.c_proj = nn.Linear(hd, d, bias=cfg.bias)  # columns: v channels
        self.q, self.k, self.v = (Node(layer, f"attn.{n}", hd, cfg) for n in "qkv")
        self.resid_delta = Node(layer, "attn.resid_delta", d, cfg)
        self.sink = nn.Parameter(torch.zeros(self.n_head)) if cfg.attn_sink else None

    def forward(self, x):
        B, T, _ = x.shape
        hd = self.n_head * self.d_head
        q, k, v = self.c_attn(x).split(hd, dim=2)
        q, k, v = self.q(q), self.k(k), self.v(v)
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))
        y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if self.sink is None
             else attend_with_sink(q, k, v, self.sink))
        return self.resid_delta(self.c_proj(y.transpose(1, 2).reshape(B, T, hd)))


class MLP(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.act = {"gelu": F.gelu, "relu": F.relu}[cfg.activation]
        self.post_act = Node(layer, "mlp.post_act", cfg.d_mlp, cfg)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.resid_delta = Node(layer, "mlp.resid_delta", cfg.d_model, cfg)

    def forward(self, x):
        return self.resid_delta(self.c_proj(self.post_act(self.act(self.c_fc(x)))))


class Block(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        # RMSNorm: no mean subtraction, so zero keeps its meaning; the gain stays dense (paper 1)
        self.attn_norm, self.mlp_norm = (nn.RMSNorm(cfg.d_model, cfg.norm_eps) for _ in range(2))
        self.attn_in = Node(layer, "attn.resid_in", cfg.d_model, cfg)
        self.mlp_in = Node(layer, "mlp.resid_in", cfg.d_model, cfg)
        self.attn, self.mlp = Attention(cfg, layer), MLP(cfg, layer)

    def sublayer(self, j: int, x):  # what attention (j=0) or the MLP (j=1) adds to the stream x
        if j == 0:
            return self.attn(self.attn_in(self.attn_norm(x)))
        return self.mlp(self.mlp_in(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if min(cfg.vocab_size, cfg.n_layer, cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.block_size,
               cfg.n_head + 1) < 1:
            raise ValueError(f"every size must be at least 1 (n_head at least 0) in {cfg}")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_embed else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        # a node prune.py masks, but no AbsTopK (official script): not in NODE_LOCATIONS
        self.final_in = Node("final", "resid_in", cfg.d_model, cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied
        self.bigram = nn.Embedding(cfg.vocab_size, cfg.vocab_size) if cfg.bigram_table else None
        for name, p in self.named_parameters():
            if name == "wpe.weight" or name.endswith(".bias"):  # official: zero
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
        if self.bigram is not None:  # official init; never decayed
            nn.init.uniform_(self.bigram.weight, 0.0, 0.02)

    def nodes(self) -> list[Node]:
        return [m for m in self.modules() if isinstance(m, Node)]

    def embed(self, idx):
        x = self.wte(idx)
        return x if self.wpe is None else x + self.wpe.weight[: idx.shape[1]]

    def forward(self, idx, targets=None, site=0, x=None, resids=None):
        """Logits, and their mean cross-entropy given targets. Bridges (below) run it from `site`
        (2l / 2l+1: before block l's attention / MLP) on x; `resids` collects the stream there."""
        x = self.embed(idx) if x is None else x
        for i in range(site, 2 * len(self.blocks)):
            if resids is not None:
                resids.append(x)
            x = x + self.blocks[i // 2].sublayer(i % 2, x)
        logits = self.lm_head(self.final_in(self.final_norm(x)))
        if self.bigram is not None:
            logits = logits + self.bigram(idx)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def answer_diff(self, idx, last, tok_a, tok_b) -> torch.Tensor:
        """forward's logit(tok_a) - logit(tok_b) at position `last`, for prune.py: after the last
        attention only that position, unembedded for the two answers alone (a third faster)."""
        rows, x = torch.arange(len(last), device=idx.device), self.embed(idx)
        for i in range(2 * len(self.blocks)):  # forward's sites
            x = x + self.blocks[i // 2].sublayer(i % 2, x)
            if i == 2 * len(self.blocks) - 2:  # the last attention needed every position
                x = x[rows, last][:, None]
        h = self.final_in(self.final_norm(x))[:, 0]
        z = (h * (self.lm_head.weight[tok_a] - self.lm_head.weight[tok_b])).sum(-1)
        if self.bigram is not None:  # the row of the token at the answer position
            table, now = self.bigram.weight, idx[rows, last]
            z = z + table[now, tok_a] - table[now, tok_b]
        return z

    @torch.no_grad()
    def generate(self, idx, n_new: int, temperature=0.8, gen=None):
        for _ in range(n_new):
            logits, _ = self(idx[:, -self.cfg.block_size :])
            probs = F.softmax(logits[:, -1].float() / temperature, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)], dim=1)
        return idx


# ---- weight sparsity (paper section 2): after every optimizer step each sparse matrix keeps its
# ceil(density * numel) largest-magnitude entries, with a floor of min_per_neuron per neuron

EMBEDDINGS = ("wte.weight", "wpe.weight", "lm_head.weight")  # wpe: sparse like wte (official)


def sparse_matrices(model: GPT) -> list[tuple[str, nn.Parameter, int | None]]:
    """(name, weight, floor_dim): every matrix but the bigram table. Each neuron / q,k,v channel
    keeps min_per_neuron weights along floor_dim: 1 where rows are neurons, 0 where columns are."""
    floor_dims = {"c_fc": 1, "c_attn": 1, "c_proj": 0}
    return [(name, p, floor_dims.get(name.split(".")[-2])) for name, p in model.named_parameters()
            if p.dim() == 2 and not name.startswith("bigram")]


def target_densities(cfg) -> tuple[float, float]:
    """Final (hidden, embedding) densities: embeddings embed_ratio times denser (official)."""
    return cfg.density, min(1.0, cfg.density * cfg.embed_ratio)


def density_at(it: int, cfg, embed: bool = False) -> float:
    """Linear anneal from dense to the target over the first anneal_frac of training."""
    target = target_densities(cfg)[embed]
    anneal = cfg.anneal_frac * cfg.max_iters
    frac = min(1.0, it / anneal) if anneal > 0 else 1.0
    return 1.0 - (1.0 - target) * frac


@torch.no_grad()
def project_weights(model: GPT, it: int, cfg):
    """After step `it`: each sparse matrix keeps its ceil(density_at(it) * numel) largest."""
    for name, w, floor_dim in sparse_matrices(model):
        d = density_at(it, cfg, embed=name in EMBEDDINGS)
        if d < 1.0:
            w.mul_(topk_mask(w, math.ceil(d * w.numel()), floor_dim, cfg.min_per_neuron))


@torch.no_grad()
def topk_mask(w: torch.Tensor, k: int, floor_dim: int | None, min_per_neuron: int) -> torch.Tensor:
    """Boolean mask of the k entries to keep: each neuron's min_per_neuron largest first, then the
    largest of the rest. If the floors alone need more than k entries, the floors win."""
    score = w.abs().float()
    if floor_dim is not None and min_per_neuron > 0:
        j = min(min_per_neuron, w.shape[floor_dim])
        floor = score >= kth_largest(score, j, floor_dim)
        score = score.masked_fill(floor, float("inf"))
        k = max(k, int(floor.sum()))
    return score >= kth_largest(score.view(-1), k, 0)


def n_weights(model: GPT) -> int:  # in the sparse matrices, zero or not
    return sum(p.numel() for _, p, _ in sparse_matrices(model))


def n_kept(model: GPT, cfg) -> int:  # nonzero at the target densities: the paper's L0
    hidden, embed = target_densities(cfg)
    return sum(math.ceil((embed if n in EMBEDDINGS else hidden) * p.numel())
               for n, p, _ in sparse_matrices(model))


# ---- optimizer: AdamW on a gradient of RMS 1, and the sharkfin learning rate (paper section 2)


def make_optimizer(model: GPT, cfg, device_type: str) -> torch.optim.AdamW:
    groups = [{"params": [p for n, p in model.named_parameters()  # d=False: gains, sinks, bigram
                          if (p.dim() >= 2 and not n.startswith("bigram")) == d],
               "weight_decay": cfg.weight_decay * d} for d in (True, False)]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=cfg.adam_eps,
                             fused=device_type == "cuda")


def normalize_grad_rms_(params) -> torch.Tensor:
    """Divides the whole gradient by its root-mean-square (+1e-5), every step, as the official
    script does: Adam then always sees RMS 1, which is what eps=0.1 is sized for. Not a clip:
    the raw RMS is ~1e-4 (the bigram table's many zero gradients count too). Returns the raw RMS."""
    grads = [p.grad for p in params if p.grad is not None]
    rms = torch.sqrt(sum(g.float().pow(2).sum() for g in grads) / sum(g.numel() for g in grads))
    torch._foreach_div_(grads, rms + 1e-5)
    return rms


def warmup_decay(it: int, steps: int, warmup_frac: float) -> float:
    """The factor on the peak rate: linear warmup over warmup_frac of `steps`, then decay to 0."""
    warm = max(1, round(warmup_frac * steps))
    return (it + 1) / warm if it < warm else (steps - it) / max(1, steps - warm)


def lr_at(it: int, cfg) -> float:
    """Sharkfin (paper 2): warmup_decay / sqrt(density now): the rate rises as the model thins."""
    return (cfg.learning_rate * warmup_decay(it, cfg.max_iters, cfg.warmup_frac)
            / math.sqrt(density_at(it, cfg)))


# ---- training loop: lr -> batch -> step -> projection -> log / eval / save. The run's setup, its
# Ctrl-C handling and the cross-rank plumbing are named helpers below the marked line.


def get_batch(data: np.ndarray, block_size: int, batch_size: int, gen: torch.Generator, device,
              rank: int = 0, world: int = 1):
    """Random windows of block_size tokens; the generator makes every batch reproducible."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen).tolist()
    ix = ix[rank::world]  # DDP: every rank draws the same global batch and keeps its share
    xy = torch.from_numpy(np.stack([data[i : i + block_size + 1].astype(np.int64) for i in ix]))
    if device.type == "cuda":
        xy = xy.pin_memory()  # so that the copy to the GPU can overlap the step
    xy = xy.to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


@torch.no_grad()
def estimate_loss(model, fmodel, data: dict, tokenizer, cfg, device, autocast) -> dict:
    """The mean loss of each split on the same eval_iters batches every time, and a sample."""
    model.eval()
    out = {}
    with autocast:
        for split, arr in data.items():
            gen = torch.Generator().manual_seed(cfg.seed)
            batches = (get_batch(arr, cfg.block_size, cfg.batch_size, gen, device)
                       for _ in range(cfg.eval_iters))
            out[split] = sum(fmodel(x, y)[1].item() for x, y in batches) / cfg.eval_iters
        idx = torch.tensor([tokenizer.encode_ordinary("def ")], device=device)
        idx = model.generate(idx, 48, gen=torch.Generator(device=device).manual_seed(0))
    model.train()
    return out | {"sample": tokenizer.decode(idx[0].tolist())}


def train_step(model, fmodel, optimizer, x, y, autocast) -> torch.Tensor:
    """Forward, backward, gradient / its RMS, AdamW; returns the loss (the caller projects)."""
    with autocast:
        _, loss = fmodel(x, y)
    loss.backward()
    # the model's parameters in their own order (the sum's rounding: plain runs stay bit-identical),
    # then the bridges' groups, which bridge_to_dense adds after make_optimizer's two
    bridges = [p for group in optimizer.param_groups[2:] for p in group["params"]]
    normalize_grad_rms_([*model.parameters(), *bridges])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def train(cfg, ckpt: dict | None = None) -> list[tuple[int, float]]:
    """Trains per cfg, or continues ckpt (the run's checkpoint) under --init_from=resume; saves
    out_dir/ckpt.pt at every eval, on Ctrl-C or SIGTERM, and at the end. -> (step, loss) history"""
    rank, world, device = setup_ddp(pick_device(cfg.device), cfg.batch_size)
    cfg = absolute_paths(cfg)
    check_memory(cfg, device, training=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device.type)
    bridged = bridge_to_dense(cfg, model, optimizer, device) if cfg.bridge_to else None
    iter_num, best_val_loss, data, tokenizer, data_path, lock = start_run(
        cfg, ckpt, model, optimizer, device, rank, world, bridged)  # lock: rank 0's, on out_dir
    ckpt_path, autocast = os.path.join(cfg.out_dir, "ckpt.pt"), bf16_autocast(device)
    fmodel = torch.compile(model) if cfg.compile else model
    if bridged is not None:  # then train_step runs the sparse model, the bridges, the dense one
        bridged.sparse = fmodel
    # DDP averages the gradients during backward, so every rank then sees the same gradient, RMS,
    # Adam step and projection; evaluation uses fmodel, outside DDP, on rank 0 alone
    stepped = fmodel if bridged is None else bridged
    train_model = DDP(stepped) if world > 1 else stepped
    history, start_iter, t_start, t_last = [], iter_num, time.time(), time.time()
    with ctrl_c_finishes_the_step(world, lock) as stop:
        while iter_num < cfg.max_iters:
            lr = lr_at(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the batch depends only on (seed, iter_num): a resumed run sees the same data
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iter_num)
            x, y = get_batch(data["train"], cfg.block_size, cfg.batch_size, gen, device,
                             rank, world)
            loss = train_step(model, train_model, optimizer, x, y, autocast).item()
            project_weights(model, iter_num, cfg)
            stopping = stop.requested  # a signal after this line is acted on after the next step
            if world > 1:
                loss, anyone = mean_over_ranks(loss, stopping, world, device)
                stopping = stopping or signal.SIGINT * anyone  # another rank was signalled
            require(math.isfinite(loss), f"loss is {loss} at step {iter_num}; the last good "
                    f"checkpoint is kept in {ckpt_path}; retrain with a lower --learning_rate")
            iter_num += 1
            history.append((iter_num, loss))
            last = iter_num == cfg.max_iters
            if iter_num % cfg.log_interval == 0 or last:
                now, steps = time.time(), iter_num - max(start_iter, iter_num - cfg.log_interval)
                tok_s = steps * cfg.batch_size * cfg.block_size / max(now - t_last, 1e-9)
                left = (now - t_start) / (iter_num - start_iter) * (cfg.max_iters - iter_num)
                print(f"step {iter_num} | loss {loss:.3f} | density {density_at(iter_num, cfg):.3f}"
                      f" | lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s | {left / 60:.1f} min left"
                      + (bridged.log if bridged else ""))  # the last batch's terms
                t_last = now
            eval_now = rank == 0 and (iter_num % cfg.eval_interval == 0 or last)
            if eval_now:
                out = estimate_loss(model, fmodel, data, tokenizer, cfg, device, autocast)
                best_val_loss = min(best_val_loss, out["val"])
                print(f"eval {iter_num} | train {out['train']:.3f} | val {out['val']:.3f}")
                print("sample: " + repr(out["sample"])[:200])
                if bridged is not None:
                    print(evaluate_bridges(bridged, data["val"], cfg, device, autocast))
            if rank == 0 and (eval_now or stopping):  # rank 0 alone writes files
                save_checkpoint(ckpt_path, model, optimizer, cfg, iter_num, best_val_loss,
                                data_path, bridged and bridged.checkpoint())
                t_last = time.time()  # eval and save time is not training throughput
            if stopping:
                print(f"saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
                sys.exit(128 + stopping)  # a stopped run is not a finished one: 130 or 143
    print(f"done: {iter_num} steps in {(time.time() - t_start) / 60:.1f} min, best val loss "
          f"{best_val_loss:.3f}; {ckpt_path} holds the last step's weights, not the best's")
    return history


# ---- bridges (paper 2.3, 3.3, A.3; README: Bridges): the sparse model trains beside a frozen dense
# one, joined at each of the 2L sites (GPT.forward) by an encoder f_i (dense -> sparse: Linear,
# AbsTopK) and a decoder g_i (sparse -> dense: Linear), so that its circuits explain the dense
# model. loss = sparse CE + c_nmse * sum_i [NMSE(f_i(h_dense_i), h_sparse_i) + NMSE(g_i(h_sparse_i),
# h_dense_i)] + c_kl * sum_i [KL(dense logits || dense to site i, f_i, sparse from there on) +
# KL(dense logits || sparse to site i, g_i, dense from there on)]


def nmse(pred, target):
    """Squared error / the target's variance (detached) per token, mean: 1 = predicting its mean."""
    return ((pred - target).pow(2).mean(-1) / (target.var(-1, correction=0).detach() + 1e-6)).mean()


class Bridged(nn.Module):
    """The sparse model, the dense one (frozen; its file at dense_path) and the bridges: dense
    matrices with biases. forward(idx, targets) -> (the loss's terms, detached; the loss)."""

    def __init__(self, sparse: GPT, dense: GPT, cfg, dense_path: str):
        super().__init__()
        self.sparse, self.dense, self.cfg = sparse, dense.requires_grad_(False), cfg
        self.dense_path = os.path.abspath(dense_path)
        self.dense_sha1 = hashlib.sha1(Path(dense_path).read_bytes()).hexdigest()
        d, sites = dense.cfg.d_model, range(2 * cfg.n_layer)
        self.enc = nn.ModuleList(nn.Linear(d, cfg.d_model) for _ in sites)
        self.dec = nn.ModuleList(nn.Linear(cfg.d_model, d) for _ in sites)
        for lin in [*self.enc, *self.dec]:  # as the model's matrices: the default init is ~5x
            nn.init.normal_(lin.weight, std=0.02)  # larger, and its bias alone outweighs the
            nn.init.zeros_(lin.bias)  # sparse model's residual stream (RMS ~0.01; README)
        self.k = max(1, int(cfg.afrac * cfg.d_model))  # f_i's AbsTopK: d_sparse/4 by default

    def forward(self, idx, targets):
        h_dense, h_sparse, rows = [], [], []
        n = max(1, round(self.cfg.hybrid_frac * len(idx))) if self.training else len(idx)
        with torch.no_grad():  # the dense model's own pass needs no gradient; the hybrids' do
            logits, dense_ce = self.dense(idx, targets, resids=h_dense)
            log_p = F.log_softmax(logits[:n].float(), -1).flatten(0, 1)  # per token, as q below
        _, ce = self.sparse(idx, targets, resids=h_sparse)
        for i, (f, g) in enumerate(zip(self.enc, self.dec)):
            to_sparse, to_dense = abstopk(f(h_dense[i]), self.k), g(h_sparse[i])
            hybrids = [F.log_softmax(m(idx[:n], site=i, x=h[:n])[0].float(), -1).flatten(0, 1)
                       for m, h in ((self.sparse, to_sparse), (self.dense, to_dense))]
            rows.append(torch.stack(  # NMSE d->s, s->d, KL d->s, s->d, CE d->s, s->d
                [nmse(to_sparse, h_sparse[i]), nmse(to_dense, h_dense[i])]
                + [F.kl_div(q, log_p, reduction="batchmean", log_target=True) for q in hybrids]
                + [F.nll_loss(q, targets[:n].flatten()) for q in hybrids]))
        terms = torch.stack(rows)
        loss = ce + self.cfg.c_nmse * terms[:, :2].sum() + self.cfg.c_kl * terms[:, 2:4].sum()
        self.log = f" | ce {ce:.3f} nmse {terms[:, :2].sum():.3f} kl {terms[:, 2:4].sum():.3f}"
        return dict(ce=ce.detach(), dense_ce=dense_ce, sites=terms.detach()), loss

    def checkpoint(self) -> dict:  # saved beside the sparse model
        return dict(dense=self.dense_path, dense_sha1=self.dense_sha1, enc=self.enc.state_dict(),
                    dec=self.dec.state_dict())

    def load(self, saved: dict, where: str):
        require(saved["dense_sha1"] == self.dense_sha1, f"{self.dense_path} changed since {where} "
                "was trained beside it; bridge to the dense checkpoint it was trained with")
        self.enc.load_state_dict(saved["enc"])
        self.dec.load_state_dict(saved["dec"])


def bridge_to_dense(cfg, model: GPT, optimizer, device) -> Bridged:
    """The dense model, checked to fit, and new bridges, stepped with the sparse model (matrices
    decayed, biases not; never projected). .dense_data: the dense run's tokens and tokenizer."""
    dense, tokenizer, dcfg = load_checkpoint(cfg.bridge_to, device)
    why = [f"its {k} is {dcfg[k]}, this run's {cfg[k]}: pass --{k}={dcfg[k]}"
           for k in ("n_layer", "vocab_size", "block_size")  # a longer dense context is fine
           if dcfg[k] != cfg[k] and (k != "block_size" or dcfg[k] < cfg[k])]
    if dcfg.density < 1:
        why = [f"it is weight-sparse (density {dcfg.density:g}); train a dense run (--density=1)"]
    if why:
        sys.exit(f"error: cannot bridge to {cfg.bridge_to}: {why[0]}")
    bridged = Bridged(model, dense, cfg, cfg.bridge_to).to(device)
    params = [*bridged.enc.parameters(), *bridged.dec.parameters()]
    for decay in (True, False):
        optimizer.add_param_group({"params": [p for p in params if (p.dim() == 2) == decay],
                                   "weight_decay": cfg.weight_decay * decay})
    bridged.dense_data = dcfg.data_path, tokenizer
    return bridged


def load_bridged(path: str, device="cpu") -> Bridged:
    """A bridged run's sparse model, dense model and bridges, as trained (for prune.py)."""
    sparse, _, cfg = load_checkpoint(path, device)
    saved = read_checkpoint(path).get("bridges")
    require(saved is not None, f"{path} has no bridges; train one with --bridge_to=DENSE/ckpt.pt")
    bridged = Bridged(sparse, load_checkpoint(saved["dense"], device)[0], cfg, saved["dense"])
    bridged.load(saved, path)
    return bridged.to(device)


@torch.no_grad()
def evaluate_bridges(bridged: Bridged, val, cfg, device, autocast) -> str:
    """On estimate_loss's val batches: both CEs, each site's NMSE and hybrid CE (d->s, s->d)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    bridged.eval()
    with autocast:
        runs = [bridged(*get_batch(val, cfg.block_size, cfg.batch_size, gen, device))[0]
                for _ in range(cfg.eval_iters)]
    bridged.train()
    m = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    col = lambda j: " ".join(f"{v:.3f}" for v in m["sites"][:, j].tolist())
    return (f"bridges val | ce sparse {m['ce']:.3f} dense {m['dense_ce']:.3f} | nmse d->s {col(0)}"
            f" s->d {col(1)} | hybrid ce d->s {col(4)} s->d {col(5)}")


# ======================= below: machinery, read when you need it =======================

# ---- corpus, BPE and token cache: every .py file under a folder, split into train/val by a hash of
# its path; a byte-level BPE trained here, used through tiktoken; uint16 train.bin / val.bin cached
# per corpus and vocab size

MAX_FILE_BYTES = 8 * 2**20  # a bigger .py file is data, skipped (the stdlib's largest: 0.8 MB)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_py_files(root: str) -> list[str]:
    require(os.path.isdir(root),
            f"corpus folder '{root}' not found (or not a folder); pass --data_dir=PATH")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "site-packages")
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    require(found, f"no .py files under '{root}'; pass --data_dir= a folder of Python code")
    return found


def path_hash(relpath: str) -> int:
    return int(hashlib.sha1(os.fsencode(relpath)).hexdigest(), 16)  # a name may not be UTF-8


def is_val_file(relpath: str) -> bool:  # about 1 file in 20, by its path alone: the same anywhere
    return path_hash(relpath) % 20 == 0


def read_corpus(root: str) -> tuple[list[str], list[str]]:
    """(train_docs, val_docs); skipped: unreadable, non-UTF-8, not a file (a FIFO), too big."""
    docs, paths = {}, list_py_files(root)
    for path in paths:
        with suppress(OSError, UnicodeDecodeError):
            if os.path.isfile(path) and os.path.getsize(path) <= MAX_FILE_BYTES:
                docs[os.path.relpath(path, root)] = Path(path).read_text(encoding="utf-8")
    require(len(docs) >= 2, f"corpus '{root}' has {len(docs)} readable .py file(s), fewer than 2")
    val_names = [p for p in docs if is_val_file(p)] or [min(docs, key=path_hash)]  # small corpora
    print(f"corpus: {len(docs) - len(val_names)} train + {len(val_names)} val files from {root} "
          f"({len(paths) - len(docs)} skipped: unreadable, not UTF-8, not a file or too big)")
    return [t for p, t in docs.items() if p not in val_names], [docs[p] for p in val_names]


# Pre-tokenizer: newline+indentation, words with an optional leading space, and runs of
# punctuation kept together (paper 2), so ("  ')  ]]  ], are single chunks. Newlines are never
# part of a punctuation run: otherwise BPE merges "]\n" and never learns "]]".
PRETOKEN_PATTERN = r"""\n[ \t]*| ?\w+| ?[^\s\w]+|[ \t]+(?!\S)|\s"""
# The pre-tokenizer of OpenAI's tinypython_2k, the released models' tokenizer: punctuation runs
# keep trailing newlines and slashes, a letter run keeps one leading non-letter ("(self").
TINYPYTHON_PATTERN = (r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Tokens the tasks answer with: merged first, so they exist whatever the corpus statistics.
REQUIRED_TOKENS = ['("', "('", '")', "')", "]]", "],"]
EOT = "<|endoftext|>"
MAX_PRETOKEN = 1024  # the standard library's longest pre-token has 201 characters


def train_bpe(docs: list[str], vocab_size: int, pattern=PRETOKEN_PATTERN) -> dict[bytes, int]:
    """vocab_size - 257 merges as tiktoken ranks; a merge revisits only the words with its pair."""
    # re lacks \p{L}; regex (a dependency of tiktoken) has it but cuts ours a little differently
    pretoken = regex.compile(pattern) if r"\p" in pattern else re.compile(pattern)
    # pre-tokens cut to MAX_PRETOKEN characters: no input makes merges walk one giant word
    word_counts = Counter(w[i : i + MAX_PRETOKEN] for doc in docs for w in pretoken.findall(doc)
                          for i in range(0, len(w), MAX_PRETOKEN))
    words, freqs = [list(w.encode()) for w in word_counts], list(word_counts.values())
    token_bytes = [bytes([i]) for i in range(256)]
    pair_count, where = Counter(), {}
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_count[pair] += f
            where.setdefault(pair, set()).add(i)

    def merge(pair):
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        changed = set()
        for i in where.pop(pair, ()):
            w, f = words[i], freqs[i]
            out, j = [], 0
            while j < len(w):
                hit = j + 1 < len(w) and (w[j], w[j + 1]) == pair
                out.append(new_id if hit else w[j])
                j += 2 if hit else 1
            for p in zip(w, w[1:]):
                pair_count[p] -= f
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(i)
            changed.update(zip(w, w[1:]), zip(out, out[1:]))
            words[i] = out
        pair_count.pop(pair, None)
        return changed

    for tok in REQUIRED_TOKENS:  # two-byte tokens: one merge each
        merge(tuple(tok.encode()))
    # a heap of (-count, pair) with stale entries skipped on pop; ties break on the pair ids
    heap = [(-c, p) for p, c in pair_count.items() if c > 0]
    heapq.heapify(heap)
    while len(token_bytes) < vocab_size - 1 and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) == -neg:
            for p in merge(pair):
                if pair_count.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
    return {b: rank for rank, b in enumerate(token_bytes)}


def make_encoding(ranks: dict[bytes, int], name="sparse_gpt", pattern=PRETOKEN_PATTERN):
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def save_tokenizer(ranks: dict[bytes, int], path: str):  # tiktoken's format: 'base64 rank' lines
    lines = [f"{base64.b64encode(b).decode()} {ranks[b]}\n" for b in sorted(ranks, key=ranks.get)]
    atomic_write(path, lambda f: f.write("".join(lines).encode()))


def load_tokenizer(path: str, fix: str = "copy a good one there") -> tiktoken.Encoding:
    try:  # fix: what the user should do when the file is missing or damaged
        ranks = {base64.b64decode(tok, validate=True): int(rank)
                 for tok, rank in map(str.split, Path(regular(path)).read_text().splitlines())}
        return make_encoding(ranks)
    except (OSError, ValueError) as e:  # missing, a folder, not text, not 'base64 rank' lines
        sys.exit(f"error: cannot read tokenizer '{path}' ({type(e).__name__}); {fix}")


def load_data_gym_tokenizer(folder: str) -> tiktoken.Encoding:
    """tinypython_2k as the released models ship it: GPT-2 style vocab.bpe + encoder.json."""
    files = [os.path.join(folder, f) for f in ("vocab.bpe", "encoder.json")]
    try:  # the file hashes key tiktoken's cache, so a replaced file is never read stale
        hashes = [hashlib.sha256(open(regular(f), "rb").read()).hexdigest() for f in files]
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(*files, *hashes)
    except (OSError, AssertionError, KeyError, ValueError) as e:
        sys.exit(f"error: no tinypython tokenizer in {folder} ({type(e).__name__}): download its "
                 "vocab.bpe and encoder.json there (README: Prune the paper's released models)")
    return make_encoding(ranks, "tinypython_2k", TINYPYTHON_PATTERN)


CACHE_FILES = ("tokenizer.tiktoken", "train.bin", "val.bin")  # sha1.txt, written last: their sha1


def sha1_of(folder: str, *names: str) -> str:
    data = b"".join(Path(regular(os.path.join(folder, n))).read_bytes() for n in names)
    return hashlib.sha1(data).hexdigest()


def cache_folder(cache_dir: str, root: str, *made_with) -> str:
    """cache_dir/<corpus>-<hash of every file's path and size, and of made_with>."""
    key = hashlib.sha1("|".join(map(str, (root, *made_with))).encode())
    for path in list_py_files(root):
        key.update(os.fsencode(f"{os.path.relpath(path, root)}:{os.path.getsize(path)}"))
    return os.path.abspath(f"{cache_dir}/{os.path.basename(root)}-{key.hexdigest()[:10]}")


def write_tokens(path: str, docs: list[str], enc: tiktoken.Encoding) -> int:
    """The documents' tokens, each followed by end-of-text, as uint16 in path; returns the count."""
    ids = [t for doc in enc.encode_ordinary_batch(docs) for t in doc + [enc.eot_token]]
    atomic_write(path, np.array(ids, dtype=np.uint16).tofile)
    return len(ids)


def prepare_data(cfg) -> tuple[str, tiktoken.Encoding]:
    """Returns (folder with train.bin/val.bin/tokenizer.tiktoken, tokenizer), building them once."""
    root = os.path.abspath(cfg.data_dir or stdlib_dir())
    folder = cache_folder(cfg.cache_dir, root, cfg.vocab_size, PRETOKEN_PATTERN, REQUIRED_TOKENS)
    tok_path = os.path.join(folder, "tokenizer.tiktoken")
    with suppress(OSError, ValueError):  # a cache missing or unlike its sha1.txt is rebuilt
        if Path(regular(f"{folder}/sha1.txt")).read_text() == sha1_of(folder, *CACHE_FILES):
            print(f"data: using cached tokens in {folder}")
            return folder, load_tokenizer(tok_path, f"delete the folder {folder} to rebuild it")
    t0 = time.time()
    docs = read_corpus(root)  # (train, val)
    ranks = train_bpe(docs[0], cfg.vocab_size)
    if len(ranks) + 1 < cfg.vocab_size:  # BPE ran out of pairs to merge
        sys.exit(f"error: corpus '{root}' yields only {len(ranks) + 1} tokens; lower --vocab_size")
    os.makedirs(folder, exist_ok=True)
    save_tokenizer(ranks, tok_path)
    enc = make_encoding(ranks)
    print(f"tokenizer: {len(ranks) + 1} tokens trained in {(t1 := time.time()) - t0:.1f}s")
    n = [write_tokens(f"{folder}/{s}.bin", d, enc) for s, d in zip(("train", "val"), docs)]
    atomic_write(f"{folder}/sha1.txt", lambda f: f.write(sha1_of(folder, *CACHE_FILES).encode()))
    print(f"data: {n[0]:,} train + {n[1]:,} val tokens, encoded in {time.time() - t1:.1f}s, "
          f"cached in {folder}")
    return folder, enc


# ---- checkpoints and resume: atomic writes, loading a trained model, a run's start (resume or not)
# and its stop (Ctrl-C)


def atomic_write(path: str, write):  # write(f) fills path.tmp, renamed over path: old or new
    write_files_together({path: write})


def write_files_together(writes: dict):
    """path -> write(f), all or none: each fills path.tmp, synced, renamed once all are written.
    On failure the .tmp files go, the old files stay; a refused write raises OSError naming it."""
    try:
        for path, write in writes.items():
            with open(path + ".tmp", "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for path in writes:
            os.replace(path + ".tmp", path)
    except BaseException as e:
        for p in writes:
            Path(p + ".tmp").unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise OSError(getattr(e, "errno", None), getattr(e, "strerror", None)
                          or "cannot write (is the disk full?)", path) from e
        raise


def regular(path: str) -> str:
    """path, unless it is a FIFO, device or socket (a read could block forever): refused."""
    require(os.path.isfile(path) or os.path.isdir(path) or not os.path.exists(path),
            f"'{path}' is a FIFO, device or socket, not a regular file; put a file")
    return path


def save_checkpoint(path, model, optimizer, cfg, iter_num, best_val_loss, data_path, bridges=None):
    """Atomic. Only tensors, dicts, lists, numbers, strings, None: it loads weights_only=True."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": dict(cfg),
            "iter_num": iter_num, "best_val_loss": best_val_loss, "data_path": data_path,
            "tokenizer_sha1": data_path and sha1_of(data_path, "tokenizer.tiktoken"),
            "bridges": bridges}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def read_checkpoint(path: str) -> dict:
    require(os.path.exists(regular(path)), f"checkpoint '{path}' not found; train one first")
    try:  # weights_only: a pickled object could run any code when loaded
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = "it holds code, not just data: refused" if "GLOBAL" in str(e) else type(e).__name__
        sys.exit(f"error: cannot read checkpoint '{path}' ({why}); retrain or pick another")
    require(isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt.get("config"), dict),
            f"'{path}' is not a sparse_gpt checkpoint (no model/config)")
    if wrong := [f"{k}={v!r}" for k, v in ckpt["config"].items()
                 if k not in DEFAULTS or not same_kind(v, DEFAULTS[k])]:
        sys.exit(f"error: '{path}' has config {wrong[0]}, a key this code does not know or a value "
                 "of the wrong type; retrain, or use the code that wrote it")
    return ckpt


def refuse_nonfinite(model, path: str, fix: str):  # names the first tensor with a NaN or an inf
    if bad := next((n for n, t in model.state_dict().items() if not t.isfinite().all()), None):
        sys.exit(f"error: '{path}' holds NaN or infinite weights in {bad}; {fix}")


def check_memory(cfg, device: torch.device, training: bool):
    """Refuses, before allocating, a model that cannot fit: 4 bytes a weight, twice to load, 4
    times to train (gradient, Adam's moments) plus a batch's logits: a lower bound."""
    hd = (cfg.n_head or cfg.d_model // max(cfg.d_head, 1)) * cfg.d_head
    weights = (cfg.vocab_size * (2 * cfg.d_model + cfg.vocab_size * cfg.bigram_table) + cfg.n_layer
               * cfg.d_model * (4 * hd + 2 * cfg.d_mlp) + cfg.block_size * cfg.d_model)
    logits = training * cfg.batch_size * cfg.block_size * cfg.vocab_size
    have = (torch.cuda.mem_get_info(device)[1] if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if (need := 4 * (weights * (4 if training else 2) + logits)) > have:
        sys.exit(f"error: this model needs at least {need / 2**30:,.1f} GiB, more than the "
                 f"{have / 2**30:,.1f} GiB of this {device.type}; lower d_model, d_mlp, n_layer, "
                 "vocab_size, block_size or batch_size")


def checkpoint_file(path: str) -> str:
    """A run's folder (out/tiny) means its ckpt.pt, a released model's folder its final_model.pt."""
    if not os.path.isdir(path):
        return path
    return os.path.join(path, "ckpt.pt" if os.path.exists(os.path.join(path, "ckpt.pt"))
                        else "final_model.pt")


def load_checkpoint(path: str, device="cpu") -> tuple[GPT, tiktoken.Encoding, Config]:
    """A run (its folder or ckpt.pt) or a released model (its folder or final_model.pt)."""
    pick_device(torch.device(device).type)  # one line, not torch's error, when it is missing
    path = checkpoint_file(path)
    folder = os.path.dirname(path) or "."
    if os.path.basename(path) == "final_model.pt":
        (model, cfg), tokenizer = load_release(folder), load_data_gym_tokenizer(folder)
    else:
        ckpt = read_checkpoint(path)
        cfg = Config({**DEFAULTS, **ckpt["config"]}, data_path=ckpt.get("data_path", ""))
        check_memory(cfg, torch.device("cpu"), training=False)
        try:
            model = GPT(cfg)
            model.load_state_dict(ckpt["model"])
        except (RuntimeError, TypeError, ValueError, AttributeError):
            sys.exit(f"error: checkpoint '{path}' does not match this model code; retrain it")
        fix = f"copy the run's own there (its cache {cfg.data_path} has one)"
        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.tiktoken"), fix)
        require(ckpt.get("tokenizer_sha1") in (None, "", sha1_of(folder, "tokenizer.tiktoken")),
                f"{folder}/tokenizer.tiktoken is not the tokenizer {path} was trained with; {fix}")
    refuse_nonfinite(model, path, "the run diverged: train it again with a lower --learning_rate")
    require(tokenizer.n_vocab == cfg.vocab_size, f"the tokenizer beside '{path}' has "
            f"{tokenizer.n_vocab} tokens, the model {cfg.vocab_size}; put the model's own there")
    return model.to(device).eval(), tokenizer, cfg


# what --init_from=resume may change: none of it touches the model, the data or the schedule
RESUME_MAY_CHANGE = ("out_dir cache_dir init_from overwrite device compile eval_interval "
                     "eval_iters log_interval bench").split()


def start_run(cfg, ckpt, model, optimizer, device, rank: int, world: int, bridged=None) -> tuple:
    """train()'s setup, checked before out_dir is written: resumed state, tokens, tokenizer copy."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    iter_num, best_val_loss, trained_on, lock = 0, math.inf, None, None
    if cfg.init_from == "resume":
        ckpt = ckpt or read_checkpoint(ckpt_path)
        saved = absolute_paths(Config(DEFAULTS, **ckpt["config"]))  # older checkpoints: relative
        if changed := [k for k in DEFAULTS if k not in RESUME_MAY_CHANGE and saved[k] != cfg[k]]:
            sys.exit(f"error: --init_from=resume continues the run's own config; drop the flags "
                     f"that change it ({', '.join(changed)}), or start a new run elsewhere")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if bridged is not None:
                bridged.load(ckpt["bridges"], ckpt_path)
            iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
            trained_on = ckpt.get("data_path", "")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            sys.exit(f"error: cannot resume {ckpt_path} ({type(e).__name__}); start a new run")
        refuse_nonfinite(model, ckpt_path, "start a new run with a lower --learning_rate")
        print(f"resuming from {ckpt_path} at step {iter_num}")
        ckpt.clear()  # loaded: free its tensors now, not when the caller's reference goes
    require(cfg.init_from == "resume" or cfg.overwrite or not os.path.exists(ckpt_path),
            f"{ckpt_path} already holds a model; continue it with --init_from=resume, or pass "
            "another --out_dir, or --overwrite=True to replace it")
    if rank > 0:  # DDP: rank 0 builds the token cache while the others wait, then they read it
        dist.barrier()
    data_path, tokenizer = bridged.dense_data if bridged else prepare_data(cfg)
    if rank == 0 and world > 1:
        dist.barrier()
    require(trained_on is None or os.path.basename(trained_on) == os.path.basename(data_path),
            f"the corpus or vocabulary differs from the one {ckpt_path} was trained on "
            f"({trained_on}); resume with the same corpus")
    data = {s: np.memmap(f"{data_path}/{s}.bin", np.uint16, "r") for s in ("train", "val")}
    if short := [f"{s} split has {len(a)}" for s, a in data.items() if len(a) < cfg.block_size + 2]:
        sys.exit(f"error: {short[0]} tokens, fewer than block_size+1; add code or lower block_size")
    if rank == 0:  # rank 0 alone writes files, holding the folder's lock (freed by train)
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock = claim_folder(cfg.out_dir)
        Path(ckpt_path + ".tmp").unlink(missing_ok=True)  # left by a killed save
        old = os.path.join(cfg.out_dir, "circuits")
        if cfg.overwrite and cfg.init_from == "scratch" and os.path.exists(old):
            shutil.rmtree(old + ".old", ignore_errors=True)  # the replaced model's: aside
            os.replace(old, old + ".old")
        tok = Path(data_path, "tokenizer.tiktoken").read_bytes()
        atomic_write(os.path.join(cfg.out_dir, "tokenizer.tiktoken"), lambda f: f.write(tok))
    print(f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, {n_weights(model) / 1e6:.2f}M "
          f"sparse weights -> {n_kept(model, cfg):,} nonzero at density {cfg.density:g} "
          f"(embeddings {density_at(cfg.max_iters, cfg, embed=True):g})")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return iter_num, best_val_loss, data, tokenizer, data_path, lock


def absolute_paths(cfg) -> Config:  # so that a checkpoint resumes from any working folder
    return Config(cfg, data_dir=cfg.data_dir and os.path.abspath(cfg.data_dir),
                  cache_dir=os.path.abspath(cfg.cache_dir))


def claim_folder(folder: str):
    """An OS lock on folder/run.lock, returned open: it ends with the process however that ends,
    and while it lives a second run into the folder is refused."""
    lock = open(regular(os.path.join(folder, "run.lock")), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"error: {folder} is in use by another run; wait for it or pass another --out_dir")
    return lock


@contextmanager
def ctrl_c_finishes_the_step(world: int, lock):
    """The first Ctrl-C or SIGTERM sets stop.requested to its number: finish the step, save, exit
    130 or 143. A second aborts at once (one process only: under torchrun every rank sees two)."""
    stop = SimpleNamespace(requested=0)

    def on_signal(signum, frame):
        if stop.requested and world == 1:
            raise KeyboardInterrupt
        stop.requested = signum
        print(f"\n{signal.Signals(signum).name}: finish the step, saving, exiting (again: abort)")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    together = True  # every rank left at the same step: the end, or train's exits (stop, NaN)
    try:
        yield stop
    except BaseException as e:
        together = isinstance(e, SystemExit)
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if lock:
            Path(lock.name).unlink(missing_ok=True)
            lock.close()
        if world > 1:
            if together:  # gloo's threads must free the last all_reduce's tensor (taking the
                dist.barrier()  # GIL) before the teardown joins them holding it: a deadlock seen
            dist.destroy_process_group()


# ---- the paper's released models (openai/circuit_sparsity): a folder with beeg_config.json (their
# GPTConfig), final_model.pt (a state_dict) and tinypython's encoder.json and vocab.bpe

# their field -> our key, each required but d_head, d_mlp and afrac (derived when absent);
# refused: (the one value we run, their default)
RELEASE_FIELDS = dict(vocab_size="vocab_size", block_size="block_size", n_layer="n_layer",
                      d_model="d_model", n_head="n_head", d_head="d_head", d_mlp="d_mlp",
                      bias="bias", activation_type="activation", afrac="afrac",
                      afrac_loctypes="afrac_nodes", enable_bigram_table="bigram_table",
                      sink="attn_sink")
RELEASE_REFUSED = dict(rms_norm=(True, False), residual_activation_type=("identity",) * 2,
                       tied_unembed=(False, True), d_pos_emb=(None, None),
                       use_tied_aux_matrix=(False, False), tokenizer_name=("tinypython_2k",) * 2)
RELEASE_IGNORED = ("dropout ln_bias debug_nans grad_checkpointing flash enable_sparse_kernels "
                   "learnable_bigram_table dropout_cat_pos_emb sinusoidal_cat_pos_emb").split()
# their state_dict names -> ours (transformer.h.3.ln_1.weight -> blocks.3.attn_norm.weight)
RELEASE_NAMES = {"transformer.h.": "blocks.", ".ln_1.": ".attn_norm.", ".ln_2.": ".mlp_norm.",
                 "attn_imp.sink_logit": "sink", "transformer.ln_f.": "final_norm.",
                 "transformer.": "", "bigram_table": "bigram.weight"}
RELEASE_LOCATIONS = dict(zip("attn_in attn_q attn_k attn_v attn_out mlp_in mlp_neuron mlp_out"
                             .split(), NODE_LOCATIONS))  # their afrac_loctypes -> our locations


def release_config(beeg: dict, where: str) -> Config:
    """Their GPTConfig as our flat config; what we cannot run exactly is a one-line error."""
    beeg = {"d_mlp" if k == "n_mlp" else k: v for k, v in beeg.items()}  # older files: n_mlp
    wrong = [f"{k} is missing" for k in RELEASE_FIELDS
             if k not in beeg and k not in ("d_head", "d_mlp", "afrac")]
    wrong += [f"{k}={v!r} is not of type {type(DEFAULTS[ours]).__name__}"
              for k, ours in RELEASE_FIELDS.items()
              if (v := beeg.get(k)) is not None and not same_kind(v, DEFAULTS[ours])]
    if wrong:
        sys.exit(f"error: {where}: {wrong[0]}; fix the file, or download it again")
    cfg = Config(DEFAULTS, pos_embed=True, norm_eps=torch.finfo(torch.float32).eps, data_path="")
    cfg.update({ours: beeg.get(k) for k, ours in RELEASE_FIELDS.items()})
    locations = [t for t in cfg.afrac_nodes.split(",") if t] * (cfg.afrac is not None)
    refused = [f"{k}={v!r}" for k, (ok, default) in RELEASE_REFUSED.items()
               if (v := beeg.get(k, default)) != ok]
    refused += [k for k in beeg if k not in {*RELEASE_FIELDS, *RELEASE_REFUSED, *RELEASE_IGNORED}]
    refused += [f"afrac_loctypes {t}" for t in locations if t not in RELEASE_LOCATIONS]
    refused += [f"activation_type={cfg.activation!r}"] * (cfg.activation not in ("gelu", "relu"))
    if refused:
        sys.exit(f"error: {where}: {refused[0]} is not supported by this loader")
    check_rules(cfg, {"n_head": COUNT}, f"{where}: ")  # it divides d_model below
    cfg.update(d_head=cfg.d_head or cfg.d_model // cfg.n_head, d_mlp=cfg.d_mlp or 4 * cfg.d_model,
               afrac=cfg.afrac if locations else 1.0,
               afrac_nodes=",".join(RELEASE_LOCATIONS[t] for t in locations) or "all")
    check_rules(cfg, {k: r for k, r in RULES.items() if k in RELEASE_FIELDS.values()}, f"{where}: ")
    return cfg


def load_release(folder: str) -> tuple[GPT, Config]:
    """A released model as our GPT, its logits equal to theirs (float32)."""
    cfg_path, sd_path = os.path.join(folder, "beeg_config.json"), f"{folder}/final_model.pt"
    try:
        cfg = release_config(json.loads(Path(regular(cfg_path)).read_text()), cfg_path)
        check_memory(cfg, torch.device("cpu"), training=False)
        saved = torch.load(regular(sd_path), map_location="cpu", weights_only=True)
        rename = re.compile("|".join(map(re.escape, RELEASE_NAMES)))
        sd = {rename.sub(lambda m: RELEASE_NAMES[m[0]], k): t.float() for k, t in saved.items()
              if not re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", k)}  # a causal-mask buffer
    except Exception as e:  # missing, damaged, not a flat dict of named tensors (a state_dict)
        sys.exit(f"error: cannot read {cfg_path} and final_model.pt ({type(e).__name__}); download "
                 "them into one folder (README: Prune the paper's released models)")
    if not cfg.bigram_table:
        sd.pop("bigram.weight", None)  # a buffer their model then ignores
    bias = sd.pop("final_logits_bias", torch.zeros(1))
    if bias.any():  # added to every logit = added to every row of the bigram table
        cfg["bigram_table"] = True
        sd["bigram.weight"] = sd.get("bigram.weight", torch.zeros(cfg.vocab_size, 1)) + bias
    model = GPT(cfg)
    want = model.state_dict()
    if bad := sorted(set(want) ^ set(sd)) + [k for k in sd if k in want
                                             and sd[k].shape != want[k].shape]:
        sys.exit(f"error: {sd_path} does not fit its beeg_config.json (tensor {bad[0]})")
    model.load_state_dict(sd)
    return model, cfg


# ---- devices and DDP (torchrun)

TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def pick_device(name: str) -> torch.device:
    seen = dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available(), cpu=True)
    if name == "auto":
        name = next(n for n, ok in seen.items() if ok)
    require(seen.get(name), f"--device={name} but no such device is visible; use --device=cpu")
    return torch.device(name)


def setup_ddp(device: torch.device, batch_size: int) -> tuple[int, int, torch.device]:
    """Under torchrun (RANK set) joins the process group: NCCL, one GPU per process, or gloo."""
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    require(batch_size % world == 0, f"batch_size={batch_size} is not a multiple of {world} "
            "processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def mean_over_ranks(loss: float, stop: bool, world: int, device) -> tuple[float, bool]:
    """The global batch's loss and whether any rank saw Ctrl-C (so all stop at the same step), in
    one tensor: one all_reduce, a collective every rank must join, per step instead of two."""
    both = torch.tensor([loss / world, stop], dtype=torch.float64, device=device)
    dist.all_reduce(both)
    return both[0].item(), both[1].item() > 0


def bf16_autocast(device: torch.device):  # bfloat16 matmuls on CUDA (tensor cores)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---- command line


def up_to(most: int) -> tuple:  # a count with a cap, so that no typo runs for days
    return (lambda v, c: 1 <= v <= most, f"at least 1 and at most {most:,}")


# What each value must be, checked after presets and flags: key -> (test(value, cfg), rule).
COUNT, POSITIVE = (lambda v, c: v >= 1, "at least 1"), (lambda v, c: 0 < v < math.inf, "> 0")
FRACTION, SHARE = (lambda v, c: 0 < v <= 1, "in (0, 1]"), (lambda v, c: 0 <= v <= 1, "in [0, 1]")
NONNEG = (lambda v, c: 0 <= v < math.inf, ">= 0")
SEED = (lambda v, c: 0 <= v < 2**32, "in [0, 2**32)")
DEVICE = (lambda v, c: v in ("auto", "cpu", "cuda", "mps"), "auto, cpu, cuda or mps")
RULES = dict(
    out_dir=(lambda v, c: v != "", "a folder"),
    init_from=(lambda v, c: v in ("scratch", "resume"), "scratch or resume"),
    vocab_size=(lambda v, c: 263 <= v <= 65536, "in [263, 65536] (6 task tokens; uint16 ids)"),
    n_layer=COUNT, d_model=COUNT, d_mlp=COUNT, block_size=COUNT, afrac=FRACTION, n_head=NONNEG,
    d_head=(lambda v, c: v >= 1 and (c.n_head or c.d_model % v == 0),
            "at least 1 and, unless n_head is set, a divisor of d_model"),
    seed=SEED, density=FRACTION, embed_ratio=POSITIVE, anneal_frac=SHARE, warmup_frac=SHARE,
    min_per_neuron=(lambda v, c: 0 <= v <= c.density * c.d_model, "in [0, density * d_model]"),
    c_nmse=NONNEG, c_kl=NONNEG, hybrid_frac=FRACTION, batch_size=COUNT, max_iters=up_to(10**9),
    learning_rate=POSITIVE, adam_eps=POSITIVE, weight_decay=NONNEG, eval_interval=COUNT,
    device=DEVICE, eval_iters=up_to(10**5), log_interval=COUNT,
    activation=(lambda v, c: v in ("gelu", "relu"), "gelu or relu"),
    afrac_nodes=(lambda v, c: v == "all" or set(v.split(",")) <= set(NODE_LOCATIONS),
                 "all or some of " + ",".join(NODE_LOCATIONS)))


def parse_value(text: str, default):
    if isinstance(default, bool):  # a KeyError for anything else
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
            text.lower()]
    return os.path.expanduser(text) if isinstance(default, str) else type(default)(text)


def parse_config(argv, defaults=DEFAULTS, presets=PRESETS, rules=RULES) -> Config:
    """--key=value over --preset=NAME over defaults, checked against the rules (all scripts)."""
    if {"-h", "--help"} & set(argv):  # every key, its default and its comment in DEFAULTS
        owner = [m for m in list(sys.modules.values())
                 if getattr(m, "__dict__", {}).get("DEFAULTS") is defaults]
        text = open(owner[0].__file__).read().split("DEFAULTS = dict(")[1] if owner else ""
        notes = dict(re.findall(r"^    (\w+)=.*?# (.*)$", text.split("\n)")[0], re.M))
        print("\n".join([f"  {f'--{k}={v}':<26} {notes.get(k, '')}" for k, v in defaults.items()]
                        + [f"presets (--preset=NAME): {' '.join(presets or ())}"] * bool(presets)))
        sys.exit(0)
    pairs = {}
    for arg in argv:
        require(arg.startswith("--") and "=" in arg, f"expected --key=value, got '{arg}'")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:  # did you mean: the nearest spelling, if any is near
            near = [f" did you mean --{k}?" for k in difflib.get_close_matches(key, defaults, 1)]
            sys.exit(f"error: unknown config key '{key}';{''.join(near)} valid keys: "
                     + " ".join(defaults))
        try:
            pairs[key] = parse_value(text, defaults[key])
        except (KeyError, ValueError):
            kind = type(defaults[key]).__name__
            sys.exit(f"error: --{key}={text} is not a valid {kind} (default {defaults[key]!r})")
    cfg = Config(defaults)
    if presets:
        if (name := pairs.get("preset", cfg.preset)) == "auto":
            name = "gpu" if torch.cuda.is_available() else "cpu"
        require(name in presets, f"unknown preset '{name}'; valid presets: {' '.join(presets)}")
        cfg.update(presets[name], preset=name)
    cfg.update(pairs)
    check_rules(cfg, rules)
    return cfg


def check_rules(cfg, rules, where=""):
    for key, (ok, rule) in rules.items():
        require(key not in cfg or ok(cfg[key], cfg),
                f"{where}{key}={cfg.get(key)} is invalid: it must be {rule}")


def same_kind(value, default) -> bool:  # the default's type (an int where a float belongs too)
    return type(value) is type(default) or type(default) is float and type(value) is int


def cli(main):
    """main(argv) run so that Ctrl-C exits 130, SIGTERM (a scheduler, docker stop) 143, both
    unwinding (no half-written file), and a file the system refuses is one line naming it."""
    def run(argv=None):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:  # python tasks.py | head: the reader has all it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no 2nd error
            sys.exit(0)
        except OSError as e:
            where = f": '{str(e.filename).removesuffix('.tmp')}'" if e.filename else ""
            code = f"error: {e.strerror or e}{where}; fix that path or pass another"
        except SystemExit as e:
            code = e.code
        rank = os.environ.get("RANK", "0") if TORCHRUN_VARS <= set(os.environ) else "0"
        sys.exit(1 if isinstance(code, str) and rank != "0" else code)  # rank 0 alone says why
    return run


# ---- benchmark: what weight and activation sparsity cost per step (--bench=True)

def bench(cfg, warmup=3, rounds=10):
    """Step times at the target density and of the dense twin (density=1, afrac=1), interleaved."""
    device = pick_device(cfg.device)
    check_memory(cfg, device, training=True)
    cuda, autocast = device.type == "cuda", bf16_autocast(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = {}
    for name, vcfg in {"sparse": cfg, "dense": Config(cfg, density=1.0, afrac=1.0)}.items():
        torch.manual_seed(cfg.seed)
        model = GPT(vcfg).to(device)
        project_weights(model, vcfg.max_iters, vcfg)  # the target densities
        fmodel = torch.compile(model) if vcfg.compile else model
        runs[name] = (model, fmodel, make_optimizer(model, vcfg, device.type), vcfg, [])
    x, y = torch.randint(cfg.vocab_size, (2, cfg.batch_size, cfg.block_size),
                         generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    for _ in range(warmup + rounds):
        for model, fmodel, optimizer, vcfg, times in runs.values():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            train_step(model, fmodel, optimizer, x, y, autocast)
            sync()
            t1 = time.perf_counter()
            project_weights(model, vcfg.max_iters, vcfg)
            sync()
            t2 = time.perf_counter()
            times.append((t2 - t0, t2 - t1, torch.cuda.max_memory_allocated(device) if cuda else 0))
    tokens = cfg.batch_size * cfg.block_size
    print(f"bench: {cfg.preset} preset on {device.type}, {tokens} tokens/step, median of {rounds} "
          "steps after warmup, variants interleaved")
    med = {name: np.median(times[warmup:], axis=0) for name, (*_, times) in runs.items()}
    for name, (step, proj, peak) in med.items():
        print(f"{name:14s} | step {1e3 * step:7.1f} ms | projection {1e3 * proj:6.1f} ms "
              f"({proj / step:5.1%}) | {tokens / step / 1e3:6.1f}k tok/s"
              + f" | peak {peak / 2**30:.2f} GiB" * cuda)
    print(f"ratio sparse / dense: {med['sparse'][0] / med['dense'][0]:.2f}")


@cli
def main(argv):
    cfg, ckpt = parse_config(argv), None
    if cfg.init_from == "resume":  # the run's own config, changed only by the flags given now
        ckpt = read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        defaults = {k: ckpt["config"].get(k, v) for k, v in DEFAULTS.items()}
        cfg = parse_config(argv, defaults | {"out_dir": cfg.out_dir}, presets=None)
    require("RANK" not in os.environ or TORCHRUN_VARS <= set(os.environ), "RANK is set but "
            "torchrun's other variables (LOCAL_RANK, MASTER_ADDR, ...) are not; unset RANK and "
            "WORLD_SIZE, or launch with torchrun")
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 alone logs
        sys.stdout = open(os.devnull, "w")
    print("config: " + " ".join(f"{k}={v}" for k, v in cfg.items()))
    return bench(cfg) if cfg.bench else train(cfg, ckpt)


if __name__ == "__main__":
    main()
