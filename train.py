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
settings are config.py's Config, the losses objectives.py; the research harness (the grid of
settings, seeds, intervals, the signal probe) is compare.py.
"""
import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass

import sentence_transformers
import torch
import torch.distributed as dist
import transformers
from sentence_transformers.sentence_transformer.modules import Router
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import dream
import eval as eval_module
import heads
from config import CACHE, Config, add_config_flags, load_lm, resolve_models, settings
from data import beir_sets, health_set, load_data, train_toy
from eval import evaluate_beir, evaluate_questions, init_distributed, summary
from objectives import Scorer, examples, lm_batch, step_loss

# -----------------------------------------------------------------------------
# which heads get the bias: auto (ranked as QRHead does, heads.py), random, all, a list, or a file

HEADED = {"dream", "adist"}  # the losses that read heads (the others rank none)


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
        useful = heads.leave_one_out(lm, tok, q, d, y, cfg.max_doc_tokens, progress=True)
    scores = heads.rank_heads(lm, tok, q, d, y, useful, max_doc_tokens=cfg.max_doc_tokens, progress=True)
    chosen = heads.top_heads(scores, cfg.head_count)
    path = os.path.join(cfg.out_dir, "heads.txt")
    with open(path, "w") as f:
        f.write(chosen + "\n")
    torch.save(scores, os.path.join(cfg.out_dir, "head_scores.pt"))
    log(f"heads ({cfg.head_source}, {len(qs)} questions, {time.time() - t:.0f}s): {chosen} -> {path}")
    return chosen


# -----------------------------------------------------------------------------
# the learning rate, and the validation loss (retrieval is scored by eval.py: QA questions over the
# passage pool, BEIR sets)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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
                                      cfg.heads, cfg.temperature, reduction="none", reading=cfg.reading,
                                      hide_documents=cfg.hide_documents)
        sums[:2] += torch.tensor([losses.sum().item(), len(idx)])
        for row, j in zip(scores.argmax(-1).tolist(), idx):
            if questions[j]["gold"] in questions[j]["candidates"]:
                sums[2:] += torch.tensor([questions[j]["candidates"][row] == questions[j]["gold"], 1])
    if world > 1:
        dist.all_reduce(sums)
    return sums[0].item() / sums[1].item(), sums[2].item() / max(sums[3].item(), 1)


# -----------------------------------------------------------------------------
# a run: set up once, evaluated before and after, checked on the way


@dataclass
class Run:
    """What train() sets up once and its parts read: the processes, the models, the data."""
    cfg: Config  # cfg.heads: the heads chosen
    log: object
    rank: int
    world: int
    device: torch.device
    bf16: bool
    lm: object
    tok: object
    retriever: object
    model: torch.nn.Module  # the retriever as one call (DDP wraps it)
    train_qs: list
    dev_qs: list
    test_qs: list
    passages: list
    doc_ids: dict
    eval_sets: list  # the BEIR test sets
    health_qs: list
    health_pool: list


def load_encoder(cfg, name, device):
    """The retriever to train, its prompts set by --query-prompt/--document-prompt (saved with it).
    --train-side query: one SentenceTransformer whose Router sends queries through it and documents
    through the start encoder, frozen (with LoRA: the base model, no adapter)."""
    retriever = dream.load_retriever(name, pooling=cfg.pooling or None, lora=cfg.lora, device=device)
    retriever.prompts.update({task: prompt for task, prompt in (("query", cfg.query_prompt),
                                                                ("document", cfg.document_prompt)) if prompt})
    if cfg.train_side == "both":
        return retriever
    if any(isinstance(module, Router) for module in retriever):
        raise ValueError(f"--train-side query: {name} already routes queries and documents apart; "
                         "train it with --train-side both")
    start = dream.load_retriever(name, pooling=cfg.pooling or None, device=device).requires_grad_(False)
    router = Router.for_query_document(query_modules=list(retriever), document_modules=list(start))
    return sentence_transformers.SentenceTransformer(modules=[router], device=device, prompts=retriever.prompts,
                                                     default_prompt_name=retriever.default_prompt_name).eval()


def setup(cfg, log):
    """The processes (torchrun), the frozen LM, the retriever, the data and the heads."""
    rank, world, device = init_distributed()
    device = torch.device(device)
    log = log if rank == 0 else (lambda *_: None)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    if cfg.center and (cfg.loss == "infonce" or cfg.batch_size // world < 2):
        raise ValueError(f"--center: needs a label-free loss (not infonce) and 2 or more questions a batch on each "
                         f"process (--batch-size {cfg.batch_size}, {world} processes): raise --batch-size")
    for f in dataclasses.fields(Config):  # a Config built in Python has not met argparse's choices
        allowed, value = f.metadata["choices"], getattr(cfg, f.name)
        if allowed and value not in allowed:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: "
                             f"choose {', '.join(a or repr(a) for a in allowed)}")
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    torch.manual_seed(cfg.seed + rank)  # each rank its own dropout
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    lm_name, encoder_name = resolve_models(cfg, log)
    if rank > 0:
        dist.barrier()  # rank 0 converts a GGUF file once, then the others read the folder
    lm, tok = load_lm(lm_name, log, dtype=torch.bfloat16 if bf16 else torch.float32, device=device,
                      gradient_checkpointing=cfg.gradient_checkpointing)
    if rank == 0 and world > 1:
        dist.barrier()
    retriever = load_encoder(cfg, encoder_name, device)
    model = Scorer(retriever, frozen_documents=cfg.train_side == "query")
    # BERT's pooler, say, is computed but unused by mean pooling: DDP must not wait for its gradient
    model = DDP(model, find_unused_parameters=True) if world > 1 else model
    if cfg.heads not in ("auto", "random") and not os.path.isfile(cfg.heads):
        dream.resolve_heads(lm, cfg.heads)  # a bad head fails now, not after the data is ready
    train_qs, dev_qs, test_qs, passages, doc_ids = load_data(cfg, tok, log)
    log(f"{time.time() - t0:.0f}s to set up" + (f"; {world} processes" if world > 1 else ""))
    if cfg.loss not in HEADED and cfg.heads in ("auto", "random"):
        cfg = dataclasses.replace(cfg, heads="all")  # no other loss reads heads: rank none
    heads_file = os.path.join(cfg.out_dir, "heads.txt")
    if cfg.heads == "auto" and cfg.resume and os.path.exists(heads_file):
        cfg = dataclasses.replace(cfg, heads=heads_file)  # the heads the run began with
    chosen = [choose_heads(cfg, lm, tok, train_qs, passages, log) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(chosen)  # ranked once, on rank 0
    cfg = dataclasses.replace(cfg, heads=chosen[0])
    dream.resolve_heads(lm, cfg.heads)
    return Run(cfg, log, rank, world, device, bf16, lm, tok, retriever, model, train_qs, dev_qs, test_qs,
               passages, doc_ids, beir_sets(cfg, log), *health_set(dev_qs, len(passages), cfg))


def mixed_precision(run):
    """bf16 autocast on the run's device, or a disabled one."""
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16)


