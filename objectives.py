"""
The losses a training step can take, each from the retriever's [B, k] scores s of a question's k
candidates, p_R = softmax(s / tau): DREAM (the frozen LM's next-token loss through the biased
attention, dream.py); the label-free ways a frozen LM teaches a retriever that Atlas (Izacard et
al. 2022) compares, each KL(q || p_R) toward a target q the LM computes without grad, except EMDR²:
  replug  REPLUG-LSR = Atlas's perplexity distillation: q from the LM's likelihood of the target
          given each candidate alone
  adist   attention distillation: q from the LM's attention on each candidate
  loop    leave-one-out perplexity distillation: q from the LM's loss with each candidate removed
  emdr    EMDR²: the likelihood of the target under the mixture sum_i p_R(d_i) p_LM(y | d_i, q)
and InfoNCE with gold labels (the supervised reference). step_loss picks one by cfg.loss.
"""
import torch
import torch.nn.functional as F

import dream
import heads

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
    """The retriever as one forward call (what DDP wraps): [B, k] scores of B queries' lists of k
    documents, or (query, document) embeddings of a flat list of documents. frozen_documents
    (--train-side query): each document embedded once by encode_document, without grad, and kept."""

    def __init__(self, retriever, frozen_documents=False):
        super().__init__()
        self.retriever, self.kept = retriever, {} if frozen_documents else None

    def documents(self, texts):
        if self.kept is None:
            return dream.embed(self.retriever, texts, "document")
        new = [text for text in dict.fromkeys(texts) if text not in self.kept]
        if new:  # encode_document leaves the model in eval mode: the query side's dropout comes back after
            training = self.retriever.training
            self.kept.update(zip(new, self.retriever.encode_document(new, batch_size=len(new), convert_to_tensor=True,
                                                                     normalize_embeddings=True).float()))
            self.retriever.train(training)
        return torch.stack([self.kept[text] for text in texts])

    def forward(self, queries, docs):
        if docs and isinstance(docs[0], str):
            return dream.embed(self.retriever, queries, "query"), self.documents(docs)
        if self.kept is not None:
            docs = self.documents([text for ds in docs for text in ds]).view(len(docs), len(docs[0]), -1)
        return dream.score(self.retriever, queries, docs)


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
    if cfg.loss == "emdr":
        with torch.no_grad():
            token_nll = token_nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device)
        return emdr_loss(scores, *token_nll, cfg.temperature), tops
    with torch.no_grad():
        if cfg.loss == "replug":  # the LM's log-likelihood of the target given each candidate alone
            target = -nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device)
        elif cfg.loss == "loop":
            target = loop_losses(lm, tok, questions, doc_ids, idx, cfg, device)
        else:
            target = adist_mass(lm, lm_batch(tok, questions, doc_ids, idx, cfg).to(device), cfg)
    return distill(scores, target, cfg.temperature, cfg.beta), tops


# -----------------------------------------------------------------------------
# the label-free objectives that are not DREAM: a target the frozen LM gives without grad


def question_keys(lm, questions, idx, cfg):
    """The questions idx, and each one's key in a store of the frozen LM's values (LOOPS,
    TOKEN_NLLS): the LM, the question, its target, its candidates and how they are cut."""
    qs = [questions[i] for i in idx]
    return qs, [(lm.config._name_or_path, lm.dtype, q["query"], q["target"], tuple(q["candidates"]),
                 cfg.max_doc_tokens) for q in qs]


def distill(scores, target, temperature, beta):
    """KL(q || p_R), q = softmax(target / beta) (tau_g = beta), p_R = softmax(s / tau): the
    retriever's distribution over the candidates pulled toward the LM's (Atlas's KL objectives)."""
    return F.kl_div(F.log_softmax(scores / temperature, -1), F.softmax(target / beta, -1), reduction="batchmean")


def adist_mass(lm, batch, cfg):
    """[B, k] alpha_i: attention distillation's target before its softmax (Izacard & Grave 2021;
    Atlas's ADist): the frozen, unbiased LM's attention on each document (summed over its tokens),
    averaged over the rows (cfg.adist_rows: those that predict the target, or the query's) and over
    the heads cfg.heads selects (all: Atlas); cfg.adist_values: each probability times the norm of
    its value vector (Atlas), else the probability alone (Izacard & Grave)."""
    mass = heads.document_attention(lm, batch, heads=cfg.heads, rows=cfg.adist_rows, value_norm=cfg.adist_values)
    selected = dream.resolve_heads(lm, cfg.heads)                                  # {layer: [H] bool}
    return torch.cat([m[selected[layer].to(m.device)] for layer, m in zip(sorted(selected), mass)]).mean(0)


LOOPS = {}  # the frozen LM's losses with each candidate removed: the same in every step and run


