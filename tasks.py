"""
The paper's 20 binary next-token tasks on Python code (Gao et al. 2025, Table 1), and the loss
and accuracy of a model on them. A datapoint is a pair of prompts that differ minimally: after
prompt_a the next token should be token_a rather than token_b, after prompt_b the reverse, so a
model that ignores the context scores exactly 50%. prune.py finds the circuit of one task.

    python tasks.py                                 # two example pairs of every task, checked
    python tasks.py --ckpt=out/ckpt.pt              # accuracy and task loss of a checkpoint
    python tasks.py --ckpt=out/ckpt.pt --tasks=bracket_counting,for_while --n=500
"""

import difflib
import hashlib
import random
import sys
from collections import Counter, namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_gpt

DEFAULTS = dict(
    ckpt="",  # checkpoint (or run folder) to evaluate; empty = examples, checked (cache_dir)
    tasks="all",  # comma-separated names; all = the 20 tasks and the two bracket attacks
    n=200,  # pairs per task (2n prompts)
    seed=0,  # which pairs are drawn
    split="test",  # train | test: the two never share a prompt (prune.py fits on train)
    device="auto",  # auto | cpu | cuda | mps
    cache_dir="data",  # without ckpt: the pairs are checked against every tokenizer cached here
)
RULES = dict(  # what each value must be (see sparse_gpt.RULES); tasks: see task_names
    n=sparse_gpt.up_to(100_000), split=(lambda v, c: v in ("train", "test"), "train or test"),
    device=sparse_gpt.DEVICE)

Pair = namedtuple("Pair", "prompt_a prompt_b token_a token_b")
SOLVED_ACC = 0.9  # a task counts as solved at this accuracy (prune.py prunes the solved ones)

# -----------------------------------------------------------------------------
# little helpers that make prompts read like the standard library, from a seeded random.Random

NOUNS = ("name value path data key item line text size index result node message header source "
         "mode state module block code type count entry buffer field record token offset limit "
         "prefix target flags config options parent label chunk width timeout level").split()
ADJECTIVES = "new old raw max min last next full base default first current".split()
PLURALS = ("items lines names values paths entries records nodes tokens fields parts args keys "
           "files rows").split()
VERBS = "get load read parse make build check update handle process find format split add".split()
CLASSES = ("Parser Reader Writer Handler Cache Record Config Node Entry Client Server Request "
           "Loader Builder Buffer Token Table Queue Session Archive").split()
ONE_TOKEN_NAMES = NOUNS[:21]  # one token after a space in our stdlib BPE: answers that copy a name


def name(rng) -> str:
    """A variable name: 'line' or 'raw_line'."""
    noun = rng.choice(NOUNS)
    return noun if rng.random() < 0.6 else f"{rng.choice(ADJECTIVES)}_{noun}"


def value(rng) -> str:
    return rng.choice(["None", "0", "1", "-1", "True", "False", "''", "[]", "{}",
                       str(rng.randint(2, 100)), repr(rng.choice(NOUNS))])


def message(rng) -> str:
    """An error message or a comment, ending in a word: a quote or brace after it is a token."""
    noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
    return rng.choice([f"cannot {rng.choice(VERBS)} {noun}", f"invalid {noun}",
                       f"expected a {noun}", f"unknown {noun}", f"missing {noun} in {other}",
                       f"no such {noun}", f"{noun} must not be empty", f"bad {noun} for {other}"])


def statement(rng, ind: str, comments: bool = True) -> str:
    """One unrelated line (or a two-line if) of a function body at indentation ind."""
    x, y = name(rng), name(rng)
    kinds = (lambda: f"{x} = {value(rng)}",  # lambdas: only the chosen kind draws from rng
             lambda: f"{x} = {rng.choice(VERBS)}_{rng.choice(NOUNS)}({y})",
             lambda: f"{y}.append({x})", lambda: f"{x} = len({y})",
             lambda: f"if {x} is None:\n{ind}    {x} = {value(rng)}", lambda: f"# {message(rng)}")
    return f"{ind}{kinds[rng.randrange(6 if comments else 5)]()}\n"


