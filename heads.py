"""
Finding the heads DREAM biases: retrieval heads, as QRHead (Zhang et al. 2025) finds them.

A head's attention mass from the query's tokens on each candidate document, less the mass it
gives the same document for a null query (its position alone), ranks the candidates; a head's
score is how well that ranking finds the useful document. Without labels, the useful document is
the leave-one-out one: the candidate whose removal raises the frozen LM's loss on the target most.

Imports only dream, torch and transformers: copy it beside dream.py.
"""
import torch
from transformers.utils.logging import tqdm

import dream

@torch.no_grad()
def document_attention(lm, batch, scores=None, heads="all", temperature=0.05, rows="query", value_norm=False,
                       prefix=None):
    """[L', H, B, k]: the attention each head of the L' layers that heads selects pays to each
    document (summed over its tokens), averaged over the rows: the query's tokens ("query"), the
    query's and the target's ("suffix"), or those that predict a target token ("target").
    value_norm: each probability times the norm of the value vector it reads (Atlas's alpha * |v|).
    scores: bias the LM with them (None: the LM as it is). prefix: dream.encode_prefix(lm, batch)."""
    B, k = batch.spans.shape[:2]
    if rows not in ("query", "suffix", "target"):
        raise ValueError(f"rows={rows!r}: choose 'query', 'suffix' or 'target'")
    scores = torch.zeros(B, k, device=batch.input_ids.device) if scores is None else scores
    prefix = dream.encode_prefix(lm, batch) if prefix is None else prefix
    out = dream.biased_forward(lm, batch, scores, heads, temperature, output_attentions=True, prefix=prefix)
    docs_end, length = batch.spans[:, -1, 1], batch.attention_mask.sum(1)
    P = int(docs_end.max())
    N = next(iter(out.attentions.values())).shape[2]
    where = docs_end[:, None] + torch.arange(N, device=docs_end.device)                 # [B, N] positions
    is_row = where < length[:, None]
    if rows == "query":
        is_row &= where < (batch.labels != -100).int().argmax(1)[:, None]
    elif rows == "target":  # the next position holds a target token
        after = where + 1
        is_row &= (after < batch.labels.shape[1]) & (batch.labels.gather(1, after.clamp(max=batch.labels.shape[1] - 1))
                                                     != -100)
    is_row = is_row.float()
    in_doc = dream.document_columns(batch.spans, P).float()                       # [B, k, P]
    mass = []
    for layer in sorted(out.attentions):
        attn = out.attentions[layer][..., :P].float()                              # [B, H, N, P]
        if value_norm:  # a kv head serves H / H_kv query heads
            v = prefix.layers[layer].values[:, :, :P].float().norm(dim=-1)          # [B, H_kv, P]
            attn = attn * v.repeat_interleave(attn.shape[1] // v.shape[1], 1)[:, :, None]
        per_doc = attn @ in_doc.transpose(1, 2)[:, None]                            # [B, H, N, k]
        mass.append(torch.einsum("bhnk,bn->hbk", per_doc, is_row) / is_row.sum(1)[:, None])
    return torch.stack(mass)


def rank_heads(lm, tok, queries, docs, targets, useful, null_query="N/A", max_doc_tokens=128,
               batch_size=4, progress=False):
    """[L, H] head scores: how well each head's attention from the query finds the useful document.

    A head ranks the k candidates by the attention mass its query rows put on each, less the mass
    it puts there for null_query (what the head gives a document for its position alone, not for
    the query); its score is the mean reciprocal rank of the useful document (an index per query)."""
    device = next(lm.parameters()).device
    total = 0.0
    for i in tqdm(range(0, len(queries), batch_size), desc="ranking heads", disable=not progress):
        part = slice(i, i + batch_size)
        n = len(queries[part])
        real = document_attention(lm, dream.pack(tok, queries[part], docs[part], targets[part],
                                                 max_doc_tokens).to(device))
        null = document_attention(lm, dream.pack(tok, [null_query] * n, docs[part], targets[part],
                                           max_doc_tokens).to(device))
        calibrated = real - null                                                    # [L, H, n, k]
        u = torch.as_tensor(useful[part], device=device)
        useful_mass = calibrated.gather(-1, u[None, None, :, None].expand(*calibrated.shape[:3], 1))
        # ties share their ranks: a head that cannot tell the documents apart is not rewarded
        rank = 1 + (calibrated > useful_mass).sum(-1) + 0.5 * ((calibrated == useful_mass).sum(-1) - 1)
        total = total + (1.0 / rank).sum(-1)
    return (total / len(queries)).cpu()


def top_heads(scores, n):
    """The n best heads of rank_heads' [L, H] scores as a "layer-head,..." string, best first."""
    best = scores.flatten().argsort(descending=True)[:n].tolist()
    return ",".join(f"{i // scores.shape[1]}-{i % scores.shape[1]}" for i in best)


@torch.no_grad()
def leave_one_out_losses(lm, tok, queries, docs, targets, max_doc_tokens=128, batch_size=4, progress=False):
    """[n, k]: the frozen LM's mean target loss with each of a query's k candidates removed."""
    k = len(docs[0])
    if k < 3:
        raise ValueError(f"leave_one_out: k = {k}; removing one document must leave at least two")
    device = next(lm.parameters()).device
    losses = []
    for i in tqdm(range(0, len(queries), batch_size), desc="leave one out", disable=not progress):
        q, d, y = queries[i:i + batch_size], docs[i:i + batch_size], targets[i:i + batch_size]
        without = [dream.dream_loss(lm, dream.pack(tok, q, [ds[:j] + ds[j + 1:] for ds in d], y,
                                                   max_doc_tokens).to(device),
                                    torch.zeros(len(q), k - 1, device=device), reduction="none")
                   for j in range(k)]
        losses.append(torch.stack(without, 1))
    return torch.cat(losses)


def leave_one_out(lm, tok, queries, docs, targets, max_doc_tokens=128, batch_size=4, progress=False):
    """The useful document without labels: for each query, the index of the candidate whose
    removal raises the frozen LM's loss on the target most."""
    return leave_one_out_losses(lm, tok, queries, docs, targets, max_doc_tokens, batch_size,
                                progress).argmax(1).tolist()