def evaluation(run, when):
    """QA dev and test over the passage pool, the BEIR test sets, the validation loss."""
    t = time.time()
    qa = evaluate_questions(run.retriever, {"dev": run.dev_qs, "test": run.test_qs}, run.passages, log=run.log)
    beir = evaluate_beir(run.retriever, run.eval_sets, run.log)
    val = validation(run.lm, run.tok, run.retriever, run.dev_qs[:run.cfg.val_loss_questions], run.passages,
                     run.doc_ids, run.cfg, mixed_precision(run), run.rank, run.world)
    run.log(f"{when} evaluated in {time.time() - t:.0f}s")
    return {"val_loss_and_gold_top1": val, "qa": qa and {name: means for name, (means, _) in qa.items()},
            "beir": {name: means for name, (means, _) in beir.items()},
            # per query, for paired bootstrap intervals between runs (report.json, not the screen)
            "per_query": {name: {m: values[m] for m in ("ndcg@10", "recall@100")}
                          for name, (_, values) in [*(qa or {}).items(), *beir.items()]}}


# settings that only training reads: the start encoder's evaluation is the same whatever they are
TRAINING_ONLY = {"loss", "beta", "adist_rows", "adist_values", "heads", "head_count", "head_source",
                 "detection_questions", "steps", "lr", "warmup_steps", "weight_decay", "grad_clip", "normalize",
                 "center", "seed", "out_dir", "resume",
                 "health_every", "health_questions", "health_pool", "prefix_cache_gb", "evaluate_before",
                 "checkpoint_every", "gradient_checkpointing"}