def preamble(rng, method: bool | None = None) -> tuple[str, str]:
    """(text, indent): a function's or method's start and a few body lines; the task's line next."""
    method = rng.random() < 0.5 if method is None else method
    args = ", ".join(rng.sample(NOUNS, rng.randint(1, 2)))
    text = rng.choice(["", "", f"import {rng.choice(['os', 're', 'sys', 'io'])}\n\n\n"])
    fname = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    text += (f"class {rng.choice(CLASSES)}:\n\n    def {fname}(self, {args}):\n" if method
             else f"def {fname}({args}):\n")
    ind = " " * (8 if method else 4)
    text += f'{ind}"""{message(rng).capitalize()}."""\n' if rng.random() < 0.3 else ""
    return text + "".join(statement(rng, ind) for _ in range(rng.randint(0, 3))), ind


# -----------------------------------------------------------------------------
# the 20 tasks, in the paper's Table 1 order. Answers are tokens as the corpus tokenization cuts
# them (A.7): ("  ')  ]]  are single tokens, so a quote or bracket comes with what follows it.


def single_double_quote(rng) -> Pair:
    """Close a string with the quote it was opened with."""
    head, ind = preamble(rng)
    call = rng.choice(["raise ValueError", "raise TypeError", "print", "log.debug", "warnings.warn",
                       "parser.error", "lines.append"])
    text = message(rng)
    return Pair(f'{head}{ind}{call}("{text}', f"{head}{ind}{call}('{text}", '")', "')")


def final_kwarg(rng) -> Pair:
    """After a parameter with a default, the next one needs a default too."""
    head = rng.choice(["", f"class {rng.choice(CLASSES)}:\n\n"])
    ind = "    " if head else ""
    params = rng.sample(NOUNS, rng.randint(3, 5))
    pos = ["self"] * bool(head) + params[:-2]
    kw, last = params[-2:]
    start = f"{head}{ind}def {rng.choice(VERBS)}_{rng.choice(NOUNS)}({', '.join(pos)}"
    return Pair(f"{start}, {kw}={value(rng)}, {last}", f"{start}, {kw}, {last}", "=", "):")


def set_or_string(rng, var: str | None = None) -> Pair:
    """A variable made as set() is extended with .add, one made as "" with +=."""
    var = var or name(rng)
    head, ind = preamble(rng)
    item, seq = rng.choice(NOUNS), rng.choice(PLURALS)
    loop = f"{ind}for {item} in {seq}:\n"
    loop += f"{ind}    if not {item}:\n{ind}        continue\n" if rng.random() < 0.5 else ""
    end = loop + f"{ind}    {var}"
    empty = rng.choice(["''", '""'])
    return Pair(f"{head}{ind}{var} = set()\n{end}", f"{head}{ind}{var} = {empty}\n{end}",
                ".", " +=")


def set_or_string_fixedvarname(rng) -> Pair:
    """The same, the variable always named current (one of the paper's worked circuits)."""
    return set_or_string(rng, "current")


def class_init(rng) -> Pair:
    """self.x = x: copy the attribute's name from the line being written."""
    params = rng.sample(ONE_TOKEN_NAMES, rng.randint(2, 4))
    x, y = rng.sample(params, 2)
    done = [p for p in params if p not in (x, y) and rng.random() < 0.5]
    head = f"class {rng.choice(CLASSES)}:\n\n    def __init__(self, {', '.join(params)}):\n"
    head += "".join(f"        self.{p} = {p}\n" for p in done)
    return Pair(f"{head}        self.{x} =", f"{head}        self.{y} =", f" {x}", f" {y}")


def with_as(rng) -> Pair:
    """with open(...) as f: vs f = open(...)."""
    head, ind = preamble(rng)
    opener = rng.choice(["open", "io.open", "gzip.open", "tarfile.open", "zipfile.ZipFile"])
    arg = rng.choice([name(rng), f"{name(rng)}, 'rb'", f"{name(rng)}, encoding='utf-8'"])
    call, f = f"{opener}({arg})", rng.choice(["f", "fp", "fh", "stream", "archive"])
    return Pair(f"{head}{ind}with {call}", f"{head}{ind}{f} = {call}", " as", "\n" + ind)


