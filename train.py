"""
Train a retriever with DREAM.

    python train.py --toy     a toy world, offline, under two minutes on a laptop CPU

The toy world: documents "k<a> v<x>" pair a key with a value; a query "q<a>" asks for the value
of key a, and the target is that value. Queries and documents share no token, so an untrained
retriever ranks at chance. A tiny LM is first taught to copy a value out of its context (from a
document picked at random, so it never learns which key a query means), then frozen. The retriever
learns from dream_loss alone, without labels, which document the LM should read.
"""
import argparse
import json
import os
import random
import tempfile
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dream

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="the toy world (offline, < 2 min on a CPU)")
    args = parser.parse_args()
    if not args.toy:
        parser.error("say what to train: --toy")
    torch.set_num_threads(os.cpu_count() or 1)
    before, after = train_toy()
    print(json.dumps({"top1_before": round(before, 4), "top1_after": round(after, 4)}))