def evaluation_key(run):
    """A hash of everything the start encoder's evaluation depends on: its weights, the data and
    the BEIR folders' files, the settings that reach it (the heads chosen among them), the code that
    computes it and the library versions."""
    h = hashlib.sha256()
    for name, tensor in sorted(run.retriever.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for _, folder, _, _ in run.eval_sets:
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(os.path.relpath(os.path.join(root, name), folder).encode() + f.read())
    kept = {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in TRAINING_ONLY}
    code = [inspect.getsource(f) for f in (evaluation, validation, examples, lm_batch, dream, eval_module)]
    sets = [(n, f, split, None if qids is None else sorted(qids)) for n, f, split, qids in run.eval_sets]
    h.update(json.dumps([kept, run.cfg.heads, run.world, run.bf16, run.device.type, sets, run.dev_qs,
                         run.test_qs, run.passages, code, torch.__version__, transformers.__version__,
                         sentence_transformers.__version__], sort_keys=True).encode())
    return h.hexdigest()[:24]


def start_evaluation(run):
    """The start encoder's evaluation, kept under $DREAM_CACHE/evaluations/ (~/.cache/dream) and
    reused by a later run with the same key (evaluation_key): it is the same every run."""
    path = os.path.join(CACHE, "evaluations", evaluation_key(run) + ".json") if run.rank == 0 else None
    kept = [None]
    if run.rank == 0 and os.path.exists(path):
        with open(path) as f:
            kept = [json.load(f)]
    if run.world > 1:
        dist.broadcast_object_list(kept)  # every rank evaluates, or none
    if kept[0] is not None:
        run.log(f"the start encoder: evaluation reused from {path or 'rank 0'} (same weights, data, settings, code)")
        return kept[0]
    result = evaluation(run, "the start encoder")
    if run.rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + f".tmp{os.getpid()}", "w") as f:
            json.dump(result, f)
        os.replace(path + f".tmp{os.getpid()}", path)
    return result


def health(run, step, report):
    """QA dev nDCG@10 on a small pool, every health_every steps: a run going wrong shows it early."""
    if run.cfg.health_every and run.health_qs:
        value = evaluate_questions(run.retriever, {"health": run.health_qs}, run.passages,
                                   run.health_pool)["health"][0]["ndcg@10"]
        report.setdefault("health", []).append([step, value])
        run.log(f"step {step}: health (QA dev nDCG@10, {len(run.health_qs)} questions, {len(run.health_pool)} "
                f"passages) {value:.4f}")


# -----------------------------------------------------------------------------
# what produced a run, and checkpoints that resume exactly


@functools.cache  # once a process: the code it runs, not what the checkout holds when a long grid ends
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


def machine():
    """Where a run trained: the same run on two CPUs is two runs (float rounding; RESULTS.md 11), so
    runs are paired only within one machine."""
    cpu = platform.processor()
    try:  # linux names the model; platform.processor() is often only the architecture
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


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


# -----------------------------------------------------------------------------
# training


def resume(run, opt, given, ckpt_path):
    """(the step, the report) of ckpt_path, whose weights, optimizer and random state are loaded."""
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    now = dataclasses.asdict(given)
    changed = {key: (value, now[key]) for key, value in settings(ckpt["report"]["config"]).items()
               if key != "resume" and value != now[key]}
    if changed:  # a resumed run must be the run it continues
        raise SystemExit(f"--resume: {ckpt_path} was written with other settings (checkpoint, now): {changed}")
    run.retriever.load_state_dict(ckpt["retriever"])
    opt.load_state_dict(ckpt["optimizer"])
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    set_rng_state(rng[run.rank % len(rng)], run.device)
    run.log(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["report"]


def training_step(run, opt, step):
    """One optimizer step on the global batch of this step: (the loss, [[step, gold on top]])."""
    cfg = run.cfg
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    # the global batch is drawn alike on every rank; each rank takes its share
    idx = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(run.train_qs)), cfg.batch_size)
    idx = idx[run.rank::run.world]
    with mixed_precision(run):
        loss, tops = step_loss(cfg, run.lm, run.tok, run.model, run.train_qs, run.passages, run.doc_ids, idx,
                               run.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over the ranks here
    grad_norm = torch.nn.utils.clip_grad_norm_(run.retriever.parameters(), cfg.grad_clip)
    loss = loss.detach()
    if run.world > 1:  # the loss of the global batch, the same number on every rank
        dist.all_reduce(loss)
        loss /= run.world
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):  # stop before the weights change
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        kept = f"{path} (step {torch.load(path, weights_only=False)['step']})" if os.path.exists(path) \
            else "no checkpoint yet"
        raise SystemExit(f"step {step}: the loss is {loss.item()}, the gradient norm {grad_norm.item()}; "
                         f"stopped. The last good checkpoint is intact: {kept}. "
                         "Try a lower --lr or a higher --temperature.")
    opt.step()
    gold = [[step, top == run.train_qs[i]["gold"]] for i, top in zip(idx, tops)  # monitor only, not a signal
            if run.train_qs[i]["gold"] in run.train_qs[i]["candidates"]]
    return loss.item(), gather(gold, run.world)


