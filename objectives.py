"""
The losses a training step can take, each from the retriever's [B, k] scores of a question's k
candidates: DREAM (the frozen LM's next-token loss through the biased attention, dream.py), the
baseline REPLUG-LSR (the retriever's softmax pulled toward the LM's likelihood of the target given
each candidate alone: Atlas's perplexity distillation), and InfoNCE with gold labels (the supervised
reference). step_loss picks one by cfg.loss.
"""
import torch
import torch.nn.functional as F

import dream

# -----------------------------------------------------------------------------
# a question's texts and its LM batch


def examples(questions, passages, idx):
    qs = [questions[i] for i in idx]
    return ([q["query"] for q in qs], [[passages[j] for j in q["candidates"]] for q in qs],
            [q["target"] for q in qs])


def lm_batch(tok, questions, doc_ids, idx, cfg):
    """dream.pack on documents tokenized once before training (doc_ids: passage index -> ids)."""
    qs = [questions[i] for i in idx]
    return dream.pack(tok, [q["query"] for q in qs], [[doc_ids[j] for j in q["candidates"]] for q in qs],
                      [q["target"] for q in qs], max_doc_tokens=cfg.max_doc_tokens)


class Scorer(torch.nn.Module):
    """The retriever as one forward call (what DDP wraps): [B, k] scores, or texts' embeddings."""

    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever

    def forward(self, queries, docs=None):
        return dream.embed(self.retriever, queries) if docs is None else dream.score(self.retriever, queries, docs)


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


# -----------------------------------------------------------------------------
# one training step's loss


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
        reading = {"reading": cfg.reading, "hide_documents": cfg.hide_documents}
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
