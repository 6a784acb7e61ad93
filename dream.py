"""
DREAM: Dense Retrieval Embeddings via Autoregressive Modeling, in one file.

A retriever E scores a query q against k candidate documents,

    s_i = cos(E(q), E(d_i)),

and a frozen causal LM reads  [d_1] ... [d_k] [q] [y]  and predicts the target y (an answer).
In selected attention heads, the scores decide how much attention each document gets from the
positions after the documents (the query and target tokens). With p = softmax(s / tau), two readings:

  "scale" (the default): every logit from such a row to a token of document i gets the bias

    b_i = log p_i + log k,

  which multiplies the head's own mass m_i on document i by k p_i, then renormalises: a share
  proportional to p_i m_i. Equal scores give b = 0: the LM is exactly itself.

  "set": document i gets exactly the share p_i of the row's mass on the documents, M = sum_i m_i,
  each document keeping its own distribution over its tokens (the bias b_i = log p_i + log M - log m_i,
  a different one in every row). Equal scores give every document M / k: no longer the LM itself.

Optionally (hide_documents) the other heads' query and target rows see no document, so the
documents reach the prediction through the selected heads alone. The loss is the LM's next-token
cross-entropy on y only,

    L = -1/|y| sum_t log p_LM(y_t | d_1..d_k, q, y_<t ; p(s)),

and its gradient reaches the retriever through p alone: the LM is frozen, and there are no
relevance labels. Whichever document helps the LM predict y is pulled up.

The retriever is any sentence-transformers model; score(retriever, queries, docs) gives its [B, k]
cosines with grad, as encode_query and encode_document would (prompts, routes). This is our reading
of arXiv 2606.24667, whose equations are not public.

Sections: 1 score-biased attention, 2 the frozen LM, 3 packing a batch, 4 the loss, 5 the retriever.
Finding the heads to bias (retrieval heads, as QRHead finds them) is heads.py. This file needs torch
and transformers alone (sentence-transformers only to build a retriever).
"""
import functools
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer

# -----------------------------------------------------------------------------
# 1. score-biased attention, written by hand


@dataclass
class ScoreBias:
    """What the attention layers need to know: the documents' weights, their columns, the heads."""
    log_p: torch.Tensor  # [B, k] log softmax(s / tau): the weight of each document
    in_doc: torch.Tensor  # [B, k, S] bool: which key columns are document i's
    heads: dict          # layer index -> [H] bool, True for a selected (biased) head, on the LM's device
    reading: str = "scale"  # "scale" or "set" (the module docstring)
    hide: bool = False   # the query and target rows of every other head see no document
    biased_layers: int = 0  # layers with selected heads that received it (a model that drops kwargs is caught)
    attentions: dict = None  # layer -> [B, H, T, S] probabilities, when asked for
    reference: bool = False  # compute by hand even where torch's SDPA kernel gives the same result

    def column_bias(self):
        """scale: [B, 1, 1, S], b_i = log p_i + log k on document i's columns, 0 elsewhere."""
        b = self.log_p + math.log(self.log_p.shape[-1])
        return torch.einsum("bk,bks->bs", b, self.in_doc.to(b))[:, None, None]

    def row_bias(self, logits):
        """set: [B, H, T, S], the bias that gives document i exactly p_i of the row's document mass M,
        each document keeping its own distribution: b_i = log p_i + log M - log m_i, where m_i is
        the mass the row's unbiased logits [B, H, T, S] (masked ones very negative) give it."""
        lse = torch.stack([logits.masked_fill(~self.in_doc[:, None, None, i], torch.finfo(logits.dtype).min)
                           .logsumexp(-1) for i in range(self.in_doc.shape[1])], -1)    # log m_i + log Z
        b = self.log_p[:, None, None] + lse.logsumexp(-1, keepdim=True) - lse        # [B, H, T, k]
        return torch.einsum("bhtk,bks->bhts", b, self.in_doc.to(b))