def loop_losses(lm, tok, questions, doc_ids, idx, cfg, device):
    """[B, k] l_-i: the frozen LM's mean target loss with candidate i removed from the k (k forwards
    of k - 1 documents). loop's target softmax(l_-i / beta): a document the LM misses most when it
    is gone is the one it used (Atlas's leave-one-out perplexity distillation, LOOP)."""
    qs, keys = question_keys(lm, questions, idx, cfg)
    if any(key not in LOOPS for key in keys):
        losses = heads.leave_one_out_losses(lm, tok, [q["query"] for q in qs], [[doc_ids[j] for j in q["candidates"]]
                                            for q in qs], [q["target"] for q in qs], cfg.max_doc_tokens, len(qs))
        LOOPS.update(zip(keys, losses.cpu()))
    return torch.stack([LOOPS[key] for key in keys]).to(device)


def emdr_loss(scores, token_nll, is_target, temperature):
    """EMDR² (Sachan et al. 2021) per target token, as Atlas computes it:
    L = -mean_t log sum_i p_R(d_i) p_LM(y_t | d_i, q, y_<t), the LM reading each candidate alone.
    token_nll [B, k, T]: -log p_LM of each target token; is_target [B, T]: which of the T are tokens.
    Its gradient on s_i is (p_R(d_i) - the posterior of d_i given y) / tau, averaged over the tokens."""
    log_mix = torch.logsumexp(F.log_softmax(scores / temperature, -1)[..., None] - token_nll, 1)   # [B, T]
    return -((log_mix * is_target).sum(1) / is_target.sum(1)).mean()


TOKEN_NLLS = {}  # the frozen LM's per-token losses of a question's target with each candidate alone


def token_nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device):
    """([B, k, T] the frozen LM's loss of each target token with one candidate alone as its context,
    [B, T] which of the T are the target's tokens (a shorter target is padded with zeros))."""
    qs, keys = question_keys(lm, questions, idx, cfg)
    if any(key not in TOKEN_NLLS for key in keys):
        one = [(q["query"], [doc_ids[j]], q["target"]) for q in qs for j in q["candidates"]]
        batch = dream.pack(tok, *zip(*one), max_doc_tokens=cfg.max_doc_tokens).to(device)
        logits = dream.biased_forward(lm, batch, torch.zeros(len(one), 1, device=device)).logits
        targets = batch.labels[:, 1:]
        nll = F.cross_entropy(logits.float(), targets[targets != -100], reduction="none")
        per_token = nll.split((targets != -100).sum(1).tolist())
        TOKEN_NLLS.update(zip(keys, (torch.stack(per_token[i:i + cfg.k]).cpu() for i in range(0, len(one), cfg.k))))
    T = max(TOKEN_NLLS[key].shape[1] for key in keys)
    nll = torch.stack([F.pad(TOKEN_NLLS[key], (0, T - TOKEN_NLLS[key].shape[1])) for key in keys]).to(device)
    is_target = torch.stack([torch.arange(T) < TOKEN_NLLS[key].shape[1] for key in keys]).float().to(device)
    return nll, is_target


def centered_scores(model, queries, docs):
    """[B, k]: each query's scores of its k documents, less each document's mean score against
    the batch's other B - 1 queries: a score that every query gives a document cancels."""
    B, k = len(docs), len(docs[0])
    q, d = model(list(queries), [text for ds in docs for text in ds])  # one call: one DDP forward
    with torch.autocast(q.device.type, enabled=False):  # fp32 cosines, as dream.score
        s = (q @ d.T).view(B, B, k)  # s[a, b, j]: query a against example b's document j
    own = s[range(B), range(B)]
    return own - (s.sum(0) - own) / (B - 1)


def nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device):
    """[B, k]: the frozen LM's mean target-token loss with one candidate at a time as its context
    (REPLUG-LSR's), from the per-token losses EMDR² reads: one set of forwards serves both."""
    nll, is_target = token_nll_per_document(lm, tok, questions, doc_ids, idx, cfg, device)
    return (nll * is_target[:, None]).sum(-1) / is_target.sum(-1, keepdim=True)


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
    queries, docs = model([q["query"] for q in qs], [passages[j] for j in flat])  # one call: one DDP forward
    with torch.autocast(queries.device.type, enabled=False):  # fp32 cosines, as dream.score
        logits = queries @ docs.T / cfg.temperature  # [B, B * k]
    positive = torch.arange(len(qs), device=logits.device) * cfg.k
    # a question's gold paragraph may be another question's candidate too: there it is no negative
    copy = torch.tensor([[j == gold for j in flat] for gold in golds], device=logits.device)
    copy[torch.arange(len(qs)), positive] = False
    loss = F.cross_entropy(logits.masked_fill(copy, float("-inf")), positive)
    own = logits.detach().view(len(qs), len(qs), cfg.k)[range(len(qs)), range(len(qs))]  # [B, k]
    return loss, [g[row] for g, row in zip(groups, own.argmax(-1).tolist())]