def bracket_brace(rng) -> Pair:
    """The first element of a dict is followed by ':', of a list by ','."""
    head, ind = preamble(rng)
    var = name(rng)
    first = rng.choice([name(rng).upper(), str(rng.randint(0, 999)), name(rng)])
    gap = rng.choice(["", f"\n{ind}    "])
    return Pair(f"{head}{ind}{var} = {{{gap}{first}", f"{head}{ind}{var} = [{gap}{first}", ":", ",")


def with_open(rng) -> Pair:
    """open(name, 'r') or 'w', read from the file's name."""
    head, ind = preamble(rng)
    read, write = rng.choice([("input", "output"), ("src", "dst"), ("source", "target"),
                              ("in", "out"), ("infile", "outfile"), ("read", "write")])
    kind = rng.choice(["path", "file", "name", "filename"])
    return Pair(f"{head}{ind}with open({read}_{kind}, '", f"{head}{ind}with open({write}_{kind}, '",
                "r", "w")


def element(rng) -> str:
    return rng.choice([str(rng.randint(0, 99)), str(-rng.randint(1, 9)), f"{rng.random():.1f}",
                       name(rng)])


def bracket_counting(rng, comment: str = "") -> Pair:
    """Close a nested list with ]] and a flat one with ]."""
    head, ind = preamble(rng)
    items = ", ".join(element(rng) for _ in range(rng.randint(1, 6)))
    start = head + (f"{ind}{comment}\n" if comment else "") + f"{ind}{name(rng)} = "
    return Pair(f"{start}[[{items}", f"{start}[{items}", "]]", "]")


def for_while(rng) -> Pair:
    """for x in ... vs while x:."""
    head, ind = preamble(rng)
    var = name(rng)
    return Pair(f"{head}{ind}for {var}", f"{head}{ind}while {var}", " in", ":")


def condition(rng, var: str) -> str:
    """A condition that ends in a word, so the ':' after it is a token of its own."""
    return rng.choice([var, f"not {var}", f"{var} is None", f"{var} is not None",
                       f"{var} > {rng.randint(0, 9)}", f"len({var}) > {rng.randint(0, 9)}",
                       f"{var} == {rng.randint(0, 9)}", f"{var} in {rng.choice(PLURALS)}"])


def else_elif(rng) -> Pair:
    """else is followed by ':', elif by a condition (here on self, like the if before it)."""
    head, ind = preamble(rng, method=True)
    body = statement(rng, ind + "    ", comments=False)
    start = f"{head}{ind}if {condition(rng, 'self.' + name(rng))}:\n{body}{ind}"
    return Pair(f"{start}else", f"{start}elif", ":", " self")


def fstring_brace(rng) -> Pair:
    """An f-string takes {name}; a plain string takes %-formatting."""
    head, ind = preamble(rng)
    start = f"{head}{ind}{rng.choice(['raise ValueError(', 'print(', 'msg = ', 'log.info('])}"
    text = message(rng).capitalize()
    return Pair(f'{start}f"{text}', f'{start}"{text}', " {", " %")


def if_ternary(rng) -> Pair:
    """if cond: as a statement; a if cond else b inside an expression."""
    head, ind = preamble(rng)
    cond = condition(rng, name(rng))
    return Pair(f"{head}{ind}if {cond}", f"{head}{ind}{name(rng)} = {value(rng)} if {cond}",
                ":", " else")


def var_swap(rng) -> Pair:
    """x, y = y, x."""
    head, ind = preamble(rng)
    x, y = rng.sample(ONE_TOKEN_NAMES, 2)
    if rng.random() < 0.5:
        head += f"{ind}if {x} > {y}:\n"
        ind += "    "
    return Pair(f"{head}{ind}{x}, {y} = {y},", f"{head}{ind}{y}, {x} = {x},", f" {x}", f" {y}")


