"""The test suite: python -m pytest -q test_all.py (CPU, a few minutes on 2 cores)."""

import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

import prune
import sparse_gpt as sg
import tasks

# torch's own torch/utils/mkldnn.py calls the deprecated torch.jit.script_method when the first
# torch.compile imports it: not our code, and nothing we call is deprecated
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# -----------------------------------------------------------------------------
# shared fixtures: a small corpus of real stdlib files and a tokenizer trained on it


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """About 1 MB of the standard library: enough for a 512-token BPE and a tiny model."""
    root = tmp_path_factory.mktemp("corpus")
    files = [f for f in sg.list_py_files(sg.stdlib_dir()) if "/test" not in f]
    picked, size = 0, 0
    for path in files[::7]:
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        dest = root / os.path.relpath(path, sg.stdlib_dir())
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        size += len(text)
        picked += 1
        if size > 1_000_000:
            break
    return str(root)


@pytest.fixture(scope="session")
def small_tokenizer(corpus_dir):
    train, _ = sg.read_corpus(corpus_dir)
    return sg.make_encoding(sg.train_bpe(train, 512))


def tiny_cfg(tmp_path, corpus_dir, **overrides):
    argv = ["--preset=tiny", f"--data_dir={corpus_dir}", f"--out_dir={tmp_path / 'out'}",
            f"--cache_dir={tmp_path.parent / 'cache'}", "--vocab_size=512"]
    cfg = sg.parse_config(argv)
    cfg.update(overrides)
    return cfg


def small_model(**kw) -> sg.GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=64, n_layer=2, d_model=32, d_head=8, d_mlp=64, block_size=16)
    return sg.GPT(sg.Config(sg.DEFAULTS, **{**args, **kw}))


def project_at_target(model, density, j=4, embed_density=None):
    """project_weights at the end of annealing: hidden matrices keep `density`, embeddings
    `embed_density` (default: the same)."""
    ratio = (embed_density or density) / density
    cfg = sg.Config(sg.DEFAULTS, density=density, min_per_neuron=j, embed_ratio=ratio,
                    max_iters=1, anneal_frac=0.0)
    sg.project_weights(model, 1, cfg)


# -----------------------------------------------------------------------------
# weight sparsity


def test_every_matrix_keeps_exact_topk_and_neuron_floor():
    model = small_model()
    with torch.no_grad():  # starve one neuron and one q channel so only the floor saves them
        model.blocks[0].mlp.c_fc.weight[5].mul_(1e-6)
        model.blocks[1].attn.c_attn.weight[3].mul_(1e-6)
        model.blocks[0].mlp.c_proj.weight[:, 7].mul_(1e-6)
    density, j = 0.2, 4
    project_at_target(model, density, j)
    for name, w, floor_dim in sg.sparse_matrices(model):
        assert (w != 0).sum().item() == math.ceil(density * w.numel()), name
        if floor_dim is not None:
            assert (w != 0).sum(dim=floor_dim).min().item() >= j, name
    assert (model.blocks[0].mlp.c_fc.weight[5] != 0).sum() == j
    assert (model.blocks[1].attn.c_attn.weight[3] != 0).sum() == j
    assert (model.blocks[0].mlp.c_proj.weight[:, 7] != 0).sum() == j
    # so sparse that the floors alone need more than density allows: the floors win
    project_at_target(model, 0.05, j)
    c_attn = model.blocks[0].attn.c_attn.weight
    # c_attn has 3 x 32 = 96 rows (q, k, v channels): the floors alone keep 96 x 4
    assert ((c_attn != 0).sum(dim=1) == j).all() and (c_attn != 0).sum() == 96 * j
    assert model.bigram.weight.numel() == 64 * 64  # the bigram table is not projected
    names = {n for n, _, _ in sg.sparse_matrices(model)}
    assert "wte.weight" in names and "lm_head.weight" in names and "bigram.weight" not in names


def test_projection_keeps_largest_magnitudes():
    w = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    mask = sg.topk_mask(w, 3, None, 0)
    assert mask.tolist() == [[False, True, False], [True, False, True]]


def sort_based_topk_mask(w, k, floor_dim, j):
    """The slow reference: torch.topk per neuron for the floors, then over the whole matrix."""
    score = w.abs()
    if floor_dim is not None:
        idx = score.topk(j, dim=floor_dim).indices
        score = score.scatter(floor_dim, idx, float("inf"))
        k = max(k, idx.numel())
    keep = score.view(-1).topk(k).indices
    return torch.zeros(w.numel(), dtype=torch.bool).index_fill_(0, keep, True).view_as(w)


def test_fast_projection_keeps_the_same_weights_as_sort_based_topk():
    torch.manual_seed(0)
    for shape, floor_dim in [((96, 32), 1), ((32, 128), 0), ((300, 64), None), ((64, 64), 1)]:
        for density in (0.02, 0.1, 0.25, 0.6):
            w = torch.randn(shape) * torch.rand(shape[0], 1)  # rows of very different scale
            k = math.ceil(density * w.numel())
            fast = sg.topk_mask(w, k, floor_dim, 4)
            assert torch.equal(fast, sort_based_topk_mask(w, k, floor_dim, 4)), (shape, density)


def test_anneal_and_sharkfin_lr_at_chosen_steps():
    cfg = sg.Config(sg.DEFAULTS)
    cfg.update(max_iters=1000, density=0.25, anneal_frac=0.5, warmup_frac=0.01, learning_rate=1e-2)
    assert sg.density_at(0, cfg) == 1.0
    assert sg.density_at(250, cfg) == pytest.approx(0.625)  # halfway: 1 - 0.75 / 2
    assert sg.density_at(500, cfg) == pytest.approx(0.25)
    assert sg.density_at(900, cfg) == pytest.approx(0.25)
    assert sg.lr_at(0, cfg) == pytest.approx(1e-3)  # warmup: 1/10 of the way
    assert sg.lr_at(9, cfg) == pytest.approx(1e-2 / math.sqrt(sg.density_at(9, cfg)))
    # after annealing: linear decay times 1/sqrt(0.25) = 2
    assert sg.lr_at(505, cfg) == pytest.approx(1e-2 * (1000 - 505) / 990 * 2)
    lrs = [sg.lr_at(i, cfg) for i in range(1000)]
    peak = max(range(1000), key=lambda i: lrs[i])
    assert 10 < peak <= 500  # the shark fin: rises with sparsity after warmup, then decays


def test_adam_sees_a_gradient_of_rms_one_every_step():
    model = small_model()
    x = torch.randint(64, (2, 16))
    model(x, x)[1].backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).pow(2).mean().sqrt()
    assert raw < 0.1  # tiny raw gradients: a clip at 1 would never act
    rms = sg.normalize_grad_rms_(model.parameters())
    assert rms.item() == pytest.approx(raw.item(), rel=1e-5)
    seen = torch.cat([p.grad.flatten() for p in model.parameters()]).pow(2).mean().sqrt()
    assert seen.item() == pytest.approx(1.0, rel=1e-3)  # +1e-5 in the divisor
    p = torch.nn.Parameter(torch.zeros(100))
    p.grad = torch.full((100,), 3.0)  # large gradients are scaled down to RMS 1 too
    sg.normalize_grad_rms_([p])
    assert p.grad.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_bigram_table_starts_official_and_is_never_decayed():
    model = small_model()
    table = model.bigram.weight
    assert table.min() >= 0 and table.max() < 0.02 and table.std() > 0
    opt = sg.make_optimizer(model, sg.Config(sg.DEFAULTS), "cpu")
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(table) not in decay and id(model.wte.weight) in decay
    before = table.detach().clone()
    table.grad = torch.zeros_like(table)  # no gradient: only weight decay could move it
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(table, before)


def test_embeddings_keep_their_own_denser_count():
    model = small_model()
    project_at_target(model, 0.05, 4, 0.2)
    for name, w, floor_dim in sg.sparse_matrices(model):
        want = 0.2 if name in sg.EMBEDDINGS else 0.05
        assert (w != 0).sum().item() >= math.ceil(want * w.numel()), name
        if name in sg.EMBEDDINGS:  # no floor on embeddings: exactly their own count
            assert (w != 0).sum().item() == math.ceil(0.2 * w.numel()), name
    cfg = sg.Config(sg.DEFAULTS, max_iters=100, density=0.05, embed_ratio=4.0, anneal_frac=0.5)
    assert sg.density_at(0, cfg, embed=True) == 1.0
    assert sg.density_at(50, cfg, embed=True) == pytest.approx(0.2)
    assert sg.density_at(50, cfg) == pytest.approx(0.05)
    assert sg.density_at(99, sg.Config(cfg, embed_ratio=100.0), embed=True) == 1.0  # capped


# -----------------------------------------------------------------------------
# model


def test_abstopk_keeps_exactly_k_per_row():
    x = torch.randn(4, 7, 40)
    y = sg.abstopk(x, 10)
    assert ((y != 0).sum(-1) == 10).all()
    kept = y != 0
    assert torch.equal(y[kept], x[kept])  # kept values are untouched
    smallest_kept = torch.where(kept, x.abs(), torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, x.abs()).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


def test_kth_largest_matches_torch_topk_on_a_large_input():
    a = torch.randn(3, 171, 512).abs()  # 262k entries, an MLP-sized AbsTopK input
    expected = a.topk(128, dim=-1).values[..., -1:]
    assert torch.equal(sg.kth_largest(a, 128), expected)
    assert torch.equal(sg.kth_largest(a, 1, dim=1), a.amax(1, keepdim=True))


def test_abstopk_passes_gradient_only_to_kept_entries():
    x = torch.randn(5, 64, requires_grad=True)
    y = sg.abstopk(x, 16)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).float())


def test_every_node_location_applies_abstopk():
    model = small_model(afrac=0.25)
    seen = {}
    for node in model.nodes():
        node.hook = lambda name, x: seen.setdefault(name, x)
    model(torch.randint(64, (2, 16)))
    names = {f"{l}.{s}" for l in range(2) for s in ("attn.resid_in", "attn.q", "attn.k", "attn.v",
             "attn.resid_delta", "mlp.resid_in", "mlp.post_act", "mlp.resid_delta")}
    assert set(seen) == names | {"final.resid_in"}
    for name, x in seen.items():  # the unembedding's reads: a node without AbsTopK (official)
        kept = (x != 0).sum(-1)
        if name == "final.resid_in":
            assert (kept > round(0.25 * x.shape[-1])).all()
        else:
            assert (kept <= round(0.25 * x.shape[-1])).all(), name


def reference_attention_with_sink(q, k, v, sink):
    B, H, T, D = q.shape
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), -torch.inf)
    sink_col = sink.view(1, H, 1, 1).expand(B, H, T, 1)
    probs = torch.cat([sink_col, logits], -1).softmax(-1)[..., 1:]
    return probs @ v


def test_attention_sink_is_a_zero_valued_extra_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    sink = torch.tensor([0.7, -1.3, 2.0, 0.0])
    assert torch.allclose(sg.attend_with_sink(q, k, v, sink),
                          reference_attention_with_sink(q, k, v, sink), atol=1e-5)
    # a very negative sink is no sink; a very positive one swallows all attention
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(sg.attend_with_sink(q, k, v, torch.full((4,), -1e4)), plain, atol=1e-5)
    assert sg.attend_with_sink(q, k, v, torch.full((4,), 1e4)).abs().max() < 1e-6


def test_bigram_table_adds_the_current_tokens_row():
    model = small_model(afrac=1.0)
    idx = torch.randint(64, (2, 16))
    before, _ = model(idx)
    with torch.no_grad():
        model.bigram.weight[idx[0, 3], 11] += 5.0
    after, _ = model(idx)
    diff = after - before
    expected = torch.zeros_like(diff)
    expected[..., 11] = 5.0 * (idx == idx[0, 3]).float()
    assert torch.allclose(diff, expected, atol=1e-5)
    assert small_model(bigram_table=False).bigram is None


# -----------------------------------------------------------------------------
# tokenizer and data


def test_tokenizer_round_trips_code_and_keeps_punctuation_tokens(small_tokenizer):
    enc = small_tokenizer
    code = 'x = [[1, 2], [3]]\nprint("é ü", \'a\')\n\tif d[k]]: return {"k": v}  # ß\n\r\n'
    assert enc.decode(enc.encode_ordinary(code)) == code
    rng = np.random.default_rng(0)
    noise = bytes(rng.integers(32, 127, 2000).tolist()).decode()
    assert enc.decode(enc.encode_ordinary(noise)) == noise
    for tok in ['("', "('", '")', "')", "]]", "],"]:
        assert len(enc.encode_ordinary(tok)) == 1, tok
    ids = enc.encode_ordinary('foo("a")\nbar = [[1], [2]]')
    pieces = [enc.decode([i]) for i in ids]
    assert '("' in pieces and '")' in pieces and "]]" in pieces and "]," in pieces
    assert enc.n_vocab == 512 and enc.eot_token == 511


def test_tokenizer_is_deterministic_and_saves_in_tiktoken_format(corpus_dir, tmp_path):
    train, _ = sg.read_corpus(corpus_dir)
    ranks = sg.train_bpe(train[:20], 300)
    assert ranks == sg.train_bpe(train[:20], 300)
    sg.save_tokenizer(ranks, str(tmp_path / "tok.tiktoken"))
    enc = sg.load_tokenizer(str(tmp_path / "tok.tiktoken"))
    assert enc._mergeable_ranks == ranks
    first = (tmp_path / "tok.tiktoken").read_text().splitlines()[0]
    assert first == "AA== 0"  # base64 of byte 0, rank 0


def test_corpus_split_is_by_path_and_skips_bad_files(tmp_path, capsys):
    for i in range(60):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe not utf-8 \xc3\x28")
    os.mkfifo(tmp_path / "pipe.py")  # would block a read forever
    with open(tmp_path / "huge.py", "wb") as f:  # sparse: no disk used
        f.truncate(sg.MAX_FILE_BYTES + 1)
    train, val = sg.read_corpus(str(tmp_path))
    assert len(train) + len(val) == 60 and len(val) > 0
    assert "3 skipped" in capsys.readouterr().out
    assert sg.read_corpus(str(tmp_path)) == (train, val)
    for i in range(60):  # other contents, the same paths: the same files in val
        (tmp_path / f"m{i}.py").write_text(f"y = {i}\n")
    assert {s.replace("y", "x") for s in sg.read_corpus(str(tmp_path))[1]} == set(val)
    # about 1 file in 20: of 4000 paths, 200 expected, standard deviation 13.8; [140, 260] is
    # 4.3 of them either side (1 in 10 or 1 in 30 falls far outside)
    n_val = sum(sg.is_val_file(f"pkg{i // 50}/mod_{i}.py") for i in range(4000))
    assert 140 <= n_val <= 260, n_val


def test_bpe_cuts_a_giant_pre_token_so_no_token_outgrows_the_cap():
    """5000 brackets are one pre-token: uncut, merges would double a token up to 4096 bytes,
    every merge walking the whole word (a 200 MB file of NULs ran 262 s at 5.4 GB)."""
    ranks = sg.train_bpe(["(" * 5000, "x = [1]\n"], 300)
    assert max(map(len, ranks)) == sg.MAX_PRETOKEN


# -----------------------------------------------------------------------------
# config and errors