def train(cfg, log=tqdm.write):
    """Train (tqdm.write keeps the progress bar whole). Under torchrun, one process per GPU (or CPU),
    each takes its share of every global batch; DDP averages the gradients, as in nanoGPT."""
    t0 = time.time()
    run = setup(cfg, log)
    master, ckpt_path = run.rank == 0, os.path.join(cfg.out_dir, "ckpt.pt")  # rank 0 logs and writes
    opt = torch.optim.AdamW([p for p in run.retriever.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start, report = 0, {"config": dataclasses.asdict(cfg), "heads": run.cfg.heads, "code": code_version(),
                     "machine": machine()}
    if cfg.resume:
        start, report = resume(run, opt, cfg, ckpt_path)
        here = machine()  # a checkpoint from before reports kept the machine names none: nothing to say
        if report.get("machine", here) != here:  # said, not hidden: its steps ran on two machines
            run.log(f"warning: resumed on another machine than it started on ({report['machine']['cpu']})")
            report["machine_resumed"] = here
    elif cfg.evaluate_before:
        report["before"] = start_evaluation(run)
    if start == 0:
        health(run, 0, report)
    run.retriever.train()
    bar = tqdm(range(start, cfg.steps), desc="training", initial=start, total=cfg.steps, disable=not master)
    t_train = time.time()
    step_times = report.setdefault("step_seconds", [])  # in the checkpoint: a resumed run counts every step
    for step in bar:
        t = time.time()
        loss, gold = training_step(run, opt, step)
        report.setdefault("gold_top1_by_step", []).extend(gold)
        step_times.append(time.time() - t)
        bar.set_postfix(loss=f"{loss:.3f}", s_per_step=f"{step_times[-1]:.2f}")
        report.setdefault("loss", []).append([step, loss])
        if cfg.health_every and (step + 1) % cfg.health_every == 0:
            health(run, step + 1, report)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            rng = gather([rng_state(run.device)], run.world)  # each rank's dropout stream
            if master:
                save_checkpoint(ckpt_path, {"retriever": run.retriever.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng, "step": step + 1, "report": report})
    bar.close()
    run.log(f"{cfg.steps - start} steps trained in {time.time() - t_train:.0f}s")
    return finish(run, report, step_times, t0)


def save_encoder(retriever, path):
    """SentenceTransformer(path) loads it (with LoRA: the adapter). A Router's LoRA route is saved
    merged into its weights: sentence-transformers 6.3 cannot load an adapter inside a Router."""
    for route in retriever[0].sub_modules.values() if isinstance(retriever[0], Router) else []:
        if hasattr(route[0].model, "merge_and_unload"):
            route[0].model = route[0].model.merge_and_unload()
    retriever.save(path)


def finish(run, report, step_times, t0):
    """Save the encoder, evaluate it, write report.json: (the retriever, the report)."""
    run.retriever.eval()
    encoder_dir = os.path.join(run.cfg.out_dir, "encoder")
    if run.rank == 0:
        save_encoder(run.retriever, encoder_dir)
    report["after"] = evaluation(run, "the trained encoder")
    report["seconds_per_step"] = sum(step_times) / max(len(step_times), 1)
    report["seconds"] = time.time() - t0
    if run.rank == 0:
        with open(os.path.join(run.cfg.out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    run.log(summary(report, encoder_dir))
    if run.world > 1:
        dist.barrier()  # nobody leaves while rank 0 still writes
    if run.rank == 0 and run.device.type == "cuda" and os.environ.get("DREAM_PEAK_MEMORY_FILE"):
        with open(os.environ["DREAM_PEAK_MEMORY_FILE"], "w") as f:  # gpu_check.py reads it
            f.write(str(torch.cuda.max_memory_allocated(run.device)))
    return run.retriever, report


def parse_args(argv=None):
    """(the flags, the Config they make): every Config field a flag (config.py), and --toy, --small."""
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