def dream_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    score_bias=None, **kwargs):
    """Attention for one layer. query [B, H, T, D]; key, value [B, H_kv, S, D] (S >= T with a cache).

    The selected heads' rows get the reading's bias on the document columns; with hide, the other
    heads' rows lose the document columns. A layer with nothing to do is the model's own SDPA."""
    biased = score_bias is not None and module.layer_idx in score_bias.heads
    if not biased and not (score_bias is not None and score_bias.hide):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__} uses attention softcapping or sinks, which "
                                  "the score-biased attention does not implement")
    H, T, S = query.shape[1], query.shape[2], key.shape[-2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    selected = score_bias.heads[module.layer_idx] if biased else torch.zeros(H, dtype=torch.bool, device=query.device)
    selected = selected[:, None, None]                                                 # [H, 1, 1]
    # one boolean mask of the columns each row may read
    if attention_mask is None:  # transformers omits the mask when plain causal is enough
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    elif attention_mask.dtype != torch.bool:  # an additive 0 / -inf mask
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if score_bias.hide:  # [B, H, T, S]: the unselected heads' rows lose the documents
        attention_mask = attention_mask & ~(score_bias.in_doc.any(1)[:, None, None] & ~selected)
    score_bias.biased_layers += biased
    by_hand = biased and (score_bias.reading == "set" or score_bias.reference
                          or score_bias.attentions is not None)
    # at least fp32, autocast off: in bf16 a bias of 0.05 would be lost on a logit of 10
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        # grouped-query attention: each key/value head serves H / H_kv query heads
        q, k, v = query.to(dtype), *(repeat_kv(x, H // x.shape[1]).to(dtype) for x in (key, value))
        bias = score_bias.column_bias() if biased and score_bias.reading == "scale" else q.new_zeros(())
        if not by_hand:  # torch's kernel, mask and bias as one float mask: no [T, S] probabilities kept
            mask = torch.where(attention_mask, torch.where(selected, bias.to(dtype), 0.0), torch.finfo(dtype).min)
            out, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                        dropout_p=dropout if module.training else 0.0), None
        else:  # by hand: the probabilities are kept, or (set) the bias needs the logits
            # finite fill: a fully masked row must not give NaN
            logits = (q @ k.transpose(-1, -2) * scaling).masked_fill(~attention_mask, torch.finfo(dtype).min)
            bias = score_bias.row_bias(logits) if score_bias.reading == "set" else bias
            probs = (logits + torch.where(selected, bias.to(dtype), 0.0)).softmax(dim=-1)
            probs = F.dropout(probs, p=dropout, training=module.training)
            if score_bias.attentions is not None:
                score_bias.attentions[module.layer_idx] = probs
            out = probs @ v                                                              # [B, H, T, D]
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs


# "dream" is an attention implementation like "sdpa": transformers calls it in every layer
AttentionInterface.register("dream", dream_attention)
AttentionMaskInterface.register("dream", sdpa_mask)


def resolve_heads(lm, heads="all"):
    """Turn a head selection into {layer: [H] bool mask}, for the layers with a selected head. Accepted forms:
    "all"; a layer slice "20:30" or "-8:" (every head of those layers); "13-4,20-0" (layer-head
    pairs, the format of a saved head ranking); or a list of (layer, head) pairs."""
    L, H = lm.config.num_hidden_layers, lm.config.num_attention_heads
    if isinstance(heads, str) and (heads == "all" or ":" in heads):
        if heads == "all":
            layers = range(L)
        else:
            try:
                layers = range(L)[slice(*(int(p) if p.strip() else None for p in heads.split(":")))]
            except ValueError:
                raise ValueError(f"heads={heads!r}: a layer slice looks like '20:30' or '-8:'") from None
        pairs = [(l, h) for l in layers for h in range(H)]
    elif isinstance(heads, str):
        try:
            pairs = [tuple(int(x) for x in p.split("-")) for p in heads.split(",") if p.strip()]
            assert all(len(p) == 2 for p in pairs)
        except (ValueError, AssertionError):
            raise ValueError(f"heads={heads!r}: write heads as 'layer-head' pairs, e.g. '13-4,20-0'") from None
    else:
        pairs = [tuple(p) for p in heads]
    if not pairs:
        raise ValueError(f"heads={heads!r} selects no head: DREAM needs at least one biased head")
    masks = {}
    for layer, head in pairs:
        if not (0 <= layer < L and 0 <= head < H):
            raise ValueError(f"head ({layer}, {head}) does not exist: the model has {L} layers "
                             f"of {H} heads (layers 0..{L - 1}, heads 0..{H - 1})")
        masks.setdefault(layer, torch.zeros(H, dtype=torch.bool))[head] = True
    return masks


# -----------------------------------------------------------------------------
# 2. the frozen LM


def prepare_lm(lm, gradient_checkpointing=False):
    """Freeze a causal LM in place and switch it to score-biased attention.

    gradient_checkpointing: keep only each layer's input for the backward and recompute the rest
    there (less memory, one more forward of the query and target tokens)."""
    attn = [m for m in lm.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    if (getattr(lm.config, "is_encoder_decoder", False) or lm.get_output_embeddings() is None
            or not attn or not all(m.is_causal for m in attn)):
        raise ValueError(f"{type(lm).__name__} is not a causal LM: DREAM needs a decoder-only model "
                         "with causal self-attention and an LM head (AutoModelForCausalLM)")
    lm.requires_grad_(False).eval()
    lm.set_attn_implementation("dream")
    if gradient_checkpointing:
        lm.activation_checkpointing_enable({"use_reentrant": False})
        for layer in lm.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                # transformers checkpoints only layers in training mode, and drops the cache unless
                # told a replay reads it alone, which PrefixCache makes true. the flag is set on the
                # layer itself, not its children, so dropout stays off
                layer.training, layer._can_checkpoint_with_cache = True, True
    return lm


def load_frozen_lm(name_or_path, gguf_file=None, dtype=torch.float32, device=None,
                   gradient_checkpointing=False):
    """A frozen causal LM with score-biased attention, and its tokenizer.

    name_or_path: a hub name, a local folder, or a .gguf file (or pass gguf_file= with its folder)."""
    if gguf_file is None and str(name_or_path).endswith(".gguf"):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(name_or_path, **extra)
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra)
    if tok.pad_token is None:  # padding is masked out, any token will do
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    return prepare_lm(lm.to(device) if device else lm, gradient_checkpointing), tok


# -----------------------------------------------------------------------------
# 3. packing: [bos] [d_1 \n\n] ... [d_k \n\n] [Question: q\nAnswer:] [ y]

DOC_SEPARATOR = "\n\n"
QUERY_FORMAT = "Question: {}\nAnswer:"
TARGET_FORMAT = " {}"


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T], 1 for real tokens
    labels: torch.Tensor          # [B, T], target token ids, -100 elsewhere (HF convention)
    spans: torch.Tensor           # [B, k, 2], [start, end) of each document and its separator

    def to(self, device):
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def text_ids(tok, texts):
    """The token ids of each text as it reads inside a sequence: no special tokens and, for a
    tokenizer that puts a space before a text's first word (SentencePiece: Llama-2, Mistral), not
    that space either: the text is read after a newline whose tokens are dropped (where the newline
    merges with the text, the text alone less a leading token that is a space alone)."""
    plain = lambda xs: tok(list(xs), add_special_tokens=False)["input_ids"]
    anchor = leading_space_anchor(tok)
    if anchor is None:  # no such space (GPT-2, Qwen, Llama-3): the texts alone
        return plain(texts)
    out = []
    for text, read in zip(texts, plain("\n" + text for text in texts)):
        if read[:len(anchor)] == anchor:
            out.append(read[len(anchor):])
            continue
        ids = plain([text])[0]
        out.append(ids[1:] if ids and not tok.decode(ids[:1]).strip(" ") and not text.startswith(" ") else ids)
    return out


@functools.lru_cache(maxsize=None)
def leading_space_anchor(tok):
    """A newline's ids if the tokenizer puts a space before a text's first word, else None."""
    anchor, with_anchor, alone = tok(["\n", "\na", "a"], add_special_tokens=False)["input_ids"]
    return None if with_anchor[len(anchor):] == alone else anchor


def start_token(tok):
    """An unbiased first token: most LMs park spare attention on position 0 (an "attention sink"),
    and a bias there would scale that, not the attention to document 1. The tokenizer's own start
    (BOS), else its EOS (Qwen2: no BOS; its documents are separated by <|endoftext|>), else PAD."""
    start = tok("")["input_ids"] or [next((t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                                           if t is not None), None)]
    if None in start:
        raise ValueError(f"{type(tok).__name__} has no BOS, EOS or PAD token to start the sequence with: "
                         "set tok.bos_token (a token the LM saw at the start of its texts)")
    return start


def pack(tok, queries, docs, targets, max_doc_tokens=128):
    """One LM batch from B queries, B lists of k documents and B targets (DREAM needs k >= 2).

    A document is a string or its token ids (text_ids, once, outside a training loop), cut to
    max_doc_tokens tokens. The sequence starts with start_token(tok), so document 1 is not on the
    attention sink. Padding goes on the right, so a padded example is computed exactly as it
    would be alone."""
    if not (len(queries) == len(docs) == len(targets)):
        raise ValueError(f"pack: got {len(queries)} queries, {len(docs)} document lists and "
                         f"{len(targets)} targets; they must be equally many")
    k = len(docs[0]) if docs else 0
    if k < 1:
        raise ValueError("pack: no documents; give each query its k candidates")
    encode = lambda text: text_ids(tok, [text])[0]
    start, sep = start_token(tok), encode(DOC_SEPARATOR)
    rows, spans = [], []
    for b, (q, ds, y) in enumerate(zip(queries, docs, targets)):
        if len(ds) != k:
            raise ValueError(f"pack: example {b} has {len(ds)} documents, example 0 has {k}; "
                             "every query needs the same number of candidates")
        ids, example_spans = list(start), []
        for i, d in enumerate(ds):
            d_ids = (encode(d) if isinstance(d, str) else list(d))[:max_doc_tokens]
            if not d_ids:
                raise ValueError(f"pack: document {i} of example {b} has no tokens "
                                 f"({d[:40]!r}, max_doc_tokens={max_doc_tokens})")
            example_spans.append((len(ids), len(ids) + len(d_ids) + len(sep)))
            ids += d_ids + sep
        ids += encode(QUERY_FORMAT.format(q))
        y_ids = encode(TARGET_FORMAT.format(y))
        if not y_ids:
            raise ValueError(f"pack: the target of example {b} ({y!r}) tokenizes to nothing")
        rows.append((ids + y_ids, len(ids)))
        spans.append(example_spans)
    T = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
        labels[b, n_prompt:len(ids)] = input_ids[b, n_prompt:len(ids)]
    return Batch(input_ids, attention_mask, labels, torch.tensor(spans, dtype=torch.long))


# -----------------------------------------------------------------------------
# 4. the DREAM loss


def document_columns(spans, n):
    """[B, k, n] bool: which of the first n positions are document i's (spans [B, k, 2])."""
    pos = torch.arange(n, device=spans.device)
    return (pos >= spans[..., 0:1]) & (pos < spans[..., 1:2])


class PrefixCache(DynamicCache):
    """The documents' keys and values. Once frozen, update() returns them with the new ones
    without storing anything, so the suffix pass can be replayed (gradient checkpointing)."""
    frozen = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)