def test_bad_keys_values_and_corpus_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'n_layers'.*valid keys:.*n_layer"):
        sg.parse_config(["--n_layers=3"])
    with pytest.raises(SystemExit, match="--n_layer=three is not a valid int"):
        sg.parse_config(["--n_layer=three"])
    with pytest.raises(SystemExit, match="--compile=maybe is not a valid bool"):
        sg.parse_config(["--compile=maybe"])
    with pytest.raises(SystemExit, match="expected --key=value"):
        sg.parse_config(["n_layer=3"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        sg.parse_config(["--preset=huge"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .py files under"):
        sg.list_py_files(str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="not found \\(or not a folder\\)"):
        sg.list_py_files(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="checkpoint .* not found"):
        sg.load_checkpoint(str(tmp_path / "nowhere.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        sg.load_checkpoint(str(tmp_path / "junk.pt"))
    cfg = sg.parse_config(["--preset=tiny", "--n_layer=3", "--afrac=1", "--attn_sink=false"])
    assert cfg.n_layer == 3 and cfg.afrac == 1.0 and cfg.attn_sink is False
    assert cfg.d_model == sg.PRESETS["tiny"]["d_model"]


def test_a_near_miss_key_is_met_with_did_you_mean():
    for argv, defaults, near in ((["--learning_rat=1e-3"], sg.DEFAULTS, "learning_rate"),
                                 (["--n_layers=3"], sg.DEFAULTS, "n_layer"),
                                 (["--k_coeff=1"], prune.DEFAULTS, "k_coef"),
                                 (["--tasks=all", "--nn=3"], tasks.DEFAULTS, "n")):
        with pytest.raises(SystemExit, match=rf"'{argv[-1][2:].split('=')[0]}'; did you mean "
                                              rf"--{near}\? valid keys:"):
            sg.parse_config(argv, defaults, presets=None)
    with pytest.raises(SystemExit, match=r"unknown config key 'zzz'; valid keys:"):
        sg.parse_config(["--zzz=1"])


# -----------------------------------------------------------------------------
# training loop


def test_config_reads_keys_as_attributes_and_a_missing_one_is_an_attribute_error():
    cfg = sg.parse_config(["--n_layer=3"])
    assert cfg.n_layer == 3 and hasattr(cfg, "d_model") and not hasattr(cfg, "nope")
    with pytest.raises(AttributeError, match="nope"):
        cfg.nope
    copied = copy.deepcopy(cfg)
    assert copied == cfg and type(copied) is sg.Config and copied.n_layer == 3


def test_atomic_save_survives_an_interrupted_write(tmp_path, monkeypatch):
    model = small_model()
    opt = sg.make_optimizer(model, sg.Config(sg.DEFAULTS), "cpu")
    path = str(tmp_path / "ckpt.pt")
    sg.save_checkpoint(path, model, opt, sg.DEFAULTS, 5, 1.0, "")

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        sg.save_checkpoint(path, model, opt, sg.DEFAULTS, 6, 0.5, "")
    ckpt = sg.read_checkpoint(path)
    assert ckpt["iter_num"] == 5 and ckpt["best_val_loss"] == 1.0
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left behind


def test_resume_reproduces_an_uninterrupted_run(tmp_path, corpus_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path, corpus_dir, max_iters=12, eval_interval=6, eval_iters=1, log_interval=6)
    real_save = sg.save_checkpoint
    copies = []

    def save_and_copy(path, *args):
        real_save(path, *args)
        copies.append(shutil.copy(path, f"{path}.{args[3]}"))  # args[3] is iter_num

    monkeypatch.setattr(sg, "save_checkpoint", save_and_copy)
    full = dict(sg.train(cfg))
    shutil.copy(os.path.join(cfg.out_dir, "ckpt.pt.6"), os.path.join(cfg.out_dir, "ckpt.pt"))
    cfg.update(init_from="resume")
    resumed = dict(sg.train(cfg))
    assert sorted(resumed) == list(range(7, 13))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step


def test_resume_with_another_model_shape_is_a_clear_error(tmp_path, corpus_dir):
    cfg = tiny_cfg(tmp_path, corpus_dir, max_iters=2, eval_interval=2, eval_iters=1)
    sg.train(cfg)
    cfg.update(init_from="resume", d_model=32)
    with pytest.raises(SystemExit, match="drop the flags that change it \\(d_model\\)"):
        sg.train(cfg)


def test_tiny_preset_learns_well_below_the_unigram_baseline(tmp_path, corpus_dir, capsys):
    cfg = tiny_cfg(tmp_path, corpus_dir)
    sg.train(cfg)
    assert "ckpt.pt holds the last step's weights, not the best's" in capsys.readouterr().out
    model, tokenizer, saved = sg.load_checkpoint(cfg.out_dir)  # a run's folder: its ckpt.pt
    val = np.fromfile(os.path.join(saved.data_path, "val.bin"), dtype=np.uint16)
    train = np.fromfile(os.path.join(saved.data_path, "train.bin"), dtype=np.uint16)
    counts = np.bincount(train, minlength=cfg.vocab_size) + 1
    p = counts / counts.sum()
    unigram = float(-np.log(p[val]).mean())  # cross-entropy of the best context-free guess
    x = torch.from_numpy(val[: 8 * 65].astype(np.int64)).view(8, 65)
    with torch.no_grad():
        _, loss = model(x[:, :-1], x[:, 1:])
    # a threshold, not a measurement: 1 nat below the best context-free guess; a model that
    # stops learning early fails it
    assert loss.item() < unigram - 1.0, (loss.item(), unigram)
    # the checkpoint is at the target densities, by hand for the tiny preset (vocab 512, d_model
    # 64, d_mlp 256, density 1/16, embeddings 4 x 1/16 = 1/4): wte and lm_head 512 * 64 / 4 =
    # 8192; c_attn 192 * 64 / 16 = 768, attn c_proj 64 * 64 / 16 = 256, c_fc and mlp c_proj
    # 256 * 64 / 16 = 1024. density * d_model = 4 = min_per_neuron, so the floors need exactly
    # these counts and add none
    counts = {name: int((w != 0).sum()) for name, w, _ in sg.sparse_matrices(model)}
    assert counts == {"wte.weight": 8192, "lm_head.weight": 8192,
                      "blocks.0.attn.c_attn.weight": 768, "blocks.0.attn.c_proj.weight": 256,
                      "blocks.0.mlp.c_fc.weight": 1024, "blocks.0.mlp.c_proj.weight": 1024}


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path, corpus_dir, max_iters=6, eval_interval=2, eval_iters=1)
    real_forward, calls = sg.GPT.forward, []

    def forward_that_blows_up(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and loss is not None:
            calls.append(1)
            if len(calls) == 4:  # the 4th training step
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(sg.GPT, "forward", forward_that_blows_up)
    with pytest.raises(SystemExit, match="loss is nan at step 3.*last good checkpoint is kept"):
        sg.train(cfg)
    assert sg.read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["iter_num"] == 2


# -----------------------------------------------------------------------------
# the GPU path, proven on CPU: torch selection, torch.compile, bf16 autocast, DDP


# kth_largest_numpy replaced by a torch selection runs the GPU path on CPU. topk: kth_largest's
# own torch branch, which any dtype but float32 takes (float64 holds float32 exactly); kthvalue:
# an alternative to try on a GPU.
TORCH_SELECTIONS = {
    "topk": lambda a, k, dim: sg.kth_largest(a.double(), k, dim).float(),
    "kthvalue": lambda a, k, dim: a.kthvalue(a.shape[dim] - k + 1, dim, keepdim=True).values}


def test_gpu_selection_path_keeps_exactly_the_numpy_sets_even_with_ties_at_zero(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    cases = []
    for shape, floor_dim in [((96, 32), 1), ((32, 128), 0), ((300, 64), None)]:
        w = torch.randn(shape, generator=gen)
        w = w * (torch.rand(shape, generator=gen) < 0.3)  # 70% exact zeros: ties at zero
        for k in (5, w.numel() // 5, (w != 0).sum().item() + 40):  # the last keeps zeros
            cases.append((w, k, floor_dim))
    x = torch.randn(4, 9, 64, generator=gen) * (torch.rand(4, 9, 64, generator=gen) < 0.2)
    bf = x.bfloat16()  # what AbsTopK sees under autocast on a GPU; exact in float32 too

    def run_all():
        masks = [sg.topk_mask(w, k, floor_dim, 4) for w, k, floor_dim in cases]
        return masks + [sg.abstopk(x, k) != 0 for k in (3, 16, 40)] + [
            sg.abstopk(bf.float(), 16) != 0, sg.kth_largest(x.abs().view(-1), 100, 0)]

    numpy_sets = run_all()
    for method, select in TORCH_SELECTIONS.items():
        monkeypatch.setattr(sg, "kth_largest_numpy", select)
        assert torch.equal((sg.abstopk(bf, 16) != 0), numpy_sets[-2])  # bf16 selects in torch only
        for a, b in zip(numpy_sets, run_all()):
            assert torch.equal(a, b), method
    assert numpy_sets[len(cases) - 1].all()  # k beyond the nonzeros: every tie at zero is kept


def test_gpu_path_compiles_into_one_graph_and_numpy_breaks_are_counted(monkeypatch):
    model = small_model(n_layer=1)
    x = torch.randint(64, (2, 16))
    torch._dynamo.reset()
    cpu = torch._dynamo.explain(model)(x, x)  # CPU keeps numpy: every AbsTopK breaks the graph
    assert cpu.graph_break_count > 0
    assert all("numpy" in r.reason for r in cpu.break_reasons)
    for method, select in TORCH_SELECTIONS.items():  # the branch CUDA runs, and its alternative
        monkeypatch.setattr(sg, "kth_largest_numpy", select)
        torch._dynamo.reset()
        gpu = torch._dynamo.explain(model)(x, x)
        assert gpu.graph_count == 1 and gpu.graph_break_count == 0, method


def test_compiled_model_matches_eager_in_loss_and_after_a_training_step(monkeypatch):
    """Inductor reorders float32 sums (fused kernels), so the losses differ by ~5e-7 (measured),
    not bit for bit; 1e-5 leaves room and fails on any real difference (one wrong mask moves
    the loss by ~1e-3)."""
    monkeypatch.setattr(sg, "kth_largest_numpy", TORCH_SELECTIONS["topk"])  # as CUDA compiles
    cfg = sg.Config(sg.DEFAULTS, density=0.25, learning_rate=1e-2)
    x, y = torch.randint(64, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for compiled in (False, True):
        model = small_model(n_layer=1)
        fmodel = torch.compile(model) if compiled else model
        opt = sg.make_optimizer(model, cfg, "cpu")
        before = fmodel(x, y)[1]
        before.backward()
        sg.normalize_grad_rms_(list(model.parameters()))
        opt.step()
        project_at_target(model, cfg.density, cfg.min_per_neuron)
        with torch.no_grad():
            losses.append((before.item(), fmodel(x, y)[1].item()))
    (eager0, eager1), (comp0, comp1) = losses
    assert eager1 < eager0 - 0.01  # the step did something worth comparing
    assert comp0 == pytest.approx(eager0, abs=1e-5) and comp1 == pytest.approx(eager1, abs=1e-5)


def test_bf16_autocast_loss_is_close_to_float32():
    """bf16 keeps 8 bits of mantissa (relative error 2^-9 per rounding); over a tiny model's
    few matmuls the loss (4.16 nats) moved by 9e-4; 5e-3 leaves room and catches a broken cast."""
    model = small_model()
    dtypes = []
    for node in model.nodes():  # AbsTopK runs on bf16 activations: the torch selection path
        node.hook = lambda name, x: dtypes.append(x.dtype) or x
    x = torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = model(x, x)[1].item()
        assert set(dtypes) == {torch.float32}
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, x)[1].item()
    assert torch.bfloat16 in dtypes
    assert bf16 == pytest.approx(fp32, abs=5e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, ports, argv, out):
    """One torchrun process: the environment torchrun would set, then main() as the CLI runs it.
    Saves this rank's history and final weights, and its stdout, for the test to compare."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    models = []
    real_project = sg.project_weights
    sg.project_weights = lambda model, *a: models.append(model) or real_project(model, *a)
    sys.stdout = open(os.path.join(out, f"stdout{rank}.txt"), "w")
    results = {}
    for port, run in zip(ports, ("fresh", "resumed")):
        os.environ["MASTER_PORT"] = str(port)
        history = sg.main(argv[run])
        results[run] = (history, {k: v.clone() for k, v in models[-1].state_dict().items()})
    sys.stdout.close()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("bridged", [False, True])
def test_ddp_on_two_processes_trains_the_one_process_model(bridged, tmp_path, corpus_dir,
                                                           monkeypatch, request):
    """Two gloo processes on halves of the same global batches against one process on the
    whole: the ranks must agree bit for bit (DDP hands each the same averaged gradient), the
    curve with one process to 2e-6 relative. Two half-batch means averaged are not one mean bit
    for bit: the losses differ by <= 2e-7 relative over these 6 steps (measured; <= 5e-7 with
    bridges); a wrong shard or an unaveraged gradient moves them by >= 1e-4. (Over 40 steps a
    weight at the top-k threshold can flip and the gap grows to ~1e-2, but one process
    accumulating the same two halves matches DDP.)"""
    cfg = tiny_cfg(tmp_path / "single", corpus_dir, max_iters=6, eval_interval=3, eval_iters=1,
                   log_interval=3)
    if bridged:  # the bridges' gradients are averaged too, and resume restores them. afrac=1:
        # no AbsTopK, whose choices a roundoff can flip (measured: the curves part by 7e-3 in 6)
        cfg.update(n_layer=2, afrac=1.0, bridge_to=request.getfixturevalue("dense_run"))
    real_save = sg.save_checkpoint  # keeps a copy of every checkpoint, named by its step
    monkeypatch.setattr(sg, "save_checkpoint",
                        lambda path, *a: real_save(path, *a) or shutil.copy(path, f"{path}.{a[3]}"))
    single = dict(sg.train(cfg))  # builds the token cache too
    single_weights = sg.read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["model"]
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    for name in ("ckpt.pt.3", "tokenizer.tiktoken"):  # the single run's checkpoint at step 3
        shutil.copy(os.path.join(cfg.out_dir, name), resume_dir / name.replace(".3", ""))
    keys = "preset data_dir cache_dir vocab_size max_iters eval_interval eval_iters log_interval"
    base = [f"--{k}={cfg[k]}" for k in keys.split() + ["n_layer", "afrac", "bridge_to"] * bridged]
    argv = {"fresh": base + [f"--out_dir={tmp_path / 'ddp'}"],
            "resumed": base + [f"--out_dir={resume_dir}", "--init_from=resume"]}
    ports = (free_port(), free_port())  # the resumed run joins a new process group
    procs = torch.multiprocessing.spawn(ddp_worker, args=(2, ports, argv, str(tmp_path)), nprocs=2,
                                        join=False)
    deadline = time.time() + 300  # a rank stuck in a collective must fail the test, not hang CI
    while not procs.join(timeout=5):
        if time.time() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("a rank of the 2-process run did not finish within 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for run in ("fresh", "resumed"):
        (hist0, w0), (hist1, w1) = ranks[0][run], ranks[1][run]
        assert hist0 == hist1  # every rank logs the same global loss
        assert all(torch.equal(w0[k], w1[k]) for k in w0), run  # bit-identical weights
    fresh, resumed = dict(ranks[0]["fresh"][0]), dict(ranks[0]["resumed"][0])
    assert sorted(fresh) == list(range(1, 7)) and sorted(resumed) == [4, 5, 6]
    gaps = [abs(run[s] - single[s]) / abs(single[s]) for run in (fresh, resumed) for s in run]
    assert max(gaps) < 2e-6, gaps  # relative: a bridged loss is ~10x larger, its roundoff too
    weights = ranks[0]["fresh"][1]
    assert max((weights[k] - single_weights[k]).abs().max().item() for k in weights) < 1e-5
    # rank 0 alone logs and saves: one checkpoint, in the fresh run's out_dir, and rank 1 silent
    log0, log1 = ((tmp_path / f"stdout{r}.txt").read_text() for r in (0, 1))
    assert "eval 6" in log0 and "step 6" in log0 and log1 == ""
    assert sg.read_checkpoint(str(tmp_path / "ddp" / "ckpt.pt"))["iter_num"] == 6
    if bridged:  # the bridges train alike in both
        two, one = (sg.read_checkpoint(str(path))["bridges"] for path in
                    (tmp_path / "ddp" / "ckpt.pt", os.path.join(cfg.out_dir, "ckpt.pt")))
        assert max((two[m][k] - one[m][k]).abs().max().item() for m in ("enc", "dec")
                   for k in one[m]) < 1e-5


# -----------------------------------------------------------------------------
# tasks.py

PAPER_TASKS = ("single_double_quote final_kwarg set_or_string set_or_string_fixedvarname "
               "class_init with_as bracket_brace with_open bracket_counting for_while else_elif "
               "fstring_brace if_ternary var_swap indent_for lambda_func if_equals enumerate_range "
               "var_if while_return_true").split()
ALL_NAMES = list(tasks.ALL)


@pytest.fixture(scope="session")
def task_ranks():
    """A 1024-token BPE on about 0.8 MB of the standard library plus task text of another seed:
    the text makes the answer tokens exist at this small vocabulary; what the tests check is that
    each one is produced on its own after every prompt of seed 0."""
    files = [f for f in sg.list_py_files(sg.stdlib_dir()) if "/test" not in f][::12]
    docs, size = [], 0
    for path in files:
        try:
            docs.append(open(path, encoding="utf-8").read())
        except UnicodeDecodeError:
            continue
        size += len(docs[-1])
        if size > 800_000:
            break
    for name in tasks.ALL:
        docs += [f"{p.prompt_a}{p.token_a}\n\n{p.prompt_b}{p.token_b}\n\n"
                 for p in tasks.make_pairs(name, 200, seed=1)]
    return sg.train_bpe(docs, 1024)


@pytest.fixture(scope="session")
def task_tokenizer(task_ranks):
    return sg.make_encoding(task_ranks)


def task_loss(model, tokenizer, pairs) -> tuple[torch.Tensor, float]:
    """(task loss as a differentiable scalar, accuracy) on these pairs, as evaluate scores them."""
    return tasks.score(tasks.margins(model, tokenizer, pairs))


class ContextBlind(torch.nn.Module):
    """A model whose logits ignore the input: one fixed vector over the vocabulary."""

    def __init__(self, logits: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.cfg = SimpleNamespace(block_size=block_size)
        self.logits = torch.nn.Parameter(logits)

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1), None


def tiny_gpt(vocab_size: int, block_size: int) -> sg.GPT:
    torch.manual_seed(0)
    cfg = sg.Config(sg.DEFAULTS, vocab_size=vocab_size, n_layer=1, d_model=32, d_head=8,
                    d_mlp=64, block_size=block_size)
    model = sg.GPT(cfg)
    torch.nn.init.normal_(model.bigram.weight, std=0.1)  # so answers' logits differ by prompt
    return model


def test_tasks_are_the_papers_20_and_attacks_are_apart():
    assert list(tasks.TASKS)[:20] == PAPER_TASKS  # a learner's own tasks may follow
    assert list(tasks.ATTACKS) == ["bracket_counting_distractor", "bracket_counting_long"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_task_makes_n_distinct_pairs_deterministically(name):
    pairs = tasks.make_pairs(name, 30, seed=3)
    assert len(pairs) == 30
    assert pairs == tasks.make_pairs(name, 30, seed=3)
    assert pairs != tasks.make_pairs(name, 30, seed=4)
    for p in pairs:
        assert all(isinstance(s, str) for s in p)
        assert p.prompt_a != p.prompt_b and p.token_a != p.token_b
    assert len({p.prompt_a for p in pairs}) > 20  # varied, not one template


@pytest.mark.parametrize("name", ALL_NAMES)
def test_train_and_test_never_share_a_prompt(name):
    prompts = {split: {s for p in tasks.make_pairs(name, 200, split=split) for s in p[:2]}
               for split in ("train", "test")}
    assert not prompts["train"] & prompts["test"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_answers_are_single_tokens_produced_right_after_every_prompt(name, task_tokenizer):
    for split in ("train", "test"):
        tasks.check_pairs(task_tokenizer, name, tasks.make_pairs(name, 100, split=split))


@pytest.fixture(scope="session")
def stdlib_tokenizer():
    """The tokenizer `python sparse_gpt.py` trains by default (2048 tokens on the stdlib)."""
    train, _ = sg.read_corpus(sg.stdlib_dir())
    return sg.make_encoding(sg.train_bpe(train, 2048))


def test_every_task_passes_the_check_under_the_default_tokenizer(stdlib_tokenizer):
    """The tokenizer users evaluate with; its prompts also fit the cpu preset's 128 tokens."""
    tokenizer = stdlib_tokenizer
    for name in ALL_NAMES:
        pairs = tasks.make_pairs(name, 200, split="test")
        assert tasks.for_tokenizer(tokenizer, name, pairs) == pairs  # our tokenizer: no variant
        assert max(len(tokenizer.encode_ordinary(s)) for p in pairs for s in p[:2]) <= 128, name


@pytest.fixture(scope="session")
def official_pattern_tokenizer():
    """Our BPE trainer with tinypython's pre-tokenizer, 1024 tokens on stdlib files and task text
    (each answer followed by what follows it in code) of another seed."""
    files = [f for f in sg.list_py_files(sg.stdlib_dir()) if "/test" not in f][::12][:150]
    docs = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    for name, (after_a, after_b) in tasks.FOLLOWS.items():
        docs += [f"{p.prompt_a}{p.token_a}{after_a}\n{p.prompt_b}{p.token_b}{after_b}\n"
                 for p in tasks.make_pairs(name, 200, seed=1)]
    ranks = sg.train_bpe(docs, 1024, sg.TINYPYTHON_PATTERN)
    return sg.make_encoding(ranks, "official_pattern", sg.TINYPYTHON_PATTERN)


def test_every_task_is_asked_in_a_variant_under_the_official_pattern(official_pattern_tokenizer):
    enc, asked = official_pattern_tokenizer, {}
    for name in tasks.FOLLOWS:  # the paper's; a task of one's own needs FOLLOWS for this
        pairs = tasks.make_pairs(name, 100, split="test")
        asked[name] = tasks.for_tokenizer(enc, name, pairs)  # raises for a task it cannot ask
        assert all(p.prompt_a.startswith(a.prompt_a) and p.prompt_b.startswith(a.prompt_b)
                   or a.prompt_a.endswith(":\n") for a, p in zip(asked[name], pairs)), name
    answers = {(p.token_a, p.token_b) for p in asked["bracket_counting"]}
    assert answers <= {("]]", "]\n"), ("]]\n", "]\n")}
    assert all(p.token_a.endswith(")") and p.token_b == p.token_a + "\n" for p in asked["with_as"])
    assert all(p.prompt_a.endswith(":\n") and p.token_a.isspace() for p in asked["indent_for"])
    assert asked["class_init"] == tasks.make_pairs("class_init", 100, split="test")  # unchanged


def loop_kind(rng) -> tasks.Pair:
    """for x in vs while x: (a learner's own task, added in the tests)."""
    head, ind = tasks.preamble(rng)
    return tasks.Pair(f"{head}{ind}for {tasks.name(rng)}", f"{head}{ind}while {tasks.name(rng)}",
                      " in", ":")


def bad_quote(rng) -> tasks.Pair:
    """'"' after print( merges into the token ("; the answer should be '")'."""
    x = tasks.name(rng)
    return tasks.Pair(f"    {x} = print(", f"    {x} = len(", '"', "1")


def test_an_added_task_is_shown_and_checked_against_the_cached_tokenizer(tmp_path, task_ranks,
                                                                          monkeypatch, capsys):
    monkeypatch.setitem(tasks.TASKS, "loop_kind", loop_kind)
    for f in (loop_kind, bad_quote):
        monkeypatch.setitem(tasks.ALL, f.__name__, f)
    cache = tmp_path / "cache"
    (cache / "stdlib-123").mkdir(parents=True)
    sg.save_tokenizer(task_ranks, str(cache / "stdlib-123" / "tokenizer.tiktoken"))
    tasks.main(["--tasks=loop_kind", f"--cache_dir={cache}"])
    out = capsys.readouterr().out
    assert "=== loop_kind: for x in vs while x:" in out and "⟨' in' > ':'⟩" in out
    assert "checked 1 task(s) against" in out and "every answer is one token" in out
    with pytest.raises(SystemExit) as e:
        tasks.main(["--tasks=loop_kind,bad_quote", f"--cache_dir={cache}"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "error: task bad_quote: answer '\"' merges with the end" in out
    tasks.main(["--tasks=loop_kind", f"--cache_dir={tmp_path / 'none'}"])
    assert "no tokenizer cached in" in capsys.readouterr().out
    # a task whose prompts never vary cannot fill a split: a clear error, not an endless loop
    assert tasks.split_of("a =") == "train" != tasks.split_of("b =")  # never both in one split
    monkeypatch.setitem(tasks.ALL, "fixed", lambda rng: tasks.Pair("a =", "b =", " 1", " 2"))
    with pytest.raises(SystemExit, match=r"error: task fixed: 0 of 2 train pairs in 140 draws"):
        tasks.main(["--tasks=fixed"])


def test_tasks_py_piped_into_head_ends_cleanly(tmp_path, task_ranks):
    """python tasks.py | head: the reader closes the pipe while the check still runs and
    prints; that is no error (it once ended with 'error: Broken pipe')."""
    (tmp_path / "c").mkdir()
    sg.save_tokenizer(task_ranks, str(tmp_path / "c" / "tokenizer.tiktoken"))
    p = subprocess.Popen([sys.executable, "tasks.py", f"--cache_dir={tmp_path}"],
                         cwd=os.path.dirname(os.path.abspath(tasks.__file__)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"every prompt is followed by")
    p.stdout.close()  # as head does after its lines
    assert p.wait(timeout=300) == 0 and p.stderr.read() == b""


def test_our_tokenizer_asks_a_task_as_written_and_another_prints_each_rewrite(
        task_tokenizer, official_pattern_tokenizer, capsys):
    """A bad answer is the task's bug, so our own tokenizer never adapts it (' enumerate' was
    once asked as ' en' without a word); a released model's tokenizer prints every rewrite."""
    too_long = tasks.Pair("    for i, x in", "    for i in", " enumerate_all", " range")
    with pytest.raises(ValueError, match=r"task demo: answer ' enumerate_all' is \d+ tokens"):
        tasks.for_tokenizer(task_tokenizer, "demo", [too_long])
    pairs = tasks.make_pairs("single_double_quote", 30, split="test")
    assert tasks.for_tokenizer(task_tokenizer, "single_double_quote", pairs) == pairs
    assert capsys.readouterr().out == ""
    assert tasks.for_tokenizer(official_pattern_tokenizer, "single_double_quote", pairs) != pairs
    assert capsys.readouterr().out == ("single_double_quote: 30 of 30 pairs asked as '\")\\n' / "
                                       "\"')\\n\" instead of '\")' / \"')\"\n")
    tasks.for_tokenizer(official_pattern_tokenizer, "with_as", tasks.make_pairs("with_as", 30))
    out = capsys.readouterr().out.splitlines()  # e.g. "with_as: 12 of 30 pairs asked as "')" /
    assert sum(int(s.split()[1]) for s in out) == 30  # "')\n" instead of ' as' / '\n    '
    assert all(" instead of ' as' / '\\n " in s for s in out)


def test_a_bad_answer_is_a_clear_error_naming_task_and_token(task_tokenizer):
    merges = tasks.Pair("    print(", "    len(", '"', "x")  # (" is one token, so " is not
    with pytest.raises(ValueError, match=r"""task demo: answer '"' merges with the end"""):
        tasks.check_pairs(task_tokenizer, "demo", [merges])
    too_long = tasks.Pair("    for i, x in", "    for i in", " enumerate_all", " range")
    with pytest.raises(ValueError, match=r"task demo: answer ' enumerate_all' is \d+ tokens"):
        tasks.check_pairs(task_tokenizer, "demo", [too_long])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_context_blind_model_scores_exactly_half(name, task_tokenizer):
    """Both prompts of a pair get the same logits, so exactly one of the two is right: the
    pairing makes every task impossible without reading the context."""
    pairs = tasks.make_pairs(name, 20, split="test")
    logits = torch.randn(task_tokenizer.n_vocab, generator=torch.Generator().manual_seed(0))
    logits[task_tokenizer.encode_ordinary(pairs[0].token_a)[0]] = 10.0  # always prefers token_a
    loss, acc = task_loss(ContextBlind(logits), task_tokenizer, pairs)
    assert acc == 0.5
    # by hand: a pair whose answers' logits differ by d costs log(1 + e^-d) on one prompt and
    # log(1 + e^d) on the other, whichever way round
    ids = lambda s: task_tokenizer.encode_ordinary(s)[0]  # noqa: E731
    ds = [logits[ids(p.token_a)].item() - logits[ids(p.token_b)].item() for p in pairs]
    by_hand = sum(math.log1p(math.exp(-d)) + math.log1p(math.exp(d)) for d in ds) / (2 * len(ds))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_left_truncation_keeps_the_answer_position(task_tokenizer):
    block_size = 16
    model = tiny_gpt(task_tokenizer.n_vocab, block_size).eval()
    short = tasks.Pair("x = [[1", "x = [1", "]]", "]")
    pairs = tasks.make_pairs("bracket_counting_long", 3) + [short] + tasks.make_pairs("with_as", 3)
    lengths = [len(task_tokenizer.encode_ordinary(s)) for p in pairs for s in p[:2]]
    assert min(lengths) < block_size < max(lengths)  # some prompts are padded, some truncated
    margin = tasks.margins(model, task_tokenizer, pairs)
    assert margin.shape == (2 * len(pairs),)
    for i, p in enumerate(pairs):
        both = ((p.prompt_a, p.token_a, p.token_b), (p.prompt_b, p.token_b, p.token_a))
        for j, (prompt, ok, bad) in enumerate(both):
            ids = task_tokenizer.encode_ordinary(prompt)[-block_size:]
            last = model(torch.tensor([ids]))[0][0, -1]
            ok_id, bad_id = (task_tokenizer.encode_ordinary(t)[0] for t in (ok, bad))
            torch.testing.assert_close(margin[2 * i + j], last[ok_id] - last[bad_id], rtol=1e-4,
                                       atol=1e-4)


def test_task_loss_is_the_differentiable_two_way_cross_entropy(task_tokenizer):
    model = tiny_gpt(task_tokenizer.n_vocab, 64)
    pairs = tasks.make_pairs("single_double_quote", 4)
    loss, acc = task_loss(model, task_tokenizer, pairs)
    margin = tasks.margins(model, task_tokenizer, pairs)  # logits (right, wrong) ~ (margin, 0)
    two_way = torch.stack([margin, torch.zeros_like(margin)], dim=1)
    expected = F.cross_entropy(two_way, torch.zeros(len(margin), dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    assert acc == (margin > 0).float().mean().item()
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_evaluate_gives_loss_accuracy_and_n_per_task(task_tokenizer):
    out = {name: tasks.evaluate(ReadingModel(task_tokenizer, name, 1.0 if name == "for_while"
                                             else -1.0), task_tokenizer, [name], n=10,
                                batch_pairs=4)[name] for name in ("for_while", "class_init")}
    assert out["for_while"] == (pytest.approx(SOFTPLUS_MINUS_10, rel=1e-4), 1.0, 10)
    assert out["class_init"] == (pytest.approx(SOFTPLUS_10, rel=1e-4), 0.0, 10)


# What each task's right answer is, written from the task's rule in the paper's Table 1 and read
# off the prompt's text alone (its last line, or the whole prompt): independent of the answer
# strings tasks.py stores, so a task whose two answers are swapped fails here.
def last_line(prompt: str) -> str:
    return prompt.split("\n")[-1]


def indent(prompt: str) -> str:
    line = last_line(prompt)
    return line[: len(line) - len(line.lstrip())]


def bracket_rule(p: str) -> str:
    return "]]" if "[[" in last_line(p) else "]"


ORACLE = {
    "single_double_quote": lambda p: '")' if p.rfind('"') > p.rfind("'") else "')",
    "final_kwarg": lambda p: "=" if "=" in p[p.rfind("def ") :] else "):",
    "set_or_string": lambda p: "." if "set()" in p else " +=",
    "set_or_string_fixedvarname": lambda p: "." if "set()" in p else " +=",
    "class_init": lambda p: " " + last_line(p).split("self.")[1].split(" ")[0],
    "with_as": lambda p: " as" if last_line(p).lstrip().startswith("with ") else "\n" + indent(p),
    "bracket_brace": lambda p: ":" if p.rfind("{") > p.rfind("[") else ",",
    "with_open": lambda p: "r" if last_line(p).split("open(")[1].split("_")[0] in (
        "input", "src", "source", "in", "infile", "read") else "w",
    "bracket_counting": bracket_rule,
    "for_while": lambda p: " in" if last_line(p).lstrip().startswith("for ") else ":",
    "else_elif": lambda p: ":" if p.endswith("else") else " self",
    "fstring_brace": lambda p: " {" if 'f"' in last_line(p) else " %",
    "if_ternary": lambda p: ":" if last_line(p).lstrip().startswith("if ") else " else",
    "var_swap": lambda p: " " + last_line(p).lstrip().split(",")[0],
    "indent_for": lambda p: "\n" + indent(p) + "    ",
    "lambda_func": lambda p: ":" if "lambda" in last_line(p) else "(",
    "if_equals": lambda p: " ==" if last_line(p).lstrip().startswith("if ") else " =",
    "enumerate_range": lambda p: " zip" if "," in last_line(p) else " range",
    "var_if": lambda p: ":" if last_line(p).lstrip().startswith("if ") else "\n" + indent(p),
    "while_return_true": lambda p: ":" if p.endswith("while True") else "\n",
    "bracket_counting_distractor": bracket_rule,
    "bracket_counting_long": bracket_rule,
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_tasks_answers_follow_its_rule(name):
    assert set(ORACLE) == set(tasks.ALL)
    for split in ("train", "test"):
        for p in tasks.make_pairs(name, 50, split=split):
            assert (ORACLE[name](p.prompt_a), ORACLE[name](p.prompt_b)) == (p.token_a, p.token_b)


class ReadingModel(torch.nn.Module):
    """A hand-made 'model' that reads the context: at each prompt's last token it gives the answer
    ORACLE names a logit of +10 (-10 for its mirror), every other logit 0. Prompts are
    right-padded with token 0 (a NUL byte, never in a prompt). wrong_on: prompts it gets wrong."""

    def __init__(self, tokenizer, name: str, sign: float = 1.0, wrong_on=()):
        super().__init__()
        self.cfg, self.tokenizer = SimpleNamespace(block_size=1024), tokenizer
        self.name, self.sign, self.wrong_on = name, sign, set(wrong_on)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # evaluate reads the device from it

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.tokenizer.n_vocab)
        for row, ids in enumerate(idx.tolist()):
            while ids[-1] == 0:
                ids.pop()
            prompt = self.tokenizer.decode(ids)
            answer = self.tokenizer.encode_ordinary(ORACLE[self.name](prompt))[0]
            wrong = -1.0 if prompt in self.wrong_on else 1.0
            logits[row, len(ids) - 1, answer] = 10.0 * self.sign * wrong
        return logits, None


SOFTPLUS_10, SOFTPLUS_MINUS_10 = math.log1p(math.exp(10.0)), math.log1p(math.exp(-10.0))


def test_a_model_that_reads_the_context_scores_100_and_its_mirror_0(task_tokenizer):
    """Loss by hand: the right answer 10 above the wrong one costs log(1 + e^-10) per prompt,
    10 below costs log(1 + e^10)."""
    names = list(tasks.ALL)
    for sign, acc, loss in ((1.0, 1.0, SOFTPLUS_MINUS_10), (-1.0, 0.0, SOFTPLUS_10)):
        for name in names:
            model = ReadingModel(task_tokenizer, name, sign)
            got_loss, got_acc, n = tasks.evaluate(model, task_tokenizer, [name], n=6,
                                                  batch_pairs=4)[name]
            assert (got_acc, n) == (acc, 6), (name, sign)
            assert got_loss == pytest.approx(loss, rel=1e-4), (name, sign)


@pytest.mark.parametrize("wrong_pair", [0, 5, 9])
def test_evaluate_scores_every_pair_of_every_chunk(wrong_pair, task_tokenizer):
    """Wrong on exactly one of 20 prompts, in chunks of 4 pairs (the first, a middle one, the
    last): accuracy 19/20 and loss (19 log(1 + e^-10) + log(1 + e^10)) / 20, whatever chunk
    holds it."""
    pairs = tasks.make_pairs("for_while", 10, split="test")
    model = ReadingModel(task_tokenizer, "for_while", wrong_on=[pairs[wrong_pair].prompt_b])
    loss, acc, n = tasks.evaluate(model, task_tokenizer, ["for_while"], n=10,
                                  batch_pairs=4)["for_while"]
    assert acc == pytest.approx(19 / 20, abs=1e-6) and n == 10  # a float32 mean
    assert loss == pytest.approx((19 * SOFTPLUS_MINUS_10 + SOFTPLUS_10) / 20, rel=1e-4)


def test_evaluate_reads_the_split_it_is_asked_for(task_tokenizer):
    """A model wrong on every prompt of the first 10 train pairs: 0% on them, 100% on test."""
    train = tasks.make_pairs("for_while", 10, split="train")
    model = ReadingModel(task_tokenizer, "for_while", wrong_on=[s for p in train for s in p[:2]])
    for split, acc in (("train", 0.0), ("test", 1.0)):
        out = tasks.evaluate(model, task_tokenizer, ["for_while"], n=10, split=split)
        assert out["for_while"][1] == acc, split


def test_a_tie_between_the_two_answers_is_not_a_right_answer(task_tokenizer):
    """All logits equal: no prompt's right answer is strictly higher (accuracy 0) and the
    two-way cross-entropy is exactly log 2."""
    pairs = tasks.make_pairs("if_equals", 10, split="test")
    loss, acc = task_loss(ContextBlind(torch.zeros(task_tokenizer.n_vocab)), task_tokenizer,
                                pairs)
    assert acc == 0.0 and loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_cli_prints_examples_a_table_and_clear_errors(tmp_path, task_ranks, capsys):
    tasks.main([])
    out = capsys.readouterr().out
    assert all(f"=== {name}:" in out for name in ALL_NAMES)
    # a tiny checkpoint with its tokenizer beside it, as sparse_gpt.py saves them
    cfg = sg.parse_config(["--preset=tiny", f"--vocab_size={len(task_ranks) + 1}"])
    model = sg.GPT(cfg)
    ckpt = str(tmp_path / "ckpt.pt")
    sg.save_checkpoint(ckpt, model, sg.make_optimizer(model, cfg, "cpu"), cfg, 0, float("inf"), "")
    sg.save_tokenizer(task_ranks, str(tmp_path / "tokenizer.tiktoken"))
    tasks.main([f"--ckpt={ckpt}", "--n=4", "--device=cpu"])
    table = capsys.readouterr().out
    rows = table.splitlines()
    for name in ALL_NAMES:
        assert any(row.startswith(name + " ") and row.endswith(" 4") for row in rows)
    assert f"mean over {len(tasks.TASKS)} tasks" in table
    # a tokenizer with only its first 300 merges lacks most answer tokens: each such task says so
    short = tmp_path / "short"
    short.mkdir()
    cfg = sg.parse_config(["--preset=tiny", "--vocab_size=301"])
    model = sg.GPT(cfg)
    ckpt = str(short / "ckpt.pt")
    sg.save_checkpoint(ckpt, model, sg.make_optimizer(model, cfg, "cpu"), cfg, 0, float("inf"), "")
    sg.save_tokenizer(dict(list(task_ranks.items())[:300]), str(short / "tokenizer.tiktoken"))
    tasks.main([f"--ckpt={ckpt}", "--n=4", "--device=cpu", "--tasks=if_ternary,bracket_counting"])
    table = capsys.readouterr().out
    assert regex.search(r"not evaluated: task if_ternary: answer '.+' (is \d tokens|merges)", table)
    assert any(line.startswith("bracket_counting ") and "%" in line for line in table.splitlines())
    for argv, message in ((["--tasks=for_while,for_whiel"],
                           "error: --tasks: unknown task 'for_whiel'; did you mean for_while?"),
                          ([f"--ckpt={tmp_path / 'missing.pt'}"], "error: checkpoint"),
                          (["--split=val"], "error: split=val is invalid: it must be train or"),
                          (["--n=0"], "error: n=0 is invalid: it must be at least 1")):
        with pytest.raises(SystemExit, match=message):
            tasks.main(argv)


# -----------------------------------------------------------------------------
# prune.py
# a hand-built model with a planted circuit, on a byte-level tokenizer (vocab 257)
#
# The answer after 'X' is 'A' and after 'Y' is 'B'. The embedding writes +1 (X) or -1 (Y) on
# residual channel 0; neuron 0 fires on +, neuron 1 on -; they write +/- onto channel 1; the
# unembedding reads channel 1 only for 'A' and 'B'. So the planted circuit is 5 nodes:
# 0.mlp.resid_in.0 -> 0.mlp.post_act.{0,1} -> 0.mlp.resid_delta.1 -> final.resid_in.1.
# Channels 2..7, the attention block and neurons 2..7 carry random noise. The means come from
# text with neither X nor Y, so every planted node's mean is 0 and each one is needed.

PLANTED = ["0.mlp.resid_in.0", "0.mlp.post_act.0", "0.mlp.post_act.1", "0.mlp.resid_delta.1",
           "final.resid_in.1"]
NOISE_TEXT = "abcdefghijk"


def hand_gpt(**kw) -> sg.GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=257, n_layer=1, d_model=8, d_head=4, d_mlp=8, block_size=8)
    return sg.GPT(sg.Config(sg.DEFAULTS, **{**args, **kw}))


def byte_tokenizer():
    return sg.make_encoding({bytes([i]): i for i in range(256)})


def planted_model() -> sg.GPT:
    model = hand_gpt(afrac=1.0, attn_sink=False, bigram_table=False)
    noise, ab = slice(2, 8), [ord("A"), ord("B")]
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        model.wte.weight[:, noise] = 0.3 * torch.randn(257, 6)
        model.wte.weight[ord("X"), 0], model.wte.weight[ord("Y"), 0] = 1.0, -1.0
        for i in range(3):  # q, k and v read the noise channels; the output writes them
            attn.c_attn.weight[i * 8 + 2 : i * 8 + 8, noise] = torch.randn(6, 6)
        attn.c_proj.weight[noise, noise] = 0.3 * torch.randn(6, 6)
        mlp.c_fc.weight[0, 0], mlp.c_fc.weight[1, 0] = 10.0, -10.0  # far into GELU's flat tail
        mlp.c_fc.weight[2:, noise] = torch.randn(6, 6)
        mlp.c_proj.weight[1, 0], mlp.c_proj.weight[1, 1] = 1.0, -1.0
        mlp.c_proj.weight[noise, 2:] = 0.3 * torch.randn(6, 6)
        model.lm_head.weight[:, noise] = torch.randn(257, 6)
        model.lm_head.weight[ab] = 0.0
        # a logit difference of +-0.56 after the final norm: with the best scale (at most 4x)
        # and shift, both neurons give task loss 0.10, one alone 0.28, so the 0.15 target
        # needs the whole planted circuit
        model.lm_head.weight[ab, 1] = torch.tensor([0.1, -0.1])
    return model.requires_grad_(False)


def planted_task(rng) -> tasks.Pair:
    noise = "".join(rng.choice(NOISE_TEXT) for _ in range(rng.randint(3, 7)))
    return tasks.Pair(noise + "X", noise + "Y", "A", "B")


def noise_tokens(n=4000) -> np.ndarray:
    return np.random.default_rng(0).choice(list(NOISE_TEXT.encode()), n).astype(np.uint16)


def planted_data(n=64) -> dict:
    pairs = [planted_task(random.Random(i)) for i in range(n)]
    return tasks.encode_pairs(byte_tokenizer(), pairs, 8, torch.device("cpu"))


def test_prune_recovers_planted_circuit():
    model = planted_model()
    means = prune.compute_means(model, noise_tokens(), n_batches=8, batch_size=16)
    cfg = sg.parse_config(["--steps=60", "--lr=3e-2"], prune.DEFAULTS, presets=None)  # quick
    keep, info = prune.find_circuit(model, means, planted_data(), cfg)
    names = prune.node_names(model)
    assert sorted(names[i] for i in keep.nonzero()[:, 0].tolist()) == sorted(PLANTED), info
    assert info["loss_calibrated"] <= cfg.target_loss and info["n_nodes"] == 5
    # every seed's mask order has the planted nodes first: its bisection stops at 5
    assert [s["bisection_nodes"] for s in info["seeds"].values()] == [5] * cfg.seeds
    edges = {(names[s], names[d]) for s, d, _ in prune.circuit_edges(model, keep)}
    assert edges == {("0.mlp.resid_in.0", "0.mlp.post_act.0"),
                     ("0.mlp.resid_in.0", "0.mlp.post_act.1"),
                     ("0.mlp.post_act.0", "0.mlp.resid_delta.1"),
                     ("0.mlp.post_act.1", "0.mlp.resid_delta.1")}


def test_long_drop_pass_reports_progress(monkeypatch, capsys):
    """The drop pass costs one forward per node the bisection keeps (minutes on a released
    model), so it logs every LOG_EVERY nodes, as the mask training logs every LOG_EVERY steps."""
    monkeypatch.setattr(prune, "LOG_EVERY", 2)
    model = planted_model()
    means = prune.compute_means(model, noise_tokens(), n_batches=8, batch_size=16)
    cfg = sg.parse_config(["--steps=60", "--lr=3e-2", "--seeds=1"], prune.DEFAULTS, presets=None)
    keep, info = prune.find_circuit(model, means, planted_data(), cfg)
    lines = capsys.readouterr().out.splitlines()
    drops = [l for l in lines if "drop pass" in l and "left" in l]
    k = info["seeds"][0]["bisection_nodes"]
    assert len(drops) == k // 2 and drops[0].startswith(f"  drop pass 2/{k} | kept "), lines


def backup_model() -> sg.GPT:
    """The planted model with a backup route: channels 2 and 3 also carry X vs Y (+-0.5 each),
    read by neurons 2 and 3, which write onto channel 1 as neurons 0 and 1 do. So the task has
    several near-equivalent circuits, and different seeds of the search find different ones."""
    model = planted_model()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        model.wte.weight[:, 2:4] = 0.0
        model.wte.weight[ord("X"), 2:4], model.wte.weight[ord("Y"), 2:4] = 0.5, -0.5
        model.blocks[0].attn.c_proj.weight[2:4] = 0.0
        mlp.c_fc.weight[2:4], mlp.c_proj.weight[:, 2:4] = 0.0, 0.0
        mlp.c_fc.weight[2, 2:4], mlp.c_fc.weight[3, 2:4] = 10.0, -10.0
        mlp.c_proj.weight[1, 2], mlp.c_proj.weight[1, 3] = 1.0, -1.0
    return model


def search_backup_model(*argv) -> tuple:
    model = backup_model()
    means = prune.compute_means(model, noise_tokens(), n_batches=8, batch_size=16)
    cfg = sg.parse_config(["--steps=60", "--lr=3e-2", "--seeds=4", *argv], prune.DEFAULTS,
                          presets=None)
    return model, means, prune.find_circuit(model, means, planted_data(), cfg)


def test_same_seed_same_circuit_and_the_smallest_seed_wins():
    model, _, (keep, info) = search_backup_model()
    again, info_again = search_backup_model()[2]
    assert torch.equal(keep, again) and info == info_again
    names, sets = prune.node_names(model), [s["nodes"] for s in info["seeds"].values()]
    assert len({tuple(s) for s in sets}) > 1, info  # the seeds found different circuits
    seed_keeps = [torch.tensor([float(n in s) for n in names]) for s in sets]
    sizes = {(len(prune.circuit_edges(model, k)), int(k.sum())) for k in seed_keeps}
    assert (info["n_edges"], info["n_nodes"]) == (len(prune.circuit_edges(model, keep)),
                                                  int(keep.sum())) <= min(sizes)


def test_core_is_the_intersection_of_the_seeds_circuits():
    model, means, (keep, info) = search_backup_model()
    data, sets = planted_data(), [set(s["nodes"]) for s in info["seeds"].values()]
    spread = prune.seed_spread(model, means, info, data, data)
    assert set(spread["core"]) == set.intersection(*sets) != set()
    sizes = sorted(map(len, sets))
    assert spread["n_nodes"] == [sizes[0], sizes[1], sizes[-1]]  # min, (low) median, max
    jaccard = [len(a & b) / len(a | b) for a in sets for b in sets if a is not b]
    assert spread["overlap"] == pytest.approx(sum(jaccard) / len(jaccard)) and spread["overlap"] < 1
    core = torch.tensor([float(n in spread["core"]) for n in prune.node_names(model)])
    z = prune.diff_with(model, means, core, data)
    loss, acc = prune.pair_loss(z, data, *prune.fit_calibration(z, data))
    assert spread["core_sufficiency"] == {"loss": loss.item(), "acc": acc}


def test_a_looser_target_never_gives_a_larger_circuit(monkeypatch):
    strict = search_backup_model()[2][1]
    loose = search_backup_model("--target_loss=0.3")[2][1]
    assert (loose["n_edges"], loose["n_nodes"]) <= (strict["n_edges"], strict["n_nodes"])
    # even when the search at the looser target itself finds nothing, the stricter one's
    # circuit (which reaches the looser target too) is the answer, after its own drop pass
    search = prune.smallest_circuit
    monkeypatch.setattr(prune, "smallest_circuit", lambda *a: None if a[4] == 0.3 else search(*a))
    loose = search_backup_model("--target_loss=0.3")[2][1]
    assert (loose["n_edges"], loose["n_nodes"]) <= (strict["n_edges"], strict["n_nodes"])
    assert all(s["nodes"] is None for s in loose["seeds"].values())


def test_calibration_scale_is_bounded_so_separation_alone_cannot_reach_zero_loss():
    data = planted_data(16)
    z = 0.1 * data["sign"]  # every pair separated, by a tiny margin
    scale, shift = prune.fit_calibration(z, data)
    # the loss falls as the scale grows, so the fit runs to the bound; the margin is then
    # 4 x 0.1 = 0.4 on every prompt, loss log(1 + e^-0.4)
    assert 3.9 < scale <= prune.MAX_SCALE and abs(shift) < 1e-3
    loss, acc = prune.pair_loss(z, data, scale, shift)
    assert acc == 1.0 and loss.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-2)
    wrong = -z  # the scale stays positive: a circuit that answers backwards stays wrong
    assert prune.pair_loss(wrong, data, *prune.fit_calibration(wrong, data))[0] > 0.6
    # every prompt biased towards token_a by 2: the shift takes the bias away (-2 x the scale),
    # leaving the same margin 4 x 0.1 as above
    biased = z + 2.0
    loss, acc = prune.pair_loss(biased, data, *prune.fit_calibration(biased, data))
    assert acc == 1.0 and loss.item() == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-2)
    # the same difference on both prompts of every pair (context-blind): a scale and a shift of
    # it favour the same token on both, so one prompt of each pair is wrong; the best is log 2
    blind = torch.full_like(z, 3.0)
    loss, _ = prune.pair_loss(blind, data, *prune.fit_calibration(blind, data))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-3)


def test_control_swaps_whole_pairs_by_a_seeded_coin():
    data = planted_data(64)
    a, b = prune.shuffled(data, 1), prune.shuffled(data, 1)
    assert torch.equal(a["sign"], b["sign"]) and torch.equal(a["idx"], data["idx"])
    flipped = (a["sign"] != data["sign"]).view(-1, 2)
    assert (flipped[:, 0] == flipped[:, 1]).all()  # both prompts of a pair, or neither
    assert 16 < int(flipped[:, 0].sum()) < 48  # about half the pairs
    assert not torch.equal(prune.shuffled(data, 2)["sign"], a["sign"])


def test_heaviside_gradient_is_the_sigmoid_derivative():
    tau = torch.tensor([-1.0, -0.3, 0.0, 0.2, 1.0], requires_grad=True)
    for temp in (1.0, 0.5):
        h = prune.HeavisideSTE.apply(tau, temp)
        assert h.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
        (grad,) = torch.autograd.grad((h * torch.arange(5.0)).sum(), tau)
        smooth = tau.detach().clone().requires_grad_()  # what the backward pretends ran
        (expected,) = torch.autograd.grad((torch.sigmoid(smooth / temp) * torch.arange(5.0)).sum(),
                                          smooth)
        torch.testing.assert_close(grad, expected)


def test_mean_ablation_keeping_all_is_exact_and_keeping_none_ignores_the_input():
    # AbsTopK and attention sinks on; no bigram table, whose row would follow the input
    model = hand_gpt(vocab_size=64, n_layer=2, d_model=32, d_head=8, d_mlp=64, block_size=16,
                     bigram_table=False)
    idx = torch.randint(64, (3, 16))
    means = torch.randn(len(prune.node_names(model)))
    plain, _ = model(idx)
    with prune.ablated(model, means, torch.ones_like(means)):
        assert torch.equal(model(idx)[0], plain)
    with prune.ablated(model, means, torch.zeros_like(means)):
        ablated, _ = model(idx)
        assert torch.equal(model(torch.randint(64, (3, 16)))[0], ablated)
    assert torch.equal(ablated, ablated[:1, :1].expand_as(ablated))  # the same at every position
    assert all(node.hook is None for node in model.nodes())


def test_answer_diff_matches_tasks_scoring():
    model = hand_gpt(n_layer=2, d_model=16, d_mlp=32)  # with a bigram table, added by answer_diff
    with torch.no_grad():
        model.bigram.weight.normal_()
    tokenizer, pairs = byte_tokenizer(), [planted_task(random.Random(i)) for i in range(40)]
    data = tasks.encode_pairs(tokenizer, pairs, 8, torch.device("cpu"))
    margin = tasks.margins(model, tokenizer, pairs)
    # 80 prompts of 4 to 8 tokens: answer_diff's chunks of 32, each of similar lengths
    torch.testing.assert_close(data["sign"] * prune.answer_diff(model, data), margin)
    loss, acc = prune.pair_loss(prune.answer_diff(model, data), data)
    ref_loss, ref_acc = task_loss(model, tokenizer, pairs)
    torch.testing.assert_close(loss, ref_loss)
    assert acc == ref_acc


def test_answer_diff_runs_the_models_own_blocks_so_a_changed_block_changes_both(monkeypatch):
    """GPT.answer_diff (the shortcut prune.py trains masks with) is built from the model's own
    blocks: change Block.sublayer and MLP.forward, and it still equals forward's logits."""
    model = hand_gpt(n_layer=2, d_model=16, d_mlp=32)
    with torch.no_grad():
        model.bigram.weight.normal_()
    pairs = [planted_task(random.Random(i)) for i in range(8)]
    data = tasks.encode_pairs(byte_tokenizer(), pairs, 8, torch.device("cpu"))

    def changed_sublayer(self, j, x):  # half the attention, twice the MLP
        if j == 0:
            return 0.5 * self.attn(self.attn_in(self.attn_norm(x)))
        return 2 * self.mlp(self.mlp_in(self.mlp_norm(x)))

    def diffs():
        rows = torch.arange(len(data["last"]))
        logits = model(data["idx"])[0][rows, data["last"]]
        full = logits[rows, data["tok_a"]] - logits[rows, data["tok_b"]]
        return full, prune.answer_diff(model, data)

    before, _ = diffs()
    monkeypatch.setattr(sg.Block, "sublayer", changed_sublayer)
    monkeypatch.setattr(sg.MLP, "forward", lambda self, x: self.resid_delta(
        self.c_proj(self.post_act(torch.tanh(self.c_fc(x))))))
    full, shortcut = diffs()
    assert (full - before).abs().max() > 0.01  # the change matters (here by up to 0.07)
    torch.testing.assert_close(shortcut, full)


def test_edge_counting_on_a_hand_made_weight_pattern():
    model = hand_gpt()
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        attn.c_attn.weight[2, 5] = 0.5  # read 5 -> q channel 2 (head 0)
        attn.c_attn.weight[8 + 7, 5] = -0.25  # read 5 -> k channel 7 (head 1, ch 3)
        attn.c_attn.weight[16 + 1, 6] = 2.0  # read 6 (not kept) -> v channel 1
        attn.c_proj.weight[3, 1] = 1.5  # v channel 1 -> write 3
        mlp.c_fc.weight[4, 5] = 0.75  # mlp read 5 -> neuron 4
        mlp.c_proj.weight[0, 4] = -1.0  # neuron 4 -> write 0
        mlp.c_proj.weight[2, 4] = 1.0  # neuron 4 -> write 2 (not kept)
    names = prune.node_names(model)
    kept = ["0.attn.resid_in.5", "0.attn.q.head0.ch2", "0.attn.k.head1.ch3", "0.attn.v.head0.ch1",
            "0.attn.resid_delta.3", "0.mlp.resid_in.5", "0.mlp.post_act.4", "0.mlp.resid_delta.0"]
    keep = torch.tensor([float(n in kept) for n in names])
    edges = {(names[s], names[d], w) for s, d, w in prune.circuit_edges(model, keep)}
    assert edges == {("0.attn.resid_in.5", "0.attn.q.head0.ch2", 0.5),
                     ("0.attn.resid_in.5", "0.attn.k.head1.ch3", -0.25),
                     ("0.attn.v.head0.ch1", "0.attn.resid_delta.3", 1.5),
                     ("0.mlp.resid_in.5", "0.mlp.post_act.4", 0.75),
                     ("0.mlp.post_act.4", "0.mlp.resid_delta.0", -1.0)}


# -----------------------------------------------------------------------------
# the pruning method, guarded: each expectation below is independent of prune.py's own code (a
# hand-derived value, a planted model whose answer is known, or a property that a wrong
# implementation breaks)


def flat_nodes(model) -> list[tuple[str, int]]:
    """(location, channel) of every node in forward order: the layout of prune's keep vectors,
    written here from model.nodes() alone."""
    return [(node.name, i) for node in model.nodes() for i in range(node.width)]


@contextlib.contextmanager
def frozen_by_hand(model, means: torch.Tensor, ablate: set[int]):
    """Mean ablation written independently of prune.ablated: each node in `ablate` (flat indices)
    has its value replaced by its mean, at every position."""
    where = {}
    for j, (loc, i) in enumerate(flat_nodes(model)):
        if j in ablate:
            where.setdefault(loc, []).append((i, means[j].item()))

    def freeze(name, x):
        x = x.clone()
        for i, m in where.get(name, ()):
            x[..., i] = m
        return x

    for node in model.nodes():
        node.hook = freeze
    try:
        yield
    finally:
        for node in model.nodes():
            node.hook = None


def last_logit_diff(model, data: dict) -> torch.Tensor:
    """logit(token_a) - logit(token_b) at each prompt's last real token, by GPT.forward."""
    logits, _ = model(data["idx"])
    rows = torch.arange(len(data["last"]))
    last = logits[rows, data["last"]]
    return last[rows, data["tok_a"]] - last[rows, data["tok_b"]]


def test_a_pruned_node_is_frozen_at_its_mean_and_a_kept_one_passes_through():
    model = hand_gpt(vocab_size=64, n_layer=2, d_model=16, d_mlp=32, block_size=16)
    nodes = flat_nodes(model)
    means = torch.randn(len(nodes), generator=torch.Generator().manual_seed(1))  # far from 0
    ablate = set(range(3, len(nodes), 7))  # some nodes at every location
    keep = torch.tensor([float(j not in ablate) for j in range(len(nodes))])
    idx = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(2))
    seen = {}
    with prune.ablated(model, means, keep):
        for node in model.nodes():  # record what each node passes on, after the gate
            node.hook = (lambda gate: lambda name, x: seen.setdefault(name, gate(name, x)))(
                node.hook)
        logits, _ = model(idx)
    for j, (loc, i) in enumerate(nodes):
        if j in ablate:  # every position of every prompt holds the mean: not 0, not the input
            assert (seen[loc][..., i] == means[j]).all(), (loc, i)
    with frozen_by_hand(model, means, ablate):
        expected, _ = model(idx)
    torch.testing.assert_close(logits, expected)


def test_node_means_average_every_position_of_the_text():
    """On a text of one repeated token every window is the same, so the mean over windows is the
    mean over the positions of one window, computed here with a plain recording hook. The
    attention sink makes the positions differ (a softmax over t + 1 keys and the sink)."""
    model = hand_gpt(vocab_size=64, n_layer=1, d_model=16, d_mlp=32, block_size=8)
    tokens = np.full(500, 7, dtype=np.uint16)
    got = prune.compute_means(model, tokens, n_batches=3, batch_size=2)
    seen = {}
    for node in model.nodes():
        node.hook = lambda name, x: seen.setdefault(name, x.detach())  # one call each
    with torch.no_grad():
        model(torch.full((1, 8), 7))
    for node in model.nodes():
        node.hook = None
    per_position = torch.cat([seen[node.name][0] for node in model.nodes()], dim=1)  # (8, N)
    assert (per_position.std(0) > 1e-3).any()  # positions differ: the average is not trivial
    torch.testing.assert_close(got, per_position.mean(0), atol=1e-5, rtol=1e-5)


def planted_means(model) -> torch.Tensor:
    return prune.compute_means(model, noise_tokens(), n_batches=8, batch_size=16)


def mask_cfg(*argv):
    return sg.parse_config(["--steps=60", "--lr=3e-2", *argv], prune.DEFAULTS, presets=None)


def test_learned_masks_rank_the_planted_nodes_first_clamped_and_penalised():
    """The planted circuit's 5 nodes are the only ones that carry the answer, so the masks must
    rank them first. The penalty must prune most of the rest (measured: 10 of 72 kept; without
    it, k_coef 1e-9, 34 of 72 stay kept: only noise moves them), and the clamp holds every tau in
    [-1, 1] (the planted ones are pushed against it)."""
    model = planted_model()
    means, names = planted_means(model), prune.node_names(model)
    tau = prune.train_masks(model, means, planted_data(), mask_cfg(), )
    top = {names[i] for i in tau.argsort(descending=True)[:5].tolist()}
    assert top == set(PLANTED)
    assert tau.abs().max().item() == 1.0  # reached and clamped
    unpenalised = prune.train_masks(model, means, planted_data(), mask_cfg("--k_coef=1e-9"))
    assert 2 * int((tau > 0).sum()) <= int((unpenalised > 0).sum())
    assert all(tau[names.index(n)] > 0 for n in PLANTED)


def test_every_node_starts_kept_with_small_noise(capsys):
    """Paper 5: a bias of 0.1 and noise of 0.01, so every node starts kept. One step at a tiny
    lr leaves tau where it started."""
    model = planted_model()
    tau = prune.train_masks(model, planted_means(model), planted_data(),
                            mask_cfg("--steps=1", "--lr=1e-9"))
    assert "| kept 72 |" in capsys.readouterr().out.splitlines()[-1]  # 72 nodes: see test_main_writes_json_txt_and_svg
    assert 0.05 < tau.min() and tau.max() < 0.15 and 0.005 < tau.std() < 0.02


def test_mask_training_follows_the_papers_optimizer_and_lr_schedule(monkeypatch):
    """Paper 5: AdamW, beta2 0.95, weight decay 1e-3, warmup over the first 5% of steps, then a
    linear decay. By hand for 40 steps at lr 0.02: warmup round(0.05 * 40) = 2 steps (0.01,
    0.02), then 0.02 * (40 - t) / 38 at step t, down to 0.02 / 38 at the last."""
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            g = self.param_groups[0]
            seen.append((g["lr"], g["betas"], g["weight_decay"]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    model = planted_model()
    prune.train_masks(model, planted_means(model), planted_data(16),
                      mask_cfg("--steps=40", "--lr=0.02"), )
    lrs = [lr for lr, _, _ in seen]
    expected = [0.01, 0.02] + [0.02 * (40 - t) / 38 for t in range(2, 40)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert {(b, wd) for _, b, wd in seen} == {((0.9, 0.95), 1e-3)}


def bigram_answered_model() -> sg.GPT:
    """The planted model plus a bigram table whose rows for X and Y already favour A and B by 5:
    the task needs no node at all (like else_elif in the cpu model)."""
    model = hand_gpt(afrac=1.0, attn_sink=False)
    state = planted_model().state_dict()
    table = torch.zeros(257, 257)
    table[ord("X"), ord("A")] = table[ord("Y"), ord("B")] = 5.0
    model.load_state_dict({**state, "bigram.weight": table})
    return model.requires_grad_(False)


def test_the_search_can_return_the_empty_circuit():
    """With every node mean-ablated the bigram table alone gives a margin of 5 on every prompt:
    loss log(1 + e^-5) = 0.0067, below the 0.15 target, so the smallest circuit has 0 nodes."""
    model = bigram_answered_model()
    means = planted_means(model)
    keep, info = prune.find_circuit(model, means, planted_data(), mask_cfg())
    assert all(s["bisection_nodes"] == 0 for s in info["seeds"].values()) and int(keep.sum()) == 0
    checks = prune.run_checks(model, means, keep, planted_data(), (1.0, 0.0), 0)
    assert checks["empty_circuit"]["acc"] == 1.0
    assert checks["empty_circuit"]["loss"] == pytest.approx(math.log1p(math.exp(-5)), rel=1e-3)


def test_each_check_ablates_the_node_set_it_names():
    """On the planted model with its planted circuit, each check against the same node set
    ablated by hand (frozen_by_hand) or derived: the circuit and the empty set leave channel 1
    of the unembedding at its mean, 0 (the means come from text without X or Y), so both
    answers get the same logit: loss log 2, no prompt strictly right."""
    model = planted_model()
    means, names, data = planted_means(model), prune.node_names(model), planted_data()
    circuit = {names.index(n) for n in PLANTED}
    keep = torch.tensor([float(j in circuit) for j in range(len(names))])
    everything = set(range(len(names)))
    by_hand, calib = {}, (2.0, 0.1)  # sufficiency alone is calibrated: margin sign * (2 z + 0.1)
    for check, ablate, (scale, shift) in (
            ("full", set(), (1, 0)), ("sufficiency", everything - circuit, calib),
            ("sufficiency_uncalibrated", everything - circuit, (1, 0)),
            ("necessity", circuit, (1, 0)), ("empty_circuit", everything, (1, 0))):
        with frozen_by_hand(model, means, ablate), torch.no_grad():
            z = scale * last_logit_diff(model, data) + shift
            by_hand[check] = F.softplus(-data["sign"] * z).mean().item()
    randoms = []
    for seed in range(10):
        checks = prune.run_checks(model, means, keep, data, calib, seed)
        for check, loss in by_hand.items():
            assert checks[check]["loss"] == pytest.approx(loss, abs=1e-5), (check, seed)
        assert checks["necessity"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert checks["necessity"]["acc"] == checks["empty_circuit"]["acc"] == 0.0
        assert checks["full"]["acc"] == checks["sufficiency"]["acc"] == 1.0
        randoms.append(checks["random_ablation"])
    # a random 5 of the 72 nodes misses the 5 planted ones with probability C(67,5)/C(72,5) =
    # 0.69, and then costs no accuracy (the noise nodes only rescale channel 1 through the final
    # norm); when it hits one it costs some. Not the circuit: some seeds keep 100%.
    assert sum(r["acc"] == 1.0 for r in randoms) >= 3
    assert any(r["acc"] < 1.0 for r in randoms)  # and of the circuit's size, not empty
    assert len({round(r["loss"], 6) for r in randoms}) > 2  # a different set for each seed


def test_attribution_ranks_the_unembedding_read_first_and_the_noise_last():
    """|gradient x (activation - mean)| is largest where all of the answer passes,
    final.resid_in.1 (the unembedding reads nothing else for A and B), and 0 on a node that never
    moves from its mean or reaches no answer logit, like the reads of noise-free channel 0 by
    attention (the attention block reads only channels 2..7)."""
    model = planted_model()
    means, names = planted_means(model), prune.node_names(model)
    order = [names[i] for i in prune.attribution_order(model, means, planted_data()).tolist()]
    assert order[0] == "final.resid_in.1"
    assert order.index("0.mlp.resid_in.0") < 10 and order.index("0.attn.resid_in.0") > 36


def test_edges_are_counted_in_every_layer_and_embedding_edges_over_read_channels_only():
    """Hand-made weights in both layers; every expected edge and count written out by hand."""
    model = hand_gpt(n_layer=2)  # d_model 8, 2 heads of 4, d_mlp 8
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        b0, b1 = model.blocks
        b0.mlp.c_fc.weight[4, 5] = 0.75  # layer 0: read 5 -> neuron 4
        b1.attn.c_attn.weight[16 + 4, 1] = 0.5  # layer 1: read 1 -> v channel 4 (head 1, ch 0)
        b1.attn.c_proj.weight[7, 4] = -2.0  # v channel 4 -> write 7
        b1.mlp.c_fc.weight[3, 2] = 1.25  # mlp read 2 -> neuron 3
        b1.mlp.c_proj.weight[6, 3] = 0.25  # neuron 3 -> write 6
        for t, ch in ((10, 5), (10, 6), (11, 2), (11, 0), (12, 5), (13, 5)):
            model.wte.weight[t, ch] = 1.0
        model.lm_head.weight[ord("A"), 0] = 0.5
        model.lm_head.weight[ord("B"), 3] = 1.0  # channel 3 is not read by a kept node
    names = prune.node_names(model)
    kept = ["0.mlp.resid_in.5", "0.mlp.post_act.4", "1.attn.resid_in.1", "1.attn.v.head1.ch0",
            "1.attn.resid_delta.7", "1.mlp.resid_in.2", "1.mlp.post_act.3", "1.mlp.resid_delta.6",
            "final.resid_in.0"]
    keep = torch.tensor([float(n in kept) for n in names])
    edges = {(names[s], names[d], w) for s, d, w in prune.circuit_edges(model, keep)}
    assert edges == {("0.mlp.resid_in.5", "0.mlp.post_act.4", 0.75),
                     ("1.attn.resid_in.1", "1.attn.v.head1.ch0", 0.5),
                     ("1.attn.v.head1.ch0", "1.attn.resid_delta.7", -2.0),
                     ("1.mlp.resid_in.2", "1.mlp.post_act.3", 1.25),
                     ("1.mlp.post_act.3", "1.mlp.resid_delta.6", 0.25)}
    # read channels 5 (layer 0 mlp), 1 (layer 1 attn), 2 (layer 1 mlp), 0 (final): of the prompt
    # tokens 10, 11, 12 that is (10, 5), (11, 2), (11, 0), (12, 5); (10, 6) reaches no kept read
    # and token 13 is not in the prompts
    n_embed, unembed = prune.token_edges(model, keep, [10, 11, 12], [ord("A"), ord("B")])
    assert n_embed == 4
    assert [(names[s], t, w) for s, t, w in unembed] == [("final.resid_in.0", ord("A"), 0.5)]


def test_node_names_follow_the_official_hook_channels():
    """README: L.attn.k.headH.chC is channel H * d_head + C of their hook 'L.attn.k' (the k part
    of c_attn's output, after AbsTopK), and the locations are the 8 of a block plus the
    unembedding's reads. Checked on the value itself: the hook at k, channel 1 * 4 + 2 = 6,
    equals the attention read times row 8 + 6 of c_attn (k rows start after the 8 q rows)."""
    model = hand_gpt(afrac=1.0)  # d_model 8, 2 heads of 4
    names = prune.node_names(model)
    at = {}
    for n in names:
        at.setdefault(prune.location(n), []).append(n)
    assert set(at) == {"0.attn.resid_in", "0.attn.q", "0.attn.k", "0.attn.v",
                       "0.attn.resid_delta", "0.mlp.resid_in", "0.mlp.post_act",
                       "0.mlp.resid_delta", "final.resid_in"}
    assert at["0.attn.k"][6] == "0.attn.k.head1.ch2" and at["0.attn.v"][3] == "0.attn.v.head0.ch3"
    assert at["final.resid_in"][7] == "final.resid_in.7" and len(names) == 9 * 8
    seen = {}
    for node in model.nodes():
        node.hook = lambda name, x: seen.setdefault(name, x)  # one call each
    model(torch.randint(257, (1, 8)))
    k6 = seen["0.attn.resid_in"] @ model.blocks[0].attn.c_attn.weight[8 + 6]
    torch.testing.assert_close(seen["0.attn.k"][..., 6], k6)


# -----------------------------------------------------------------------------
# the command line, end to end, on the planted model saved as a checkpoint


def save_hand_model(model, out, data_dir):
    """out/ckpt.pt + the byte tokenizer beside it; val.bin of noise text in data_dir."""
    out.mkdir()
    data_dir.mkdir(exist_ok=True)
    noise_tokens().tofile(data_dir / "val.bin")
    config = {**model.cfg, "batch_size": 16}
    ckpt = {"model": model.state_dict(), "config": config, "data_path": str(data_dir)}
    torch.save(ckpt, out / "ckpt.pt")
    sg.save_tokenizer({bytes([i]): i for i in range(256)}, str(out / "tokenizer.tiktoken"))
    return out / "ckpt.pt"


@pytest.fixture
def planted_ckpt(tmp_path, monkeypatch):
    """out/ckpt.pt + tokenizer + val.bin of noise text; tasks.py knows one task, 'planted'."""
    monkeypatch.setattr(tasks, "TASKS", {"planted": planted_task})
    monkeypatch.setattr(tasks, "ALL", {"planted": planted_task})
    return save_hand_model(planted_model(), tmp_path / "out", tmp_path / "data")


def test_main_writes_json_txt_and_svg(planted_ckpt, capsys, tmp_path):
    prune.main([f"--ckpt={planted_ckpt}", "--steps=60", "--lr=3e-2", "--n_pairs=32",
                "--mean_batches=4"])
    out = capsys.readouterr().out
    # 72 nodes: one layer of d_model 8, d_mlp 8, q/k/v 8 each: 8 locations of 8 + final 8
    assert "node means: 72 nodes" in out and "accuracy >= 90% on 32 train pairs (tasks.py's table: test pairs): planted" in out
    assert "geometric mean of edges over 1 tasks: 4.0" in out  # the 4 planted edges
    row = next(line.split() for line in out.splitlines() if line.startswith("planted "))
    seeds = json.loads((planted_ckpt.parent / "circuits" / "planted.json").read_text())["seeds"]
    assert row[-5:] == [prune.spread(seeds["n_nodes"]), prune.spread(seeds["n_edges"]),
                        str(len(seeds["core"])), f"{seeds['core_sufficiency']['acc']:.0%}",
                        prune.spread(seeds["overlap"])]  # the seeds' spread, core and overlap
    circuits = planted_ckpt.parent / "circuits"
    result = json.loads((circuits / "planted.json").read_text())
    assert sorted(result["circuit"]["nodes"]) == sorted(PLANTED)
    checks = result["checks"]
    assert checks["sufficiency"]["acc"] == 1.0 and checks["necessity"]["acc"] <= 0.75
    assert set(checks) == {"full", "sufficiency", "sufficiency_uncalibrated", "necessity",
                           "random_ablation", "empty_circuit"}
    # the checks run on the held-out test pairs: the whole model's loss there, by GPT.forward
    test = tasks.encode_pairs(byte_tokenizer(), tasks.make_pairs("planted", 32, 0, "test"), 8)
    with torch.no_grad():
        held_out = F.softplus(-test["sign"] * last_logit_diff(planted_model(), test)).mean()
    assert checks["full"]["loss"] == pytest.approx(held_out.item(), abs=1e-6)
    # shuffled answers carry no signal the model could read: the control finds no circuit
    assert result["control"]["n_edges"] is None and result["control"]["n_nodes"] is None
    assert "fail" in out
    unembed = {tuple(e[:2]) for e in result["circuit"]["unembed_edges"]}
    assert unembed == {("final.resid_in.1", "A"), ("final.resid_in.1", "B")}
    text = (circuits / "planted.txt").read_text()
    assert "[0.mlp.post_act]" in text and "-> 0.mlp.resid_delta.1 (+1.000)" in text
    # the planted circuit's calibration sits at its bound (its logit difference is small)
    assert "CALIBRATION AT ITS BOUND (scale 4.00" in text and "full model acc 100.0%" in text
    assert "0.mlp.post_act.0: on 'X' +17.319, on 'Y' +0.000, on other tokens +0.000" in text
    svg = ET.parse(circuits / "planted.svg").getroot()
    labels = ["".join(t.itertext()) for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert {"read ch0", "neuron 0", "neuron 1", "write ch1", "read ch1", "A", "B",
            "+10.00", "-10.00", "+1.00", "-1.00", "X +17 Y +0.00 else +0.00", "top X"} <= set(labels)
    assert any(s.startswith("CALIBRATION AT ITS BOUND") for s in labels)
    assert any(s.startswith("test pairs: full model acc 100.0% | circuit alone acc") for s in labels)
    result["full_train_acc"] = 0.5  # as if the model did not solve it: every output says so
    for written in (prune.circuit_txt(result), prune.circuit_svg(result)):
        assert "UNSOLVED: the full model scores 50.0% on the train pairs" in written
    # a search that finds nothing marks the circuit found before as stale
    prune.main([f"--ckpt={planted_ckpt}", "--tasks=planted", "--steps=2", "--control=False",
                "--target_loss=1e-9", "--n_pairs=8", "--mean_batches=4"])
    assert sorted(os.listdir(circuits)) == ["planted.stale.json", "planted.stale.svg",
                                            "planted.stale.txt"]


def test_control_false_skips_the_control_search(planted_ckpt, capsys):
    prune.main([f"--ckpt={planted_ckpt}", "--steps=60", "--lr=3e-2", "--n_pairs=32",
                "--mean_batches=4", "--control=False", "--tasks=planted"])
    assert "control:" not in capsys.readouterr().out
    assert "control" not in json.loads((planted_ckpt.parent / "circuits" / "planted.json").read_text())


def coin_task(rng) -> tasks.Pair:
    """planted_task with its answers swapped by a coin: the model cannot solve it."""
    p = planted_task(rng)
    return p if rng.random() < 0.5 else tasks.Pair(p.prompt_a, p.prompt_b, "B", "A")


def test_a_task_the_model_does_not_solve_is_refused_unless_asked_and_then_marked(
        planted_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(tasks.ALL, "coin", coin_task)
    argv = [f"--ckpt={planted_ckpt.parent}", "--tasks=coin", "--steps=5", "--n_pairs=16",
            "--mean_batches=4", "--control=False"]
    prune.main(argv)
    out = capsys.readouterr().out
    assert "coin: refused: the full model scores" in out and "--unsolved=True prunes" in out
    assert not (planted_ckpt.parent / "circuits" / "coin.json").exists()
    prune.main(argv + ["--unsolved=True"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("coin ")]
    assert row and row[0].endswith("UNSOLVED")


def test_svg_layout_wraps_a_large_circuit_in_forward_order_without_overlaps():
    nodes = ([f"0.attn.resid_in.{i}" for i in range(30)] + [f"0.attn.{x}.head{h}.ch{c}"
             for h in range(4) for x in "kv" for c in range(3)] + [f"0.attn.q.head0.ch1"] +
             [f"0.mlp.post_act.{i}" for i in range(16)] + [f"final.resid_in.{i}" for i in range(4)])
    pos, rows, height = prune.svg_layout(nodes, [])
    assert len(pos) == len(nodes)
    assert max(x for x, _ in pos.values()) + prune.BOX_W / 2 <= prune.WIDTH
    assert max(y for _, y in pos.values()) + prune.BOX_H / 2 <= height
    for (x1, y1), (x2, y2) in itertools.combinations(pos.values(), 2):
        assert abs(x1 - x2) >= prune.BOX_W or abs(y1 - y2) >= prune.BOX_H
    spans = [[y for n, (_, y) in pos.items() if prune.row_of(n) == row] for row, _ in rows]
    assert all(max(a) < min(b) for a, b in zip(spans, spans[1:]))  # rows never interleave


def test_tokens_show_their_spaces_newlines_and_tabs():
    assert prune.shown(" x\n\ty") == "␣x↵⇥y" and prune.shown("abcdefghij") == "abcdefgh"


def test_key_tokens_are_where_the_two_prompts_of_a_pair_differ():
    pairs = [tasks.Pair('f("ab', "f('ab", "1", "2"), tasks.Pair("xAy", "xBBy", "1", "2")]
    data = tasks.encode_pairs(byte_tokenizer(), pairs, 8)
    key = prune.key_positions(data)
    assert [row.nonzero()[:, 0].tolist() for row in key] == [[2], [2], [1], [1, 2]]


def test_head_attention_in_the_outputs_is_the_models_own_softmax():
    """read_circuit recomputes a head's attention from the recorded q and k; with one-hot values
    the model's own attend_with_sink returns the weights themselves, so the two must agree."""
    model = hand_gpt(d_head=8, afrac=1.0).requires_grad_(False)  # one head of 8 channels
    with torch.no_grad():
        model.blocks[0].attn.sink.fill_(0.5)
    data, keep = planted_data(8), torch.ones(len(prune.node_names(model)))
    means = prune.compute_means(model, noise_tokens(), n_batches=2, batch_size=4)
    head = prune.read_circuit(model, means, keep, data, byte_tokenizer())["heads"]["0.attn.head0"]
    record = {}
    with prune.ablated(model, means, keep, record):
        model(data["idx"])
    B, T = data["idx"].shape
    q, k = (record[f"0.attn.{x}"].view(B, T, 1, 8).transpose(1, 2) for x in "qk")
    eye = torch.eye(T, 8).expand(B, 1, T, 8)
    w = sg.attend_with_sink(q, k, eye, model.blocks[0].attn.sink)[:, 0, :, :T]  # (B, query, key)
    w = w[torch.arange(B), data["last"]]  # from each answer position
    assert head["sink"] == pytest.approx(1 - w.sum(1).mean().item(), abs=1e-3)
    for side, rows in (("a", slice(0, None, 2)), ("b", slice(1, None, 2))):
        share = {}
        for r in range(B)[rows]:
            for t in range(data["last"][r] + 1):
                tok = chr(data["idx"][r, t].item())
                share[tok] = share.get(tok, 0) + w[r, t].item() / (B // 2)
        for tok, v in head[f"attends_{side}"]:
            assert v == pytest.approx(share[tok], abs=1e-3)
        assert [t for t, _ in head[f"attends_{side}"]] == sorted(share, key=share.get)[::-1][:2]


def test_bad_checkpoint_or_task_is_a_clear_one_line_error(tmp_path, planted_ckpt):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    other = {"model": {"wte.weight": torch.zeros(3, 3)}, "config": {"n_layer": 1}}
    torch.save(other, tmp_path / "other.pt")
    cases = {f"--ckpt={tmp_path / 'missing.pt'}": "not found",
             f"--ckpt={tmp_path / 'junk.pt'}": "cannot read checkpoint",
             f"--ckpt={tmp_path / 'other.pt'}": "does not match this model code",
             f"--ckpt={planted_ckpt} --tasks=planted,no_such_task": "unknown task 'no_such_task'",
             "--no_such_key=1": "unknown config key"}
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as e:
            prune.main(argv.split() + ["--tasks=planted"] * ("--tasks" not in argv))
        assert message in str(e.value) and "\n" not in str(e.value), argv


# -----------------------------------------------------------------------------
# bad input: every case exits non-zero with one "error: ..." line, no traceback, and leaves the
# files already there (a trained run, its tokenizer, its token cache) byte for byte as they were

# a quick search that always finds a circuit: any node set reaches a loss of 50
CIRCUIT_RUN = ["--tasks=for_while", "--steps=2", "--n_pairs=4", "--control=False",
               "--mean_batches=1", "--target_loss=50", "--device=cpu", "--unsolved=True"]
WORLD_RUN = ["--vocab_size=300", "--n_layer=1", "--d_model=16", "--d_head=8", "--d_mlp=32",
             "--block_size=16", "--batch_size=2", "--max_iters=2", "--eval_interval=2",
             "--eval_iters=1", "--log_interval=1", "--density=0.25", "--device=cpu"]


class Evil:
    """A pickle payload: loading it with weights_only=False would create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_run(src, dest, **ckpt_changes):
    """A copy of a run folder, its checkpoint edited; returns the checkpoint's path."""
    shutil.copytree(src, dest)
    if ckpt_changes:
        ckpt = torch.load(dest / "ckpt.pt", weights_only=True)
        torch.save({**ckpt, **ckpt_changes}, dest / "ckpt.pt")
    return dest / "ckpt.pt"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A trained tiny run (run/ckpt.pt, its tokenizer, its token cache) and a folder bad/ of
    damaged files: missing, empty, truncated, corrupt, of the wrong kind, folders."""
    root = tmp_path_factory.mktemp("world")
    for sub in ("corpus", "corpus2", "bad", "empty_dir"):
        (root / sub).mkdir()
    for name in ("colorsys.py", "bisect.py", "abc.py", "fnmatch.py", "glob.py", "stat.py"):
        shutil.copy(os.path.join(sg.stdlib_dir(), name), root / "corpus" / name)
        shutil.copy(os.path.join(sg.stdlib_dir(), name), root / "corpus2" / ("x" + name))
    sg.main([f"--data_dir={root / 'corpus'}", f"--cache_dir={root / 'cache'}",
             f"--out_dir={root / 'run'}"] + WORLD_RUN)
    run, bad = root / "run", root / "bad"
    good = (run / "ckpt.pt").read_bytes()
    (bad / "junk.pt").write_bytes(b"not a checkpoint")
    (bad / "empty.pt").write_bytes(b"")
    (bad / "truncated.pt").write_bytes(good[: len(good) // 2])
    (bad / "folder.pt").mkdir()
    torch.save({"model": Evil(root / "PWNED"), "config": {}}, bad / "evil.pt")
    torch.save([1, 2, 3], bad / "list.pt")
    torch.save({"model": {}, "config": "n_layer=1"}, bad / "config_str.pt")
    torch.save({"model": {"wte.weight": torch.zeros(3, 3)}, "config": {"n_layer": 1}},
               bad / "other_model.pt")
    for name in ("junk", "evil"):
        (bad / f"{name}_run").mkdir()
        shutil.copy(bad / f"{name}.pt", bad / f"{name}_run" / "ckpt.pt")
    copy_run(run, bad / "no_tokenizer")
    (bad / "no_tokenizer" / "tokenizer.tiktoken").unlink()
    for name, text in (("garbage_tok", "this is not base64 at all\n"), ("empty_tok", "")):
        copy_run(run, bad / name)
        (bad / name / "tokenizer.tiktoken").write_text(text)
    copy_run(run, bad / "folder_tok")
    (bad / "folder_tok" / "tokenizer.tiktoken").unlink()
    (bad / "folder_tok" / "tokenizer.tiktoken").mkdir()
    copy_run(run, bad / "circuits_file")
    (bad / "circuits_file" / "circuits").write_text("a file where the circuits folder belongs")
    data_path = torch.load(run / "ckpt.pt", weights_only=True)["data_path"]
    shutil.copytree(data_path, bad / "short_cache")
    (bad / "short_cache" / "val.bin").write_bytes(b"\x01\x00" * 3)  # 3 tokens
    copy_run(run, bad / "short_val", data_path=str(bad / "short_cache"))
    copy_run(run, bad / "missing_val", data_path=str(bad / "nowhere"))
    (bad / "a_file").write_text("x")
    hostile_files(root)
    return root


def hostile_files(root):
    """The second pass's inputs (issue 20), in root/bad2: FIFOs where files are read, a corpus
    file too big or with a name that is not UTF-8, released configs of the wrong type, range or
    size, NaN weights, foreign config keys and tokenizers, a locked run, a run with circuits."""
    run, bad2, corpus = root / "run", root / "bad2", root / "corpus"
    for name, extra in (("fifo_corpus", "pipe.py"), ("big_corpus", "big.py"),
                        ("badname_corpus", b"caf\xe9.py")):
        shutil.copytree(corpus, bad2 / name)
        if name == "fifo_corpus":
            os.mkfifo(bad2 / name / extra)
        elif name == "big_corpus":  # 32 MiB of NULs, sparse: one 32-million-byte pre-token
            with open(bad2 / name / extra, "wb") as f:
                f.truncate(32 * 2**20)
        else:
            open(os.path.join(os.fsencode(bad2 / name), extra), "w").write("x = 1\n")
    for name, file in (("fifo_ckpt", "ckpt.pt"), ("fifo_tok", "tokenizer.tiktoken")):
        copy_run(run, bad2 / name)
        (bad2 / name / file).unlink()
        os.mkfifo(bad2 / name / file)
    beeg = RELEASE_CASES["relu_no_bias"]
    for name, change in (("rel_str", dict(d_model="16")), ("rel_float", dict(n_layer=2.5)),
                         ("rel_neg", dict(d_model=-16)), ("rel_huge", dict(d_model=2**30)),
                         ("rel_afrac", dict(afrac=1.5)), ("rel_afrac0", dict(afrac=0.0)),
                         ("rel_no_vocab", dict(vocab_size=None)), ("rel_fifo", {})):
        write_release(bad2 / name, beeg)
        changed = {k: v for k, v in {**beeg, **change}.items() if v is not None}
        (bad2 / name / "beeg_config.json").write_text(json.dumps(changed))
    (bad2 / "rel_fifo" / "beeg_config.json").unlink()
    os.mkfifo(bad2 / "rel_fifo" / "beeg_config.json")
    write_release(bad2 / "rel_not_flat", beeg)
    torch.save({"transformer.wte.weight": [1.0, 2.0]}, bad2 / "rel_not_flat" / "final_model.pt")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    nan_model = dict(ckpt["model"])
    nan_model["blocks.0.mlp.c_fc.weight"] = nan_model["blocks.0.mlp.c_fc.weight"] * math.nan
    copy_run(run, bad2 / "nan_run", model=nan_model)
    copy_run(run, bad2 / "unknown_key", config={**ckpt["config"], "new_key": 1})
    copy_run(run, bad2 / "typed_key", config={**ckpt["config"], "d_model": "16"})
    copy_run(run, bad2 / "foreign_tok")  # another corpus's tokenizer of the same size
    train, _ = sg.read_corpus(str(root / "corpus2"))
    sg.save_tokenizer(sg.train_bpe(train[::-1][:2], 300), str(bad2 / "foreign_tok" /
                                                               "tokenizer.tiktoken"))
    copy_run(run, bad2 / "locked_run")
    (bad2 / "locked_run" / "run.lock").write_text("")  # the case locks it (flock), as a run does
    copy_run(run, bad2 / "half_run", iter_num=1)  # resuming it trains step 2, then saves
    copy_run(run, bad2 / "circuit_run")
    prune.main([f"--ckpt={bad2 / 'circuit_run' / 'ckpt.pt'}"] + CIRCUIT_RUN)


def snapshot(root) -> dict:
    """path -> sha1 of every file, and None for every folder, under root."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        out.update({os.path.join(dirpath, d): None for d in dirs})
        for n in names:
            if not os.path.isfile(os.path.join(dirpath, n)):  # a FIFO: never opened
                out[os.path.join(dirpath, n)] = "not a file"
                continue
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.join(dirpath, n)] = hashlib.file_digest(f, "sha1").hexdigest()
    return out


def bad_input_cases(w):
    """(script, argv, text the one error line must contain); w is the world's root."""
    run, bad = w / "run", w / "bad"
    data = [f"--data_dir={w / 'corpus'}", f"--cache_dir={w / 'cache'}"]
    ckpt, tasks_ok = f"--ckpt={run / 'ckpt.pt'}", "--tasks=for_while"
    S = [(["--density=1.5"], "density"), (["--density=0"], "density"), (["--afrac=0"], "afrac"),
         (["--afrac=1.5"], "afrac"), (["--n_layer=-1"], "n_layer"), (["--d_model=0"], "d_model"),
         (["--d_head=0"], "d_head"), (["--d_model=100"], "d_head"), (["--d_mlp=0"], "d_mlp"),
         (["--block_size=0"], "block_size"), (["--batch_size=0"], "batch_size"),
         (["--max_iters=0"], "max_iters"), (["--learning_rate=nan"], "learning_rate"),
         (["--learning_rate=-1"], "learning_rate"), (["--learning_rate=inf"], "learning_rate"),
         (["--adam_eps=0"], "adam_eps"), (["--weight_decay=-0.1"], "weight_decay"),
         (["--warmup_frac=1.5"], "warmup_frac"), (["--anneal_frac=-1"], "anneal_frac"),
         (["--embed_ratio=0"], "embed_ratio"), (["--min_per_neuron=-1"], "min_per_neuron"),
         (["--min_per_neuron=64"], "min_per_neuron"), (["--vocab_size=100"], "vocab_size"),
         (["--vocab_size=70000"], "vocab_size"), (["--eval_interval=0"], "eval_interval"),
         (["--eval_iters=0"], "eval_iters"), (["--log_interval=0"], "log_interval"),
         (["--device=tpu"], "device"), (["--init_from=restart"], "init_from"),
         (["--preset=huge"], "preset"), (["--n_layers=3"], "n_layers"), (["n_layer=3"], "--key"),
         (["--n_layer=three"], "n_layer"), (["--compile=maybe"], "compile"),
         (["--out_dir="], "out_dir"), ([f"--data_dir={w / 'nowhere'}"], "nowhere"),
         ([f"--data_dir={w / 'empty_dir'}"], "empty_dir"),
         ([f"--data_dir={bad / 'a_file'}"], "a_file"),
         ([f"--out_dir={run}"], "ckpt.pt"),  # a scratch run over a trained one
         (["--init_from=resume", f"--out_dir={w / 'empty_dir'}"], "not found"),
         (["--init_from=resume", f"--out_dir={run}", "--n_layer=3"], "n_layer"),
         (["--init_from=resume", f"--out_dir={run}", f"--data_dir={w / 'corpus2'}"], "data_dir"),
         (["--init_from=resume", f"--out_dir={bad / 'junk_run'}"], "junk_run"),
         (["--init_from=resume", f"--out_dir={bad / 'evil_run'}"], "evil_run"),
         (["--vocab_size=9000"], "vocab_size"), (["--block_size=20000"], "block_size"),
         ([f"--cache_dir={bad / 'a_file'}"], "a_file"), ([f"--out_dir={bad / 'a_file'}"], "a_file"),
         (["--out_dir=/sys/sparse_gpt_test"], "sparse_gpt_test"),
         (["--device=mps"], "mps")]
    T = [(["--n=0"], "n"), (["--n=-5"], "n"), (["--split=val"], "split"),
         (["--tasks=nope"], "nope"),
         (["--device=tpu"], "device"), (["--seed=x"], "seed"),
         ([f"--ckpt={w / 'missing.pt'}"], "missing.pt")]
    T += [([f"--ckpt={bad / n}", tasks_ok], n) for n in ("junk.pt", "empty.pt", "truncated.pt",
          "folder.pt", "evil.pt", "list.pt", "config_str.pt", "other_model.pt")]
    T += [([f"--ckpt={bad / n / 'ckpt.pt'}", tasks_ok], "tokenizer") for n in
          ("no_tokenizer", "garbage_tok", "empty_tok", "folder_tok")]
    P = [([ckpt, tasks_ok, f"--{kv}"], kv.split("=")[0]) for kv in
         ("k_coef=abc", "k_coef=-1", "k_coef=nan", "k_coef=inf", "n_pairs=0", "steps=0",
          "control=maybe", "solved_acc=1.5", "solved_acc=0", "target_loss=0", "lr=0",
          "heaviside_temp=0", "mean_batches=0", "device=gpu", "tasks=no_such", "ckpt=")]
    P += [([f"--ckpt={bad / 'evil.pt'}", tasks_ok], "evil.pt"),
          ([f"--ckpt={bad / 'circuits_file' / 'ckpt.pt'}", tasks_ok], "circuits"),
          ([f"--ckpt={bad / 'short_val' / 'ckpt.pt'}", tasks_ok], "val.bin"),
          ([f"--ckpt={bad / 'missing_val' / 'ckpt.pt'}", tasks_ok], "val.bin")]
    tiny_run = data + WORLD_RUN + [f"--out_dir={w / 'new'}"]  # what follows overrides these
    return ([("sparse_gpt.py", tiny_run + a, m) for a, m in S] + [("tasks.py", a, m) for a, m in T]
            + [("prune.py", a, m) for a, m in P] + hostile_cases(w, tiny_run))


def hostile_cases(w, tiny_run):
    """The second pass (issue 20): (script, argv, text of the one line, setup) where setup may
    set environment variables ("env"), a file-size limit ("fsize": a full disk past it) or hold
    a run's lock on a folder ("flock")."""
    b2, ckpt, tasks_ok = w / "bad2", f"--ckpt={w / 'run' / 'ckpt.pt'}", "--tasks=for_while"
    torchrun = {"RANK": "1", "WORLD_SIZE": "2"}
    resume = lambda name: ["--init_from=resume", f"--out_dir={b2 / name}"]  # noqa: E731
    S = [([f"--data_dir={b2 / c}", "--vocab_size=9000"], "yields only", {"prints": skipped})
         for c, skipped in (("fifo_corpus", "(1 skipped"), ("big_corpus", "(1 skipped"),
                            ("badname_corpus", "(0 skipped"))]  # read, then a BPE too small
    S += [(["--d_model=1000000000", "--d_head=8"], "GiB", {}), (["--n_head=-1"], "n_head", {}),
          (["--max_iters=1000000000000"], "max_iters", {}),
          (["--seed=100000000000000000000000"], "seed", {}),
          (["--eval_iters=1000000000"], "eval_iters", {}), ([], "RANK", {"env": torchrun}),
          (resume("locked_run"), "in use by another run", {"flock": b2 / "locked_run"}),
          (resume("nan_run"), "blocks.0.mlp.c_fc.weight; start a new run", {}),
          (resume("unknown_key"), "new_key", {}), (resume("typed_key"), "d_model='16'", {}),
          (resume("half_run"), "half_run/ckpt.pt", {"fsize": 20_000})]
    T = [([f"--ckpt={b2 / 'fifo_ckpt' / 'ckpt.pt'}"], "not a regular file", {}),
         ([f"--ckpt={b2 / 'fifo_tok' / 'ckpt.pt'}"], "not a regular file", {}),
         ([f"--ckpt={b2 / 'rel_fifo'}"], "not a regular file", {}),
         ([f"--ckpt={b2 / 'rel_str'}"], "d_model='16' is not of type int", {}),
         ([f"--ckpt={b2 / 'rel_float'}"], "n_layer=2.5 is not of type int", {}),
         ([f"--ckpt={b2 / 'rel_neg'}"], "d_model=-16 is invalid", {}),
         ([f"--ckpt={b2 / 'rel_huge'}"], "GiB", {}),
         ([f"--ckpt={b2 / 'rel_afrac'}"], "afrac=1.5 is invalid", {}),
         ([f"--ckpt={b2 / 'rel_afrac0'}"], "afrac=0.0 is invalid", {}),
         ([f"--ckpt={b2 / 'rel_no_vocab'}"], "vocab_size is missing", {}),
         ([f"--ckpt={b2 / 'rel_not_flat'}"], "final_model.pt (AttributeError)", {}),
         ([f"--ckpt={b2 / 'nan_run'}"], "NaN or infinite weights in blocks.0.mlp.c_fc", {}),
         ([f"--ckpt={b2 / 'unknown_key' / 'ckpt.pt'}"], "new_key", {}),
         ([f"--ckpt={b2 / 'foreign_tok' / 'ckpt.pt'}"], "is not the tokenizer", {}),
         ([ckpt, "--n=10000000"], "n=10000000", {})]
    P = [([f"--ckpt={b2 / 'nan_run'}"], "NaN or infinite weights in blocks.0.mlp.c_fc", {}),
         ([f"--ckpt={b2 / 'fifo_ckpt'}"], "not a regular file", {}),
         ([f"--ckpt={w / 'bad' / 'circuits_file'}"], "cannot write", {}),  # a run folder
         ([ckpt, "--n_pairs=100000000"], "n_pairs", {}), ([ckpt, "--steps=1000000000"], "steps", {}),
         ([ckpt, "--mean_batches=1000000000"], "mean_batches", {}),
         ([f"--ckpt={b2 / 'circuit_run' / 'ckpt.pt'}"] + CIRCUIT_RUN, "circuits/for_while.json",
          {"fsize": 1000})]  # a full disk at the second of a circuit's three files
    return ([("sparse_gpt.py", tiny_run + a, m, x) for a, m, x in S]
            + [("tasks.py", a + [tasks_ok], m, x) for a, m, x in T]
            + [("prune.py", a + [tasks_ok], m, x) for a, m, x in P])


def bad_function_calls(w):
    """(call, the exception it must raise, text its one-line message must contain)."""
    bad, run = w / "bad", w / "run"
    small = sg.parse_config([f"--data_dir={w / 'corpus'}", f"--cache_dir={w / 'cache'}",
                             f"--out_dir={w / 'new'}"] + WORLD_RUN)
    loaded = lambda path: sg.load_checkpoint(str(path))  # noqa: E731
    absent = "mps" if torch.cuda.is_available() else "cuda"
    return [(lambda: sg.parse_config(["--density=2"]), SystemExit, "density"),
            (lambda: sg.parse_config(["--learning_rate=nan"]), SystemExit, "learning_rate"),
            (lambda: loaded(bad / "evil.pt"), SystemExit, "evil.pt"),
            (lambda: loaded(bad / "folder.pt"), SystemExit, "folder.pt"),
            (lambda: sg.read_checkpoint(str(bad / "list.pt")), SystemExit, "list.pt"),
            (lambda: sg.load_tokenizer(str(bad / "garbage_tok" / "tokenizer.tiktoken")),
             SystemExit, "garbage_tok"),
            (lambda: sg.pick_device("mps"), SystemExit, "mps"),
            (lambda: sg.list_py_files(str(bad / "a_file")), SystemExit, "a_file"),
            (lambda: sg.prepare_data(sg.Config(small, vocab_size=9000)), SystemExit, "vocab_size"),
            (lambda: tasks.make_pairs("nope", 2), ValueError, "task 'nope'"),
            (lambda: tasks.make_pairs("for_while", 2, split="val"), ValueError, "split='val'"),
            (lambda: tasks.evaluate(*loaded(run / "ckpt.pt")[:2], ["for_while"], n=0), ValueError,
             "n=0"),
            # the second pass (issue 20)
            (lambda: tasks.evaluate(*loaded(run / "ckpt.pt")[:2], ["for_while"], batch_pairs=0),
             ValueError, "batch_pairs must be at least 1"),
            (lambda: tasks.make_pairs("for_while", "3"), ValueError, "n='3'"),
            (lambda: tasks.margins(*loaded(run / "ckpt.pt")[:2], []), ValueError, "no pairs"),
            (lambda: sg.GPT(sg.Config(sg.DEFAULTS, d_head=0)), ValueError, "d_head"),
            (lambda: sg.load_checkpoint(str(run / "ckpt.pt"), device=absent), SystemExit, absent)]


def raised_in(world, kind, call):
    """Runs call, which must raise kind; returns (the exception info, the world's files before,
    after). Whatever the call created is removed, so that one failure cannot spoil the next."""
    before = snapshot(world)
    try:
        with pytest.raises(kind) as e:
            call()
    finally:
        after = snapshot(world)
        for path in set(after) - set(before):
            shutil.rmtree(path) if after[path] is None else os.remove(path)
    return e, before, after


N_BAD_CALLS = 17


@pytest.mark.parametrize("i", range(N_BAD_CALLS))
def test_bad_input_to_public_functions_raises_one_clear_line(i, world):
    calls = bad_function_calls(world)
    assert len(calls) == N_BAD_CALLS
    call, kind, must_name = calls[i]
    e, before, after = raised_in(world, kind, call)
    message = str(e.value)
    assert "\n" not in message and must_name in message, message
    assert message.startswith("error: ") or kind is not SystemExit, message
    assert after == before


N_BAD_CASES = 89 + 36  # the first pass's, then the second's (hostile_cases)
MAINS = {"sparse_gpt.py": lambda: sg.main, "tasks.py": lambda: tasks.main,
         "prune.py": lambda: prune.main}
CASE_TIMEOUT = 60  # seconds: a case that hangs fails, instead of blocking the suite


class Hang(BaseException):  # not an OSError, as TimeoutError is, which the code may catch
    pass


def timed_out(signum, frame):
    raise Hang(f"still running after {CASE_TIMEOUT}s")


@pytest.mark.parametrize("i", range(N_BAD_CASES))
def test_bad_input_is_one_error_line_and_changes_no_file(i, world, capsys, monkeypatch):
    cases = bad_input_cases(world)
    assert len(cases) == N_BAD_CASES
    script, argv, must_name, setup = (cases[i] + ({},))[:4]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in setup.get("env", {}).items():
        monkeypatch.setenv(key, value)
    limit, stdout = resource.getrlimit(resource.RLIMIT_FSIZE), sys.stdout
    resource.setrlimit(resource.RLIMIT_FSIZE, (setup.get("fsize", limit[1]), limit[1]))
    signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(CASE_TIMEOUT)
    held = setup.get("flock") and sg.claim_folder(str(setup["flock"]))  # another run's lock
    try:
        e, before, after = raised_in(world, SystemExit, lambda: MAINS[script]()(argv))
    finally:
        if held:
            held.close()
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        sys.stdout = stdout  # a RANK other than 0 sends it to /dev/null
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: "), (script, argv, message)
    assert "\n" not in message and must_name in message, (script, argv, message)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and setup.get("prints", "") in out, (script, argv, out)
    assert after == before, (script, argv)  # nothing written, nothing changed (no PWNED)


def test_a_pickle_payload_checkpoint_is_refused_and_runs_nothing(tmp_path):
    torch.save({"model": Evil(tmp_path / "PWNED"), "config": {}}, tmp_path / "ckpt.pt")
    for script in ("tasks.py", "prune.py"):
        r = subprocess.run([sys.executable, script, f"--ckpt={tmp_path / 'ckpt.pt'}",
                            "--tasks=for_while", "--device=cpu"], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].endswith("(it holds code, not just data: "
                                                          "refused); retrain or pick another")
        assert not (tmp_path / "PWNED").exists()


def test_scratch_run_keeps_a_trained_checkpoint_unless_told_to_overwrite(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    argv = [f"--data_dir={world / 'corpus'}", f"--cache_dir={world / 'cache'}",
            f"--out_dir={run}"] + WORLD_RUN + ["--max_iters=1"]
    before = snapshot(run)
    with pytest.raises(SystemExit, match="already holds a model; continue it with --init_from"):
        sg.main(argv)
    assert snapshot(run) == before
    (run / "circuits").mkdir()
    (run / "circuits" / "for_while.json").write_text("{}")
    sg.main(argv + ["--overwrite=True"])
    assert sg.read_checkpoint(str(run / "ckpt.pt"))["iter_num"] == 1
    # the old model's circuits are set aside
    assert sorted(os.listdir(run)) == ["circuits.old", "ckpt.pt", "tokenizer.tiktoken"]
    assert (run / "circuits.old" / "for_while.json").read_text() == "{}"


def interrupt_at_step(monkeypatch, step: int, times: int = 1, sig=signal.SIGINT):
    """Sends Ctrl-C (SIGINT), or sig, `times` times from inside training step `step`."""
    real, calls = sg.project_weights, []

    def project_and_interrupt(*args):
        real(*args)
        calls.append(1)
        if len(calls) == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(sg, "project_weights", project_and_interrupt)


def test_ctrl_c_saves_exits_130_and_resume_without_flags_is_bit_exact(world, tmp_path, monkeypatch):
    common = [f"--data_dir={world / 'corpus'}", f"--cache_dir={world / 'cache'}"] + WORLD_RUN
    long = ["--max_iters=6", "--eval_interval=3"]
    sg.main(common + long + [f"--out_dir={tmp_path / 'full'}"])
    interrupt_at_step(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        sg.main(common + long + [f"--out_dir={tmp_path / 'stopped'}"])
    assert e.value.code == 130  # stopped, not finished
    assert sg.read_checkpoint(str(tmp_path / "stopped" / "ckpt.pt"))["iter_num"] == 2
    monkeypatch.undo()
    sg.main(["--init_from=resume", f"--out_dir={tmp_path / 'stopped'}"])  # no other flag
    full, resumed = (sg.read_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("full", "stopped"))
    assert resumed["iter_num"] == 6 and resumed["config"]["max_iters"] == 6
    for key, w in full["model"].items():
        assert torch.equal(w, resumed["model"][key]), key
    for i, state in full["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["optimizer"]["state"][i]["exp_avg"])


def test_sigterm_saves_and_exits_143_and_a_relative_run_resumes_from_another_folder(
        world, tmp_path, monkeypatch):
    """SIGTERM (a scheduler, docker stop, timeout) stops a run as Ctrl-C does. The run was made
    with relative paths and a stale lock in its folder (its process has ended): the lock is
    taken over, and the run resumes from another working folder, since its paths are saved
    absolute."""
    (tmp_path / "a" / "run").mkdir(parents=True)
    shutil.copytree(world / "corpus", tmp_path / "a" / "corpus")
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / "a" / "run" / "run.lock").write_text(str(ended.pid))
    monkeypatch.chdir(tmp_path / "a")
    interrupt_at_step(monkeypatch, 2, sig=signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        sg.main(["--data_dir=corpus", "--cache_dir=cache", "--out_dir=run"] + WORLD_RUN
                + ["--max_iters=4", "--eval_interval=4"])
    assert e.value.code == 143 and sg.read_checkpoint("run/ckpt.pt")["iter_num"] == 2
    assert sorted(os.listdir("run")) == ["ckpt.pt", "tokenizer.tiktoken"]  # the lock released
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    sg.main(["--init_from=resume", "--out_dir=a/run"])
    assert sg.read_checkpoint("a/run/ckpt.pt")["iter_num"] == 4


def test_second_ctrl_c_and_ctrl_c_in_data_prep_exit_130_leaving_no_half_file(world, tmp_path,
                                                                             monkeypatch, capsys):
    common = [f"--data_dir={world / 'corpus'}", f"--cache_dir={tmp_path / 'cache'}"] + WORLD_RUN
    real_write, stops = sg.atomic_write, []
    # the handler a user's process starts with (once seen replaced when the full suite ran)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def write_half_then_stop(path, write):
        if path.endswith("val.bin") and not stops:
            stops.append(path)
            real_write(path, lambda f: (f.write(b"\0" * 10), os.kill(os.getpid(), signal.SIGINT)))
        real_write(path, write)

    monkeypatch.setattr(sg, "atomic_write", write_half_then_stop)
    with pytest.raises(SystemExit) as e:
        sg.main(common + [f"--out_dir={tmp_path / 'a'}"])
    assert e.value.code == 130 and stops
    folder = os.path.dirname(stops[0])
    assert sorted(os.listdir(folder)) == ["tokenizer.tiktoken", "train.bin"]  # no .tmp, no sha1
    assert not (tmp_path / "a").exists()
    monkeypatch.undo()
    interrupt_at_step(monkeypatch, 1, times=2)
    with pytest.raises(SystemExit) as e:
        sg.main(common + [f"--out_dir={tmp_path / 'b'}"])
    out = capsys.readouterr().out
    assert e.value.code == 130 and "tokenizer: 300 tokens" in out  # rebuilt
    assert not (tmp_path / "b" / "ckpt.pt").exists() and "saved" not in out  # at once: no save
    assert sorted(os.listdir(folder)) == ["sha1.txt", "tokenizer.tiktoken", "train.bin", "val.bin"]
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]


def test_a_damaged_token_cache_is_rebuilt_not_trusted(world, tmp_path, capsys):
    cfg = sg.parse_config([f"--data_dir={world / 'corpus'}", f"--cache_dir={tmp_path}"] + WORLD_RUN)
    folder, _ = sg.prepare_data(cfg)
    good = snapshot(folder)
    with open(os.path.join(folder, "train.bin"), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    sg.prepare_data(cfg)
    assert "tokenizer: 300 tokens" in capsys.readouterr().out and snapshot(folder) == good
    sg.prepare_data(cfg)
    assert "using cached tokens" in capsys.readouterr().out


def test_help_lists_every_key_with_default_and_meaning_and_paths_expand_home(capsys):
    for main, key, meaning in ((sg.main, "--density=0.0625", "fraction of each hidden matrix"),
                               (tasks.main, "--n=200", "pairs per task"),
                               (prune.main, "--k_coef=0.0001", "penalty per kept node")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and key in out and meaning in out
        defaults = {sg.main: sg.DEFAULTS, tasks.main: tasks.DEFAULTS, prune.main: prune.DEFAULTS}
        assert len(out.strip().splitlines()) == len(defaults[main]) + (main is sg.main)
    assert sg.parse_config(["--data_dir=~/code"]).data_dir == os.path.expanduser("~/code")


# -----------------------------------------------------------------------------
# the training method, guarded: hand-computed counts, paper constants, and properties that a
# wrong implementation breaks


def test_projection_rounds_the_kept_count_up():
    """density 0.1002 of a 2048-weight matrix is 205.2 weights: ceil keeps 206 (round would keep
    205); 3072 -> 307.8 -> 308; 1024 -> 102.6 -> 103 (by hand). No floor here (j = 0)."""
    model = small_model()  # vocab 64, d_model 32, d_mlp 64, 2 layers
    project_at_target(model, 0.1002, 0)
    counts = {name: int((w != 0).sum()) for name, w, _ in sg.sparse_matrices(model)}
    want = {"wte.weight": 206, "lm_head.weight": 206}
    for l in range(2):
        want.update({f"blocks.{l}.attn.c_attn.weight": 308, f"blocks.{l}.attn.c_proj.weight": 103,
                     f"blocks.{l}.mlp.c_fc.weight": 206, f"blocks.{l}.mlp.c_proj.weight": 206})
    assert counts == want


def test_every_neuron_and_qkv_channel_keeps_its_floor_and_embeddings_have_none():
    """At density 0.05 a neuron's share of c_fc is 1.6 weights, so only the floor j = 4 keeps
    4: along the input of each c_fc row (neuron) and c_attn row (q/k/v channel), along the output
    of each c_proj column (neuron, v channel). The embeddings keep their own count, 0.05 * 2048
    = 102.4 -> 103, with no floor: most tokens keep nothing."""
    model = small_model()
    project_at_target(model, 0.05, 4)
    for block in model.blocks:
        assert ((block.mlp.c_fc.weight != 0).sum(1) >= 4).all()
        assert ((block.attn.c_attn.weight != 0).sum(1) >= 4).all()
        assert ((block.mlp.c_proj.weight != 0).sum(0) >= 4).all()
        assert ((block.attn.c_proj.weight != 0).sum(0) >= 4).all()
        assert int((block.mlp.c_fc.weight != 0).sum()) == 64 * 4  # the floors alone
    for w in (model.wte.weight, model.lm_head.weight):
        assert int((w != 0).sum()) == 103 and ((w != 0).sum(1) == 0).any()


def test_abstopk_keeps_int_of_afrac_times_width_as_the_official_code():
    """14 * 0.25 = 3.5: int keeps 3 (round would keep 4)."""
    node = sg.Node(0, "mlp.post_act", 14, sg.Config(sg.DEFAULTS, afrac=0.25))
    y = node(torch.randn(2, 5, 14, generator=torch.Generator().manual_seed(0)))
    assert ((y != 0).sum(-1) == 3).all()


def test_optimizer_uses_the_papers_adam_constants():
    """Paper 2 and the official script: betas (0.9, 0.95), eps 0.1, weight decay 0.1 on every
    matrix but the bigram table, none on gains and sinks."""
    model = small_model()
    opt = sg.make_optimizer(model, sg.Config(sg.DEFAULTS), "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 0.1 and g["weight_decay"] in (0.0, 0.1)
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2 and name != "bigram.weight"), name


class SpyOptimizer:
    """Records the RMS of the gradient it is handed; changes nothing."""

    def __init__(self, params):
        self.params, self.rms = list(params), []
        self.param_groups = [{"params": self.params}]  # what train_step normalises (bridges too)

    def step(self):
        g = torch.cat([p.grad.flatten() for p in self.params if p.grad is not None])
        self.rms.append(g.pow(2).mean().sqrt().item())

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def test_a_training_step_hands_adam_a_gradient_of_rms_one():
    """The raw gradient of this model has RMS 6e-3 (far below a clip at 1); Adam must see 1, less
    the +1e-5 in the divisor (0.2% here)."""
    model = small_model()
    spy = SpyOptimizer(model.parameters())
    x, y = torch.randint(64, (2, 4, 16), generator=torch.Generator().manual_seed(0))
    sg.train_step(model, model, spy, x, y, contextlib.nullcontext())
    assert spy.rms == [pytest.approx(1.0, rel=5e-3)]


def test_a_pruned_weight_can_come_back_because_gradients_and_moments_stay_dense():
    """README: gradients and Adam moments stay dense, so a pruned weight can come back. After
    one step every pruned weight of c_fc that got a gradient has moved, and over a few
    projected steps some weight that the projection had zeroed is kept again."""
    model = small_model()
    opt = sg.make_optimizer(model, sg.Config(sg.DEFAULTS, learning_rate=3e-2), "cpu")
    project_at_target(model, 0.25, 4)
    w = model.blocks[0].mlp.c_fc.weight
    pruned, came_back = w == 0, torch.zeros_like(w, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x, y = torch.randint(64, (2, 8, 16), generator=gen)
        sg.train_step(model, model, opt, x, y, contextlib.nullcontext())
        if step == 0:
            assert (w[pruned] != 0).float().mean() > 0.5
            assert (opt.state[w]["exp_avg"][pruned] != 0).float().mean() > 0.5
        project_at_target(model, 0.25, 4)
        came_back |= pruned & (w != 0)
    assert came_back.any()


def test_batches_are_windows_with_next_token_targets_and_ddp_ranks_split_the_global_batch():
    """On the text 0, 1, 2, ... a window is consecutive and its targets are the same window one
    token later. README: under DDP every process draws the same global batch and keeps every
    N-th window."""
    data = np.arange(5000, dtype=np.uint16)
    one = sg.get_batch(data, 8, 6, torch.Generator().manual_seed(3), torch.device("cpu"))
    x, y = one
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert len(set(x[:, 0].tolist())) == 6  # six different windows
    for rank in (0, 1):
        xr, yr = sg.get_batch(data, 8, 6, torch.Generator().manual_seed(3), torch.device("cpu"),
                              rank, 2)
        assert torch.equal(xr, x[rank::2]) and torch.equal(yr, y[rank::2])


def test_ddp_refuses_a_batch_that_is_not_a_multiple_of_the_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="batch_size=32 is not a multiple of 3 processes"):
        sg.setup_ddp(torch.device("cpu"), 32)


def test_each_training_step_draws_a_new_batch_at_its_lr_and_density(world, tmp_path,
                                                                    monkeypatch):
    """3 steps at lr 1e-2, density 0.25, anneal over half of training (1.5 steps), warmup
    max(1, round(0.01 * 3)) = 1 step. By hand: the density after steps 0, 1, 2 is 1, 1 - 0.75 /
    1.5 = 0.5, 0.25; the lr is 1e-2 x (warmup 1, then decay (3 - t) / 2) / sqrt(density at t):
    1e-2, 1e-2 / sqrt(0.5), 1e-2 x 0.5 / sqrt(0.25) = 1e-2. Embeddings: 4 x 0.25 = 1, dense."""
    real_batch, real_project, drawn, projected = sg.get_batch, sg.project_weights, [], []

    def spy_batch(*args, **kw):
        x, y = real_batch(*args, **kw)
        if torch.is_grad_enabled():  # training draws; evaluation runs under no_grad
            drawn.append(x)
        return x, y

    def spy_step(model, fmodel, optimizer, *args):
        drawn.append(optimizer.param_groups[0]["lr"])
        return real_step(model, fmodel, optimizer, *args)

    real_step = sg.train_step
    monkeypatch.setattr(sg, "get_batch", spy_batch)
    monkeypatch.setattr(sg, "train_step", spy_step)
    monkeypatch.setattr(sg, "project_weights", lambda model, *a: real_project(model, *a) or
                        projected.append([int((w != 0).sum()) for w in (
                            model.blocks[0].mlp.c_fc.weight, model.wte.weight)]))
    sg.main([f"--data_dir={world / 'corpus'}", f"--cache_dir={world / 'cache'}",
             f"--out_dir={tmp_path}"] + WORLD_RUN + ["--max_iters=3"])
    batches, lrs = drawn[0::2], drawn[1::2]
    assert len(batches) == 3
    assert not any(torch.equal(a, b) for i, a in enumerate(batches) for b in batches[i + 1 :])
    assert lrs == pytest.approx([1e-2, 1e-2 / math.sqrt(0.5), 1e-2], rel=1e-9)
    # c_fc is 32 x 16 = 512 weights: 512, 256, 128 kept (the floors, 32 x 4 = 128, add none);
    # wte 300 x 16 = 4800, dense
    assert projected == [[512, 4800], [256, 4800], [128, 4800]]


def test_the_loss_is_the_cross_entropy_of_the_logits_made_without_the_targets():
    """The targets may only score the prediction: with them or without, the same logits."""
    model = small_model()
    x, y = torch.randint(64, (2, 3, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(x, y)
    alone, _ = model(x)
    torch.testing.assert_close(logits, alone)
    torch.testing.assert_close(loss, F.cross_entropy(alone.flatten(0, 1), y.flatten()))


def test_site_packages_are_not_corpus_and_newlines_never_join_punctuation(tmp_path):
    """README: the corpus excludes site-packages; the pre-tokenizer never puts a newline in a
    punctuation run (with one, BPE learns ']\\n' and never ']]')."""
    for rel in ("a.py", "pkg/b.py", "site-packages/c.py", "pkg/site-packages/d.py", "e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    found = {os.path.relpath(p, tmp_path) for p in sg.list_py_files(str(tmp_path))}
    assert found == {"a.py", os.path.join("pkg", "b.py")}
    chunks = regex.findall(sg.PRETOKEN_PATTERN, "x = [[1], [2]]\nf('a')\n")
    assert "]]" in chunks and "')" in chunks and not [c for c in chunks if "\n" in c and c != "\n"]


def test_embedding_and_unembedding_are_untied_and_norm_gains_stay_dense():
    model = small_model()
    assert model.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()
    project_at_target(model, 0.05, 4)
    gains = [p for n, p in model.named_parameters() if "norm" in n]
    assert len(gains) == 2 * 2 + 1 and all((g != 0).all() for g in gains)


def test_bench_prints_the_sparse_and_dense_step_times_and_their_ratio(capsys):
    cfg = sg.parse_config(["--vocab_size=300", "--n_layer=1", "--d_model=32", "--d_mlp=64",
                           "--block_size=16", "--batch_size=4", "--device=cpu", "--bench=True",
                           "--min_per_neuron=2"])
    sg.bench(cfg, warmup=1, rounds=2)
    out = capsys.readouterr().out
    ms = {name: float(v) for name, v in
          (line.split(" | ")[0].split()[0:1] + [line.split("step")[1].split("ms")[0]]
           for line in out.splitlines() if " | step " in line)}
    assert set(ms) == {"sparse", "dense"}
    ratio = float(out.split("ratio sparse / dense:")[1].split()[0])
    # the times print to 0.1 ms, the ratio from the unrounded times: the rounding of both times
    # moves sparse / dense by up to 0.05 * (1 + ratio) / dense (a ratio of 5.5 under load)
    assert ratio == pytest.approx(ms["sparse"] / ms["dense"],
                                  abs=0.01 + 0.06 * (1 + ratio) / (ms["dense"] - 0.05))


# the paper's released models: a folder in their format, built here from a seeded random state


def write_data_gym(ranks: dict[bytes, int], folder):
    """Our ranks as GPT-2's vocab.bpe + encoder.json (stand-in characters for bytes); each merge
    is written as any split of the token into two earlier tokens."""
    shown = [b for b in range(256) if chr(b).isprintable() and b != 32]
    hidden = [b for b in range(256) if b not in shown]
    char = {**{b: chr(b) for b in shown}, **{b: chr(256 + i) for i, b in enumerate(hidden)}}
    text = lambda t: "".join(char[b] for b in t)
    merges = []
    for tok in sorted((t for t in ranks if len(t) > 1), key=ranks.get):
        i = next(i for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
        merges.append(f"{text(tok[:i])} {text(tok[i:])}")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    (folder / "encoder.json").write_text(json.dumps({text(t): r for t, r in ranks.items()}))


def data_gym_ranks(merges: list[bytes]) -> dict[bytes, int]:
    """Single bytes in GPT-2's rank order (printable ones first), then the given merges."""
    shown = [b for b in range(256) if chr(b).isprintable() and b != 32]
    order = shown + [b for b in range(256) if b not in shown]
    return {**{bytes([b]): r for r, b in enumerate(order)},
            **{m: 256 + i for i, m in enumerate(merges)}}


# Two small models in the release format: every supported feature is on in at least one.
RELEASE_CASES = {
    "gelu_sink_bigram": dict(  # n_head * d_head != d_model, AbsTopK everywhere, old n_mlp key
        vocab_size=264, block_size=16, n_layer=2, d_model=24, n_head=3, d_head=4, n_mlp=40,
        bias=True, ln_bias=False, rms_norm=True, tied_unembed=False, activation_type="gelu",
        afrac=0.25,
        afrac_loctypes="attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out",
        enable_bigram_table=True, learnable_bigram_table=True, sink=True, dropout=0.0,
        grad_checkpointing=False, tokenizer_name="tinypython_2k"),
    "relu_no_bias": dict(  # d_head and d_mlp from their defaults, AbsTopK at three locations
        vocab_size=264, block_size=16, n_layer=2, d_model=16, n_head=4, bias=False, rms_norm=True,
        tied_unembed=False, activation_type="relu", afrac=0.3,
        afrac_loctypes="attn_in,attn_v,mlp_neuron", enable_bigram_table=False, sink=False),
}
RELEASE_MERGES = [b"  ", b"    ", b"in", b"de", b"def", b"re", b"ret"]  # 256 + 7 + end-of-text


def release_state_dict(beeg: dict, seed: int) -> dict:
    """Their state_dict names and shapes, seeded numpy values (the same on every machine), about
    a third of each matrix nonzero and every norm gain, bias, sink and table far from its init."""
    rng = np.random.RandomState(seed)
    V, T, d, H = beeg["vocab_size"], beeg["block_size"], beeg["d_model"], beeg["n_head"]
    hd, m = H * beeg.get("d_head", d // H), beeg.get("n_mlp", 4 * d)

    def t(*shape, scale=1.0, sparse=False):
        x = rng.standard_normal(shape) * scale * (rng.random_sample(shape) < 0.35 if sparse else 1)
        return torch.from_numpy(x.astype(np.float32))

    sd = {"transformer.wte.weight": t(V, d, sparse=True),
          "transformer.wpe.weight": t(T, d, scale=0.5)}
    for l in range(beeg["n_layer"]):
        p = f"transformer.h.{l}."
        sd.update({p + "ln_1.weight": 1 + t(d, scale=0.2), p + "ln_2.weight": 1 + t(d, scale=0.2),
                   p + "attn.c_attn.weight": t(3 * hd, d, scale=2 * d**-0.5, sparse=True),
                   p + "attn.c_proj.weight": t(d, hd, scale=2 * hd**-0.5, sparse=True),
                   p + "mlp.c_fc.weight": t(m, d, scale=2 * d**-0.5, sparse=True),
                   p + "mlp.c_proj.weight": t(d, m, scale=2 * m**-0.5, sparse=True)})
        if beeg["bias"]:
            outs = (("attn.c_attn", 3 * hd), ("attn.c_proj", d), ("mlp.c_fc", m), ("mlp.c_proj", d))
            sd.update({p + n + ".bias": t(n_out, scale=0.3) for n, n_out in outs})
        if beeg["sink"]:
            sd[p + "attn.attn_imp.sink_logit"] = t(H)
    sd.update({"transformer.ln_f.weight": 1 + t(d, scale=0.2),
               "lm_head.weight": t(V, d, sparse=True),
               "bigram_table": t(V, V, scale=0.5), "final_logits_bias": t(V, scale=0.5)})
    return sd


def write_release(folder, beeg: dict, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "beeg_config.json").write_text(json.dumps(beeg))
    torch.save(release_state_dict(beeg, seed), folder / "final_model.pt")
    write_data_gym(data_gym_ranks(RELEASE_MERGES), folder)
    return folder


def golden_idx(vocab_size: int, block_size: int) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(7).randint(vocab_size, size=(2, block_size)))


# Their logits, from OpenAI's own inference code: circuit_sparsity/inference/gpt.py (github.com/
# openai/circuit_sparsity at 8a029a3) run once in a scratch virtual environment (torch 2.13 CPU,
# float32) with load_model(folder, flash=True, cuda=False) on the folders write_release builds;
# logits[b, t, GOLDEN_IDS] and logsumexp(logits[b, t]) at the (b, t) of GOLDEN_AT, 6 decimals.
# Our full logits differed from theirs by at most 9.6e-7 (gelu_sink_bigram) and 0 (relu_no_bias).
# print_golden_logits below is that script, kept here so the numbers can be made again; it is
# not a test (pytest never runs it) because it needs the official package installed.

GOLDEN_AT, GOLDEN_IDS = [(0, 0), (0, 9), (1, 15)], [0, 40, 200, 263]
GOLDEN = {
    "gelu_sink_bigram": [([-1.079062, -0.001495, -1.899466, -0.244645], 10.438969),
                         ([-4.230032, 2.053907, 0.638023, -2.019214], 11.050084),
                         ([0.218973, 5.413246, 3.872629, -0.512424], 10.882125)],
    "relu_no_bias": [([4.794770, -0.018184, 0.001031, -0.310992], 8.815684),
                     ([6.914288, 1.788468, -0.321337, -1.318677], 8.927996),
                     ([9.151330, 4.244693, -0.020303, -1.066853], 9.318151)],
}


def print_golden_logits(folder_root: str):
    """Prints GOLDEN from the official code. Run by hand, outside the suite, in an environment
    where OpenAI's circuit_sparsity package is installed (pip install of that repository):
        python -c "import test_all; test_all.print_golden_logits('/tmp/golden')"
    It writes the two release folders with write_release (the same seeded numpy weights the
    test loads), loads each with the official load_model, runs the official forward on
    golden_idx, and prints the logits at GOLDEN_AT for GOLDEN_IDS and their logsumexp."""
    from pathlib import Path

    from circuit_sparsity.inference.gpt import load_model  # the official code; not in this repo

    for name, beeg in RELEASE_CASES.items():
        folder = write_release(Path(folder_root) / name, beeg)
        model = load_model(str(folder), flash=True, cuda=False)
        with torch.no_grad():
            out = model(golden_idx(beeg["vocab_size"], beeg["block_size"]))
        logits = (out[0] if isinstance(out, tuple) else out).float()
        rows = [([round(v, 6) for v in logits[b, t, GOLDEN_IDS].tolist()],
                 round(torch.logsumexp(logits[b, t], 0).item(), 6)) for b, t in GOLDEN_AT]
        print(f"{name!r}: {rows},")


@pytest.mark.parametrize("name", list(RELEASE_CASES))
def test_released_model_logits_equal_the_official_code(name, tmp_path):
    beeg = RELEASE_CASES[name]
    model, tokenizer, cfg = sg.load_checkpoint(str(write_release(tmp_path / name, beeg)))
    logits, _ = model(golden_idx(beeg["vocab_size"], beeg["block_size"]))
    for (b, t), (values, lse) in zip(GOLDEN_AT, GOLDEN[name]):
        assert torch.allclose(logits[b, t, GOLDEN_IDS], torch.tensor(values), atol=1e-4, rtol=0)
        assert abs(torch.logsumexp(logits[b, t], 0).item() - lse) < 1e-4
    assert tokenizer.n_vocab == cfg.vocab_size == 264 and cfg.pos_embed and cfg.bigram_table


def test_released_tokenizer_is_read_from_gpt2_files_with_its_own_pattern(tmp_path):
    folder = write_release(tmp_path / "m", RELEASE_CASES["relu_no_bias"])
    enc = sg.load_data_gym_tokenizer(str(folder))
    assert enc._mergeable_ranks == data_gym_ranks(RELEASE_MERGES) and enc.eot_token == 263
    text = "def f(x):\n    return [[x]]\n"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc._pat_str == sg.TINYPYTHON_PATTERN  # their pre-tokenizer keeps newlines on "]]":
    assert regex.findall(enc._pat_str, "x = [[1]]\n") == ["x", " =", " [[", "1", "]]\n"]
    (folder / "vocab.bpe").write_text("#version: 0.2\nd e\n")  # disagrees with encoder.json
    with pytest.raises(SystemExit, match="no tinypython tokenizer in") as e:
        sg.load_data_gym_tokenizer(str(folder))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, field", [
    (dict(tied_unembed=True), "tied_unembed=True"), (dict(rms_norm=False), "rms_norm=False"),
    (dict(d_pos_emb=8), "d_pos_emb=8"), (dict(residual_activation_type="relu"), "residual_activ"),
    (dict(afrac_loctypes="attn_in,resid_post_mlp"), "afrac_loctypes resid_post_mlp"),
    (dict(tokenizer_name="gpt2"), "tokenizer_name='gpt2'"), (dict(new_idea=1), "new_idea")])
def test_unsupported_release_fields_are_one_line_errors_naming_them(change, field, tmp_path):
    folder = write_release(tmp_path / "m", RELEASE_CASES["relu_no_bias"])
    beeg = {**RELEASE_CASES["relu_no_bias"], **change}
    (folder / "beeg_config.json").write_text(json.dumps(beeg))
    with pytest.raises(SystemExit, match=field) as e:
        sg.load_checkpoint(str(folder))
    assert "\n" not in str(e.value)
    beeg = {k: v for k, v in RELEASE_CASES["relu_no_bias"].items() if k != "tied_unembed"}
    with pytest.raises(SystemExit, match="tied_unembed=True"):  # their default when omitted
        sg.release_config(beeg, "beeg_config.json")


def test_prune_runs_on_a_released_folder_with_means_in_its_tokenizer(tmp_path, monkeypatch, capsys):
    folder = write_release(tmp_path / "model", RELEASE_CASES["gelu_sink_bigram"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return [[x]] + {i}\n" * 40)
    monkeypatch.setattr(tasks, "TASKS", {"planted": planted_task})
    monkeypatch.setattr(tasks, "ALL", {"planted": planted_task})
    argv = [f"--ckpt={folder}", "--tasks=planted", f"--data_dir={corpus}", "--steps=3",
            f"--cache_dir={tmp_path / 'cache'}", "--n_pairs=8", "--mean_batches=2", "--k_coef=1"]
    prune.main(argv)
    out = capsys.readouterr().out
    assert "val tokens in tinypython_2k" in out
    # 2 layers x (24 + 3 x 12 + 24 + 24 + 40 + 24) + 24: q, k, v are n_head * d_head = 12 wide
    assert "node means: 368 nodes" in out
    assert "planted" in out
    prune.main(argv)  # tokens cached, keyed to the corpus and tokenizer
    assert "val tokens in tinypython_2k" not in capsys.readouterr().out


# -----------------------------------------------------------------------------
# bridges: a sparse model trained beside a frozen dense one (sparse_gpt.py), steering (prune.py)


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, corpus_dir) -> str:
    """A tiny dense run (density 1, afrac 1, 2 layers) to bridge to; returns its ckpt.pt."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("dense"), corpus_dir, density=1.0, afrac=1.0,
                   n_layer=2, max_iters=4, eval_interval=4, eval_iters=1)
    sg.train(cfg)
    return os.path.join(cfg.out_dir, "ckpt.pt")


def bridged_pair(tmp_path, identity: bool, **cfg) -> sg.Bridged:
    """small_model beside a copy of itself (afrac 1: AbsTopK would clip an identity encoder),
    with identity bridges or freshly initialised ones; the copy frozen as train() freezes it."""
    (tmp_path / "dense.pt").write_bytes(b"stands for the dense checkpoint")
    cfg = sg.Config(sg.DEFAULTS, n_layer=2, d_model=32, afrac=1.0, **cfg)
    b = sg.Bridged(small_model(afrac=1.0), small_model(afrac=1.0).requires_grad_(False), cfg,
                   str(tmp_path / "dense.pt"))
    if identity:
        for lin in [*b.enc, *b.dec]:
            lin.weight.data.copy_(torch.eye(32))
            lin.bias.data.zero_()
    return b


def test_identity_bridges_to_a_copy_make_every_hybrid_the_plain_forward(tmp_path):
    b = bridged_pair(tmp_path, identity=True)
    idx = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(0))
    resids = []
    logits, ce = b.sparse(idx, idx, resids=resids)
    assert len(resids) == 4  # before each attention and each MLP of 2 blocks
    for site in range(4):
        assert torch.equal(b.sparse(idx, site=site, x=resids[site])[0], logits)
    terms, loss = b.eval()(idx, idx)  # in eval mode the hybrids run on every sequence
    sites = terms["sites"]  # per site: NMSE d->s, s->d, KL d->s, s->d, hybrid CE d->s, s->d
    assert sites.shape == (4, 6) and sites[:, :4].abs().max().item() < 1e-6
    assert torch.allclose(sites[:, 4:], ce.expand(4, 2)) and loss.item() == pytest.approx(ce.item())
    assert terms["dense_ce"].item() == pytest.approx(ce.item())
    cfg = sg.Config(sg.DEFAULTS, n_layer=2, d_model=32)  # the default afrac: k = d_sparse / 4
    assert sg.Bridged(small_model(), small_model(), cfg, str(tmp_path / "dense.pt")).k == 8


def test_gradient_reaches_the_decoders_through_the_frozen_dense_model(tmp_path):
    b = bridged_pair(tmp_path, identity=False, c_nmse=0.0)  # the KL terms alone
    idx = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(0))
    b(idx, idx)[1].backward()
    assert all(p.grad is None for p in b.dense.parameters())
    assert all(g.weight.grad.abs().sum() > 0 for g in b.dec)  # g_i feeds only the dense model
    assert all(f.weight.grad.abs().sum() > 0 for f in b.enc)


@pytest.fixture(scope="session")
def bridged_run(tmp_path_factory, corpus_dir, dense_run):
    """A tiny run bridged to dense_run: (its ckpt.pt, the Bridged object it trained, its log)."""
    made, real, log = [], sg.bridge_to_dense, tmp_path_factory.mktemp("bridged") / "log.txt"
    cfg = tiny_cfg(log.parent, corpus_dir, n_layer=2, max_iters=4, eval_interval=2, eval_iters=1,
                   log_interval=2, bridge_to=dense_run)
    with pytest.MonkeyPatch.context() as mp, open(log, "w") as f:
        mp.setattr(sg, "bridge_to_dense", lambda *a: made.append(real(*a)) or made[-1])
        mp.setattr(sys, "stdout", f)
        sg.train(cfg)
    return os.path.join(cfg.out_dir, "ckpt.pt"), made[0], log.read_text()


def test_bridged_training_keeps_the_dense_model_and_saves_the_bridges(dense_run, bridged_run):
    path, bridged, out = bridged_run
    before = sg.read_checkpoint(dense_run)["model"]
    assert all(torch.equal(v, before[k]) for k, v in bridged.dense.state_dict().items())
    assert "| ce " in out and " nmse " in out and " kl " in out  # each loss term, every log line
    assert out.count("bridges val | ce sparse") == 2 and "hybrid ce d->s" in out
    ckpt = sg.read_checkpoint(path)
    with open(dense_run, "rb") as f:
        assert ckpt["bridges"]["dense_sha1"] == hashlib.file_digest(f, "sha1").hexdigest()
    assert ckpt["bridges"]["dense"] == os.path.abspath(dense_run)
    enc = bridged.enc.state_dict()
    assert all(torch.equal(v, enc[k]) for k, v in ckpt["bridges"]["enc"].items())
    assert (bridged.enc[0].weight != 0).all()  # bridges are dense: never projected
    model, _, _ = sg.load_checkpoint(path)  # what prune.py and tasks.py read: the sparse model
    assert model.state_dict().keys() == bridged.sparse.state_dict().keys()
    loaded = sg.load_bridged(path)
    assert torch.equal(loaded.dec[1].weight, bridged.dec[1].weight)


def swapped_tokenizer(folder):
    """Two tokens of the tokenizer beside a run trade ranks: same size, another tokenizer."""
    lines = (folder / "tokenizer.tiktoken").read_text().splitlines()
    lines[300], lines[301] = lines[301].split()[0] + " 300", lines[300].split()[0] + " 301"
    (folder / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("case, flag, expected", [
    ("sparse", "", "it is weight-sparse (density 0.0625)"),
    ("layers", "--n_layer=1", "its n_layer is 2, this run's 1: pass --n_layer=2"),
    ("vocab", "--vocab_size=600", "its vocab_size is 512, this run's 600: pass --vocab_size=512"),
    ("context", "--block_size=128", "its block_size is 64, this run's 128: pass --block_size=64"),
    ("tokenizer", "", "is not the tokenizer")])  # load_checkpoint's refusal
def test_each_bridge_refusal_is_one_line_before_any_work(case, flag, expected, tmp_path,
                                                         corpus_dir, dense_run):
    dense = copy_run(os.path.dirname(dense_run), tmp_path / "dense")
    if case == "sparse":
        ckpt = torch.load(dense, weights_only=True)
        torch.save({**ckpt, "config": {**ckpt["config"], "density": 1 / 16}}, dense)
    if case == "tokenizer":
        swapped_tokenizer(tmp_path / "dense")
    argv = ["--preset=tiny", f"--data_dir={corpus_dir}", "--vocab_size=512", "--n_layer=2",
            f"--out_dir={tmp_path / 'out'}", f"--bridge_to={dense}"] + [flag] * bool(flag)
    with pytest.raises(SystemExit) as e:
        sg.main(argv)
    assert str(e.value).startswith(f"error: cannot bridge to {dense}: " * (case != "tokenizer"))
    assert str(e.value).startswith("error: ") and expected in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_steering_writes_its_curves_and_strength_zero_changes_nothing(bridged_run, dense_run,
                                                                     tmp_path):
    run = shutil.copytree(os.path.dirname(bridged_run[0]), tmp_path / "run")
    argv = [f"--ckpt={run / 'ckpt.pt'}", "--tasks=single_double_quote", "--steer=True",
            "--steps=2", "--n_pairs=6", "--control=False", "--target_loss=10", "--mean_batches=1",
            "--unsolved=True"]
    prune.main(argv)
    r = json.loads((run / "circuits" / "single_double_quote.steer.json").read_text())
    assert r["node"].startswith("1.attn.resid_in.") and r["strength"][0] == 0 and r["n_pairs"] == 6
    ET.parse(run / "circuits" / "single_double_quote.steer.svg")
    bridged = sg.load_bridged(str(run / "ckpt.pt"))
    tokenizer = sg.load_checkpoint(str(run / "ckpt.pt"))[1]
    pairs = tasks.for_tokenizer(tokenizer, "single_double_quote",
                                tasks.make_pairs("single_double_quote", 6, 0, "test"))
    test = tasks.encode_pairs(tokenizer, pairs, 64)
    with torch.no_grad():  # the dense model unsteered: P(the other prompt's answer)
        logits = bridged.dense(test["idx"])[0][torch.arange(12), test["last"]].softmax(-1)
    p = logits[torch.arange(12), torch.where(test["sign"] > 0, test["tok_b"], test["tok_a"])]
    for i, (d, v) in enumerate(r["directions"].items()):
        assert len(v["steered"]) == len(v["random"]) == 11
        assert v["steered"][0] == v["none"] == pytest.approx(p[i::2].mean().item(), rel=1e-6)
    assert any(v["steered"][-1] != v["none"] for v in r["directions"].values())
    # the circuit's reads at the site are steered together, each through its own decoder column
    model = sg.load_checkpoint(str(run / "ckpt.pt"))[0].requires_grad_(False)
    keep, start = torch.zeros(len(prune.node_names(model))), prune.node_spans(model)[
        "1.attn.resid_in"][0]
    keep[[start + 3, start + 7]] = 1.0
    cfg = sg.Config(prune.DEFAULTS, steer_node="")
    two = prune.steer(model, bridged, tokenizer, keep, test, "single_double_quote", cfg)
    one = prune.steer(model, bridged, tokenizer, keep, test, "single_double_quote",
                      sg.Config(cfg, steer_node="1.attn.resid_in.3"))  # --steer_node: that one
    assert two["node"] == "1.attn.resid_in.{3,7}" and one["node"] == "1.attn.resid_in.3"
    assert one["directions"] != two["directions"]
    with pytest.raises(SystemExit, match="steer_node=1.attn.resid_in.999 is not a node of"):
        prune.main(argv + ["--steer_node=1.attn.resid_in.999"])
    with pytest.raises(SystemExit, match="has no bridges; train one with --bridge_to="):
        sg.load_bridged(dense_run)