def indent_for(rng) -> Pair:
    """The body of a for loop is indented one level deeper than the for."""
    head, ind = preamble(rng)
    opener = rng.choice([f"if {condition(rng, name(rng))}:",
                         f"for {name(rng)} in {rng.choice(PLURALS)}:",
                         f"with {rng.choice(['lock', 'self._lock', 'open(path)'])}:"])
    head += f"{ind}{opener}\n{statement(rng, ind + '    ', comments=False)}"
    loop = f"for {name(rng)} in {rng.choice(PLURALS)}:"
    inner = ind + "    "
    return Pair(f"{head}{ind}{loop}", f"{head}{inner}{loop}", "\n" + inner, "\n" + inner + "    ")


def lambda_func(rng) -> Pair:
    """lambda x: vs def f(."""
    head, ind = preamble(rng)
    fname = rng.choice([f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}", "key", "callback", "check"])
    return Pair(f"{head}{ind}{fname} = lambda {name(rng)}", f"{head}{ind}def {fname}", ":", "(")


def if_equals(rng) -> Pair:
    """== in a condition, = in an assignment."""
    head, ind = preamble(rng)
    var = name(rng)
    return Pair(f"{head}{ind}if {var}", f"{head}{ind}{var}", " ==", " =")


def enumerate_range(rng) -> Pair:
    """Two loop variables need an iterable of pairs (zip), one loop variable takes range."""
    # the paper's ' enumerate' is four tokens in our stdlib BPE; ' zip' is one, same contexts
    head, ind = preamble(rng)
    i = rng.choice(["i", "n", "idx", "index", "pos", "a", "k"])
    return Pair(f"{head}{ind}for {i}, {name(rng)} in", f"{head}{ind}for {i} in", " zip", " range")


def var_if(rng) -> Pair:
    """if x == True: vs x = True."""
    head, ind = preamble(rng)
    var, const = name(rng), rng.choice(["True", "False"])
    return Pair(f"{head}{ind}if {var} == {const}", f"{head}{ind}{var} = {const}", ":", "\n" + ind)


def while_return_true(rng) -> Pair:
    """while True: opens a loop; return True ends the function (a blank line follows)."""
    head, ind = preamble(rng)
    return Pair(f"{head}{ind}while True", f"{head}{ind}return True", ":", "\n")


TASKS = {f.__name__: f for f in [
    single_double_quote, final_kwarg, set_or_string, set_or_string_fixedvarname, class_init,
    with_as, bracket_brace, with_open, bracket_counting, for_while, else_elif, fstring_brace,
    if_ternary, var_swap, indent_for, lambda_func, if_equals, enumerate_range, var_if,
    while_return_true]}


# Attacks on bracket_counting's circuit, an averaged open-[ detector: fake depth, dilute the mean
def bracket_counting_distractor(rng) -> Pair:
    """bracket_counting after a comment with an unmatched [."""
    comment = rng.choice([f"# {message(rng)} [{name(rng)}", f"# TODO: [{message(rng)}",
                          f"# e.g. [{element(rng)}, [{element(rng)}"])
    return bracket_counting(rng, comment=comment)


def bracket_counting_long(rng) -> Pair:
    """bracket_counting with 8 to 36 numbers in the list."""
    # no preamble: at most about 120 tokens, so a 128-token context still sees the [[
    items = ", ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(8, 36)))
    start = f"def {rng.choice(VERBS)}_{rng.choice(NOUNS)}():\n    {name(rng)} = "
    return Pair(f"{start}[[{items}", f"{start}[{items}", "]]", "]")


ATTACKS = {f.__name__: f for f in [bracket_counting_distractor, bracket_counting_long]}
ALL = {**TASKS, **ATTACKS}

# -----------------------------------------------------------------------------
# datasets: deterministic by seed; a prompt's split is decided by its hash alone


def split_of(prompt: str) -> str:
    return "test" if hashlib.sha1(prompt.encode()).digest()[0] % 2 else "train"


def make_pairs(name: str, n: int, seed: int = 0, split: str = "train") -> list[Pair]:
    """n pairs of task `name` with both prompts in `split` (train and test never share one)."""
    if name not in ALL or type(n) is not int or n < 1 or split not in ("train", "test"):
        raise ValueError(f"make_pairs: task {name!r}, n={n!r}, split={split!r}: the task must be "
                         "a key of tasks.ALL, n a whole number >= 1, split train or test")
    rng, pairs, draws = random.Random(f"{name}/{seed}"), [], 20 * n + 100
    for _ in range(draws):  # bounded: a new task whose prompts never vary would loop forever
        pair = ALL[name](rng)
        if split_of(pair.prompt_a) == split == split_of(pair.prompt_b):
            pairs.append(pair)
            if len(pairs) == n:
                return pairs
    raise ValueError(f"task {name}: {len(pairs)} of {n} {split} pairs in {draws} draws; its "
                     "prompts must vary (a pair counts when both its prompts fall in the split)")


def answer_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode_ordinary(token)
    if len(ids) != 1:
        raise ValueError(f"answer {token!r} is {len(ids)} tokens under this tokenizer, not one")
    return ids[0]


def check_pairs(tokenizer, name: str, pairs: list[Pair]):
    """ValueError naming task and token unless each answer is one token after every prompt (A.7)."""
    encode = tokenizer.encode_ordinary
    try:
        for token, prompt in ((t, p) for pair in pairs for t in pair[2:] for p in pair[:2]):
            if encode(prompt + token) != encode(prompt) + [answer_id(tokenizer, token)]:
                raise ValueError(f"answer {token!r} merges with the end of the prompt "
                                 f"...{prompt[-40:]!r} instead of following it")
    except ValueError as e:
        raise ValueError(f"task {name}: {e}") from None


# -----------------------------------------------------------------------------
# scoring: the two answers' logits at the last position of each prompt


def encode_pairs(tokenizer, pairs: list[Pair], block_size: int, device="cpu") -> dict:
    """Rows 2i / 2i+1: pair i's prompts, last block_size tokens, right-padded (a causal model never
    sees the padding at `last`, the answer position); sign +1 where token_a is right, else -1."""
    if not pairs:
        raise ValueError("no pairs to encode: pass at least one Pair")
    answers = [(answer_id(tokenizer, p.token_a), answer_id(tokenizer, p.token_b)) for p in pairs]
    tok_a, tok_b = torch.tensor(answers).T.repeat_interleave(2, dim=1)  # one per prompt
    rows = [torch.tensor(tokenizer.encode_ordinary(s)[-block_size:]) for p in pairs for s in p[:2]]
    idx = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    data = dict(idx=idx, last=torch.tensor([len(r) - 1 for r in rows]), tok_a=tok_a, tok_b=tok_b,
                sign=torch.tensor([1.0, -1.0] * len(pairs)))
    return {k: v.to(device) for k, v in data.items()}


def margins(model, tokenizer, pairs: list[Pair]) -> torch.Tensor:
    """Right answer's logit - wrong one's, per row of encode_pairs: one differentiable forward."""
    data = encode_pairs(tokenizer, pairs, model.cfg.block_size, next(model.parameters()).device)
    rows = torch.arange(len(data["last"]), device=data["idx"].device)
    last = model(data["idx"])[0][rows, data["last"]].float()
    return data["sign"] * (last[rows, data["tok_a"]] - last[rows, data["tok_b"]])


def score(margin: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Two-answer cross-entropy softplus(-margin) and accuracy; margin: right - wrong logit."""
    return F.softplus(-margin).mean(), (margin > 0).float().mean().item()


def solved(scores: dict, min_acc: float = SOLVED_ACC) -> list[str]:
    """The tasks of scores (name -> (task loss, accuracy, pairs)) solved at accuracy >= min_acc."""
    return [name for name, (_, acc, _) in scores.items() if acc >= min_acc]


@torch.no_grad()
def evaluate(model, tokenizer, names, n: int = 200, seed: int = 0, split: str = "test",
             batch_pairs: int = 32) -> dict[str, tuple[float, float, int]]:
    """name -> (task loss, accuracy, n) on n fresh pairs; ValueError: answers not one token here."""
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be at least 1, got {batch_pairs}")
    out = {}
    for name in names:
        pairs = for_tokenizer(tokenizer, name, make_pairs(name, n, seed, split))
        loss, acc = score(torch.cat([margins(model, tokenizer, pairs[i : i + batch_pairs])
                                     for i in range(0, n, batch_pairs)]))
        out[name] = (loss.item(), acc, n)
    return out


# -----------------------------------------------------------------------------
# command line: examples checked against the cached tokenizers, or an evaluation table


def task_names(text: str) -> list[str]:
    """--tasks=a,b as a list; a name that is no task is an error that suggests the nearest."""
    for t in text.split(","):
        if t and t not in ALL:
            near = "".join(f" did you mean {n}?" for n in difflib.get_close_matches(t, ALL, 1))
            sys.exit(f"error: --tasks: unknown task '{t}';{near} (python tasks.py lists them all)")
    return [t for t in text.split(",") if t]


def show_examples(names, cfg):
    """Two pairs of each task, then all its pairs checked under each tokenizer in cache_dir."""
    print("every prompt is followed by ⟨correct answer > wrong answer⟩\n")
    for name in names:
        print(f"=== {name}: {ALL[name].__doc__}")
        for p in make_pairs(name, 2, cfg.seed, "train"):
            print(f"{p.prompt_a}⟨{p.token_a!r} > {p.token_b!r}⟩\n")
            print(f"{p.prompt_b}⟨{p.token_b!r} > {p.token_a!r}⟩\n")
    paths, failed = sorted(Path(cfg.cache_dir).glob("*/tokenizer.tiktoken")), 0
    if not paths:
        print(f"no tokenizer cached in {cfg.cache_dir}/: not checked (sparse_gpt.py makes one)")
    for path in paths:
        tokenizer = sparse_gpt.load_tokenizer(str(path))
        for name in names:
            try:
                for split in ("train", "test"):
                    for_tokenizer(tokenizer, name, make_pairs(name, cfg.n, cfg.seed, split))
            except ValueError as e:
                print(f"error: {e} (tokenizer {path})")
                failed += 1
        print(f"checked {len(names)} task(s) against {path}, {cfg.n} train and test pairs each: "
              + (f"{failed} failed" if failed else "every answer is one token after its prompt"))
    if failed:
        sys.exit(1)


@sparse_gpt.cli
def main(argv):
    cfg = sparse_gpt.parse_config(argv, DEFAULTS, presets=None, rules=RULES)
    names = list(ALL) if cfg.tasks == "all" else task_names(cfg.tasks)
    if not cfg.ckpt:
        try:
            return show_examples(names, cfg)
        except ValueError as e:  # a new task that cannot make its pairs
            sys.exit(f"error: {e}")
    model, tokenizer, _ = sparse_gpt.load_checkpoint(cfg.ckpt, sparse_gpt.pick_device(cfg.device))
    print(f"{cfg.ckpt}: {cfg.n} {cfg.split} pairs per task (seed {cfg.seed})")
    print(f"{'task':<30}{'acc':>7}{'loss':>8}{'n':>6}")
    scores = {}
    for group, title in ((TASKS, ""), (ATTACKS, "attacks on bracket_counting:")):
        chosen = [t for t in names if t in group]
        if title and chosen:
            print(title)
        for name in chosen:
            try:
                loss, acc, n = evaluate(model, tokenizer, [name], cfg.n, cfg.seed, cfg.split)[name]
            except ValueError as e:  # answers that this tokenizer cannot produce as one token
                print(f"{name:<30}  not evaluated: {e}")
                continue
            print(f"{name:<30}{acc:>7.1%}{loss:>8.3f}{n:>6}")
            if group is TASKS:
                scores[name] = (loss, acc, n)
    if scores:
        done, accs = solved(scores), [acc for _, acc, _ in scores.values()]
        print(f"{f'mean over {len(accs)} tasks':<30}{sum(accs) / len(accs):>7.1%}")
        print(f"solved (accuracy >= {SOLVED_ACC:.0%} on these {cfg.split} pairs; prune.py decides "
              f"on its train pairs): {len(done)} of {len(accs)}: {' '.join(done) or '-'}")


# -----------------------------------------------------------------------------
# the pairs in another tokenizer (tinypython_2k, the released models', keeps newlines on punctuation
# runs). FOLLOWS: what follows each answer in code; an answer becomes the tokenizer's first token of
# answer + FOLLOWS after the prompt. Worked example, single_double_quote: our `")` vs `')` after
# `raise ValueError("invalid name` are asked as `")\n` vs `')\n` (README: Tasks in their tokenizer).
FOLLOWS = dict(
    single_double_quote=("\n",) * 2, final_kwarg=("0):", "\n"), set_or_string=("add(x)", " x"),
    set_or_string_fixedvarname=("add(x)", " x"), class_init=("\n",) * 2,
    with_as=(" f:", "data = f.read()"), bracket_brace=(" 1,", " 2,"), with_open=("') as f:",) * 2,
    bracket_counting=("\n",) * 2, for_while=(" items:", "\n"), else_elif=("\n", ".x:"),
    fstring_brace=('x}")', 's" % x)'), if_ternary=("\n", " None"), var_swap=("\n",) * 2,
    indent_for=("pass\n",) * 2, lambda_func=(" x", "x):"), if_equals=(" None:", " None"),
    enumerate_range=("(a, b):", "(n):"), var_if=("\n", "return"), while_return_true=("\n",) * 2,
    bracket_counting_distractor=("\n",) * 2, bracket_counting_long=("\n",) * 2)


def as_tokenized(tokenizer, name: str, pair: Pair) -> Pair:
    """The pair as this tokenizer cuts the code. A prompt end that merges into an answer moves to
    both answers, a first token both answers share moves to both prompts (e.g. ':\n')."""
    enc, follows = tokenizer.encode_ordinary, FOLLOWS.get(name, ("", ""))
    prompts, texts = list(pair[:2]), [x + f for x, f in zip(pair[2:], follows)]
    for _ in range(4):
        cut = 0
        for p, x in zip(prompts, texts):  # characters of p whose tokens change when x follows
            ids, full = enc(p), enc(p + x)
            n = next((i for i, (s, t) in enumerate(zip(ids, full)) if s != t),
                     min(len(ids), len(full) - 1))
            cut = max(cut, len(p) - len(tokenizer.decode(ids[:n])))
        if cut and (cut >= min(map(len, prompts)) or prompts[0][-cut:] != prompts[1][-cut:]):
            break
        if cut:
            prompts, texts = [p[:-cut] for p in prompts], [prompts[0][-cut:] + x for x in texts]
            continue
        a, b = (tokenizer.decode([enc(p + x)[len(enc(p))]]) for p, x in zip(prompts, texts))
        if a != b and not any(t.isspace() and not x.isspace() for t, x in zip((a, b), pair[2:])):
            return Pair(*prompts, a, b)
        if a != b or a in texts:
            break
        prompts, texts = [p + a for p in prompts], [x[len(a) :] for x in texts]
    raise ValueError(f"task {name}: its answers are not two distinct tokens after the prompts here")


def for_tokenizer(tokenizer, name: str, pairs: list[Pair]) -> list[Pair]:
    """The pairs as this tokenizer asks them, checked: ours as written (a bad answer is a bug)."""
    if tokenizer._pat_str != sparse_gpt.PRETOKEN_PATTERN:
        asked = [as_tokenized(tokenizer, name, p) for p in pairs]
        changed = Counter(q[2:] + p[2:] for p, q in zip(pairs, asked) if p != q)
        for (a, b, was_a, was_b), count in changed.items():
            print(f"{name}: {count} of {len(pairs)} pairs asked as {a!r} / {b!r} instead of "
                  f"{was_a!r} / {was_b!r}")
        pairs = asked
    check_pairs(tokenizer, name, pairs)
    return pairs


if __name__ == "__main__":
    main()