@torch.no_grad()
def encode_prefix(lm, batch):
    """The documents' keys and values, as a frozen PrefixCache. The bias never reaches the
    documents, so this runs without grad, and can be kept and reused for the same batch."""
    docs_end = batch.spans[:, -1, 1]
    P = int(docs_end.max())
    cache = PrefixCache()
    lm(input_ids=batch.input_ids[:, :P], attention_mask=(torch.arange(P, device=docs_end.device)
       < docs_end[:, None]).long(), cache=cache, use_cache=True, logits_to_keep=1)
    cache.frozen = True
    return cache


def biased_forward(lm, batch, scores, heads="all", temperature=0.05, output_attentions=False,
                   reference=False, prefix=None, reading="scale", hide_documents=False):
    """Run the LM with the score bias; return its output with logits only where a target token
    is predicted (a flat [N, V] tensor, row order = batch order), not over the documents.
    reading: "scale" (b_i = log p_i + log k) or "set" (document i gets p_i of the document mass).
    hide_documents: the query and target rows of every unselected head see no document, so the
    documents reach the prediction only through the selected heads.
    output_attentions: out.attentions = {layer: [B, H, N, P + N] probabilities} of the biased
    layers; rows: the N suffix positions (query and target); columns: the P prefix positions
    (the documents; a shorter example's own suffix there is masked out), then the N suffix ones.
    reference: biased layers use the hand-written attention instead of torch's SDPA kernel with
    the bias as its float mask (the same numbers, slower; output_attentions and "set" imply it).
    prefix: encode_prefix(lm, batch), computed earlier (None: computed here)."""
    if lm.config._attn_implementation != "dream":
        raise ValueError("this LM has no score-biased attention: load it with load_frozen_lm() "
                         "or call prepare_lm(lm) first")
    if reading not in ("scale", "set"):
        raise ValueError(f"reading={reading!r}: choose 'scale' or 'set'")
    B, k = batch.spans.shape[:2]
    if scores.shape != (B, k):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, the batch has {B} queries "
                         f"of {k} documents: scores must be [{B}, {k}]")
    if k < 2 and scores.requires_grad:  # without grad, one document is fine: the LM as it is
        raise ValueError(f"k = {k} document per query: softmax(s/tau) over one document is constant, "
                         "the bias is zero and the retriever gets no gradient: give k >= 2")
    # the documents come before every biased row, so the bias never reaches them: run them once,
    # without grad, into a key/value cache; only the query and target tokens (the suffix) run
    # with the bias, and only they are in the backward pass
    docs_end, length = batch.spans[:, -1, 1], batch.attention_mask.sum(1)        # [B]
    P, N = int(docs_end.max()), int((length - docs_end).max())  # prefix and suffix lengths
    prefix_mask = torch.arange(P, device=docs_end.device) < docs_end[:, None]     # [B, P]
    cache = encode_prefix(lm, batch) if prefix is None else prefix
    if (cache.layers[0].keys.shape[0], cache.get_seq_length()) != (B, P):
        raise ValueError(f"prefix holds {cache.layers[0].keys.shape[0]} examples of {cache.get_seq_length()} "
                         f"positions, the batch {B} of {P}: it was encoded from another batch")
    where = docs_end[:, None] + torch.arange(N, device=docs_end.device)           # [B, N] positions
    suffix_mask = where < length[:, None]
    where = where.clamp(max=batch.input_ids.shape[1] - 1)
    labels = batch.labels.gather(1, where).masked_fill(~suffix_mask, -100)
    predicts_target = torch.zeros_like(suffix_mask)
    predicts_target[:, :-1] = labels[:, 1:] != -100
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    masks = {layer: m.to(scores.device) for layer, m in resolve_heads(lm, heads).items()}  # moved once, not per layer
    score_bias = ScoreBias(F.log_softmax(scores / temperature, dim=-1), document_columns(batch.spans, P + N), masks,
                           reading, hide_documents, attentions={} if output_attentions else None, reference=reference)
    out = lm(input_ids=batch.input_ids.gather(1, where), position_ids=where,
             attention_mask=torch.cat([prefix_mask, suffix_mask], 1).long(), cache=cache,
             use_cache=False, score_bias=score_bias, logits_to_keep=predicts_target)  # read, not extended
    if score_bias.biased_layers < len(masks):
        raise RuntimeError(f"{type(lm).__name__} did not pass the bias to its attention layers "
                           f"({score_bias.biased_layers} of {len(masks)} layers reached): it does not forward "
                           "attention kwargs, so DREAM cannot bias it")
    out.logits = out.logits.reshape(-1, out.logits.shape[-1])
    out.attentions = score_bias.attentions
    return out


def dream_loss(lm, batch, scores, heads="all", temperature=0.05, reduction="mean", reference=False,
               prefix=None, reading="scale", hide_documents=False):
    """Next-token cross-entropy on the targets, with the attention biased by the scores [B, k].

    reduction="mean": the mean over examples of each example's mean over its target tokens;
    "none": that per-example loss, shape [B]. reference, prefix, reading, hide_documents: see
    biased_forward."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")
    logits = biased_forward(lm, batch, scores, heads, temperature, reference=reference, prefix=prefix,
                            reading=reading, hide_documents=hide_documents).logits
    targets = batch.labels[:, 1:]
    is_target = targets != -100
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, targets[is_target], reduction="none")
    example = is_target.nonzero()[:, 0]
    per_example = nll.new_zeros(len(targets)).index_add(0, example, nll)
    per_example = per_example / is_target.sum(1)
    return per_example.mean() if reduction == "mean" else per_example


# -----------------------------------------------------------------------------
# 5. the retriever: any sentence-transformers model (Transformer -> Pooling -> Normalize)

POOLING = {"mean": "mean", "cls": "cls", "last": "lasttoken"}


def load_retriever(name_or_path, pooling=None, lora=0, device=None, chat_template=True):
    """A SentenceTransformer to train. pooling: "mean", "cls" or "last" (the last token, for
    decoder embedders); None keeps the folder's own (a plain transformers folder: mean). With a
    pooling, chat_template=True lets sentence-transformers render each text through the tokenizer's
    chat template where it has one (SmolLM2-Instruct: a system prompt, the text as the user's turn,
    then <|im_end|>); False: the text alone, ending with the tokenizer's EOS. --decoder trained
    faster with the template (RESULTS.md). lora > 0: LoRA adapters of that rank (peft) on every
    linear layer, the rest frozen."""
    # imported here: sections 1-4 (the method) need torch and transformers alone
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    if pooling is None:
        retriever = SentenceTransformer(name_or_path, device=device)
    else:
        if pooling not in POOLING:
            raise ValueError(f"pooling={pooling!r}: choose one of {list(POOLING)}")
        # text only (no "message" modality): sentence-transformers then skips the chat template
        text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
        body = Transformer(name_or_path) if chat_template else \
            Transformer(name_or_path, modality_config=text_only, module_output_name="token_embeddings")
        retriever = SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), POOLING[pooling]),
                                                 Normalize()], device=device)
    tok = retriever.tokenizer
    if pooling == "last" and tok.eos_token is not None:
        # a causal model's last token has read the whole text only if it comes after it: an EOS,
        # appended by the tokenizer itself, so it is saved with it and encode() agrees; a BOS stays
        # (a chat template closes the text itself)
        bos = tok.bos_token is not None and tok("a")["input_ids"][0] == tok.bos_token_id
        tok.add_bos_token, tok.add_eos_token = bos, True
    if tok.pad_token is None:  # decoders often have none; padding is masked out
        tok.pad_token = tok.eos_token or tok.unk_token
    if lora:
        import peft  # only LoRA needs it
        body = retriever[0]
        body.model = peft.get_peft_model(body.model, peft.LoraConfig(
            r=int(lora), lora_alpha=2 * int(lora), target_modules="all-linear"))
        # the saved adapter names its base: a local folder by its absolute path, to load from anywhere
        base = body.model.peft_config["default"].base_model_name_or_path
        if base and os.path.isdir(base):
            body.model.peft_config["default"].base_model_name_or_path = os.path.abspath(base)
    return retriever.eval()  # as transformers loads a model (no dropout); .train() to train


def embed(retriever, texts, task=None):
    """[N, d] unit vectors with grad: the training path of encode_query (task "query"), encode_document
    ("document") or encode (None): the model's own prompt for the task, its Router's route for it."""
    names = {"query": ["query"], "document": ["document", "passage", "corpus"]}.get(task, [])
    name = next((n for n in names if n in retriever.prompts), retriever.default_prompt_name)
    features = retriever.preprocess(list(texts), prompt=retriever.prompts.get(name), task=task)
    features = {key: value.to(retriever.device) if torch.is_tensor(value) else value
                for key, value in features.items()}
    return F.normalize(retriever(features, task=task)["sentence_embedding"].float(), dim=-1)


def score(retriever, queries, docs):
    """[B, k] cosine scores with grad of B queries against their B lists of k documents (or those
    documents' [B, k, d] unit embeddings, kept from a frozen document encoder): one forward for the
    queries, one for all the documents (a query padded to a document's length would cost)."""
    if len(docs) != len(queries) or len({len(ds) for ds in docs}) != 1:
        raise ValueError(f"score: {len(queries)} queries and document lists of {sorted({len(ds) for ds in docs})} "
                         "documents; give each query a list of the same k documents")
    d = docs if torch.is_tensor(docs) else \
        embed(retriever, [text for ds in docs for text in ds], "document").view(len(docs), len(docs[0]), -1)
    with torch.autocast(d.device.type, enabled=False):  # fp32 cosines: bf16 would round s/tau by ~0.08
        return torch.einsum("bd,bkd->bk", embed(retriever, queries, "query"), d)
