"""The method's proofs: what dream.py claims (and heads.py's head finding), on tiny models built here
(no downloads). Equal scores give the unmodified LM; the bias moves attention mass between documents
as softmax(s / tau) says, in each reading; gradients reach the retriever and never the LM; a padded
batch gives each example's loss alone; the speed paths give the hand-written reference's numbers;
packing lays out what the LM reads; bad input is refused with a message that says what to do.

    pytest test_dream.py    (about a minute on 2 cores; the slowest end-to-end proofs are in
                             test_dream_end_to_end.py, the rest of the project's tests in the other test_*.py)
"""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel, BertModel, PreTrainedTokenizerFast

import dream
import heads
import objectives
from conftest import DEVICE, TOK, V, WORLD, target_logits_plain, tiny_lm, toy_batch

# the readings dream.py implements, and the switch that hides the documents from the other heads
READINGS = [{}, {"hide_documents": True}, {"reading": "set"}, {"reading": "set", "hide_documents": True}]
# unequal scores [B = 3, k = 3] for toy_batch(): clone().requires_grad_() where a test needs their gradient
SCORES = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]])


# -----------------------------------------------------------------------------
# equal scores: the LM is exactly itself


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("n", [1, 3])  # one example (no padding) and a padded batch
def test_equal_scores_give_the_unmodified_model(kind, n):
    lm = tiny_lm(kind)
    batch = dream.pack(TOK, *toy_batch(n))
    if n > 1:
        assert (batch.attention_mask == 0).any()
    reference = target_logits_plain(lm, batch)
    dream.prepare_lm(lm)
    for value in (0.0, 0.37):
        scores = torch.full((n, 3), value)
        biased = dream.biased_forward(lm, batch, scores, heads="all").logits
        assert biased.shape == reference.shape
        assert (biased - reference).abs().max().item() <= 1e-5


def test_unequal_scores_change_the_model():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    equal = dream.biased_forward(lm, batch, torch.zeros(3, 3)).logits
    biased = dream.biased_forward(lm, batch, torch.tensor([[1.0, 0, 0]] * 3)).logits
    assert (biased - equal).abs().max().item() > 1e-3


# -----------------------------------------------------------------------------
# the bias moves attention mass between documents exactly as softmax(s/tau) says (scale); set gives each
# document its softmax share of the unbiased mass; hidden documents are read by the selected heads alone


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bias_reweights_document_mass_by_softmax(kind):
    lm = dream.prepare_lm(tiny_lm(kind))
    batch = dream.pack(TOK, *toy_batch())
    layer, head, tau = 1, 2, 0.3
    scores = SCORES
    probs = lambda s: dream.biased_forward(lm, batch, s, heads=[(layer, head)], temperature=tau,
                                           output_attentions=True).attentions[layer]
    p0, p1 = probs(torch.zeros(3, 3)), probs(scores)       # [B, H, S, P + S]: rows after the documents
    docs_end, length = batch.spans[:, -1, 1], batch.attention_mask.sum(1)
    assert p1.shape == (3, 4, (length - docs_end).max(), docs_end.max() + (length - docs_end).max())
    others = [h for h in range(4) if h != head]
    assert torch.allclose(p1[:, others], p0[:, others], atol=1e-6)    # unselected heads untouched
    want = torch.softmax(scores / tau, dim=-1)
    checked = 0
    for b in range(3):
        for row in range(length[b] - docs_end[b]):
            m0 = torch.stack([p0[b, head, row, s:e].sum() for s, e in batch.spans[b]])
            m1 = torch.stack([p1[b, head, row, s:e].sum() for s, e in batch.spans[b]])
            for i in range(3):
                for l in range(3):
                    got = (m1[i] / m0[i]) / (m1[l] / m0[l])
                    assert math.isclose(got, want[b, i] / want[b, l], rel_tol=1e-4)
                    checked += 1
    assert checked > 0


def test_equal_scores_give_zero_bias_and_bias_is_log_k_times_softmax():
    s = torch.tensor([[0.2, 0.2, 0.2, 0.2], [1.0, 0.0, -1.0, 0.5]])
    one_column_each = torch.eye(4, dtype=torch.bool).expand(2, 4, 4)  # document i is column i
    b = dream.ScoreBias(F.log_softmax(s / 0.1, -1), one_column_each, {}).column_bias()[:, 0, 0]  # [2, 4]
    assert torch.equal(b[0], torch.zeros(4))
    assert torch.allclose(b[1].exp(), 4 * torch.softmax(s[1] / 0.1, dim=-1))


def document_masses(probs, spans):
    """[B, H, N, k]: each suffix row's attention mass on each document (probs [B, H, N, P + N])."""
    in_doc = dream.document_columns(spans, probs.shape[-1]).to(probs)
    return torch.einsum("bhns,bks->bhnk", probs, in_doc)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("hide", [False, True])
def test_set_gives_each_document_its_softmax_share_of_the_unbiased_mass(kind, hide):
    # selected heads in layer 0, whose input the bias cannot reach: the unbiased logits are the same
    lm = dream.prepare_lm(tiny_lm(kind))
    batch = dream.pack(TOK, *toy_batch())  # padded
    selected, tau = [1, 3], 0.3  # llama: heads 1 and 3 share no key/value head with each other
    scores = SCORES
    probs = lambda s, **kw: dream.biased_forward(lm, batch, s, heads=[(0, h) for h in selected], temperature=tau,
                                                 output_attentions=True, **kw).attentions[0]
    p0 = probs(torch.zeros(3, 3))  # scale at equal scores: the LM itself
    p1 = probs(scores, reading="set", hide_documents=hide)
    n_rows = batch.attention_mask.sum(1) - batch.spans[:, -1, 1]
    real = torch.arange(p0.shape[2]) < n_rows[:, None]  # [B, N]: rows of real suffix tokens
    m0, m1 = document_masses(p0, batch.spans), document_masses(p1, batch.spans)  # [B, H, N, k]
    want = torch.softmax(scores / tau, -1)[:, None, :].expand(3, int(real.sum(1).max()), 3)
    for h in selected:
        got = m1[:, h] / m0[:, h].sum(-1, keepdim=True)        # share of the unbiased document mass
        assert (got - want[:, :got.shape[1]])[real].abs().max() <= 1e-5
        assert (m1[:, h].sum(-1) - m0[:, h].sum(-1))[real].abs().max() <= 1e-5  # the total is kept
        for b in range(3):  # inside a document, its own distribution over its tokens
            for i, (start, end) in enumerate(batch.spans[b].tolist()):
                inside = lambda p, m: p[b, h, :n_rows[b], start:end] / m[b, h, :n_rows[b], i, None]
                assert (inside(p1, m1) - inside(p0, m0)).abs().max() <= 1e-5
        outside = ~dream.document_columns(batch.spans, p0.shape[-1]).any(1)  # [B, S]: other columns keep theirs
        assert ((p1[:, h] - p0[:, h]) * outside[:, None]).abs()[real].max() <= 1e-6
    others = [h for h in range(4) if h not in selected]
    if hide:  # the other heads see no document, and spread their mass over the rest
        assert m1[:, others][real[:, None].expand(3, len(others), -1)].abs().max() == 0
        assert (p1[:, others] > 0).any()
    else:
        assert torch.allclose(p1[:, others], p0[:, others], atol=1e-6)  # unselected heads untouched
    assert torch.allclose(p1.sum(-1), torch.ones(p1.shape[:-1]), atol=1e-5)  # rows sum to 1


def test_set_at_equal_scores_gives_every_document_the_same_share():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    p = dream.biased_forward(lm, batch, torch.zeros(3, 3), heads="0-1", reading="set",
                             output_attentions=True).attentions[0]
    m = document_masses(p, batch.spans)[:, 1]  # [B, N, k]
    assert torch.allclose(m, m.mean(-1, keepdim=True).expand_as(m), atol=1e-6)
    plain = dream.biased_forward(lm, batch, torch.zeros(3, 3), heads="0-1", output_attentions=True).attentions[0]
    assert not torch.allclose(document_masses(plain, batch.spans)[:, 1], m, atol=1e-3)  # not the LM itself


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hidden_documents_reach_the_output_through_the_selected_heads_alone(kind):
    lm = dream.prepare_lm(tiny_lm(kind))
    batch = dream.pack(TOK, *toy_batch())
    scores = SCORES
    docs = dream.document_columns(batch.spans, int(batch.spans[:, -1, 1].max())).any(1)  # [B, P]

    def logits(hide, noisy_layer):
        prefix = dream.encode_prefix(lm, batch)
        layer = prefix.layers[noisy_layer]  # change what the documents' tokens carry in one layer
        layer.values += 10 * torch.randn_like(layer.values) * docs[:, None, :, None]
        return dream.biased_forward(lm, batch, scores, heads="0-1", hide_documents=hide, prefix=prefix).logits

    # layer 1 has no selected head: with the documents hidden nothing there reads them
    assert (logits(True, 1) - logits(True, 1)).abs().max() <= 1e-5
    assert (logits(False, 1) - logits(False, 1)).abs().max() > 1e-3  # the same noise shows when they are seen
    assert (logits(True, 0) - logits(True, 0)).abs().max() > 1e-3  # layer 0's selected head still reads them


# -----------------------------------------------------------------------------
# gradients: none into the LM, all of it into the retriever, none below the first biased layer


@pytest.mark.parametrize("reading", READINGS)
def test_gradients_reach_the_retriever_and_not_the_lm(tmp_path, reading):
    lm = dream.prepare_lm(tiny_lm("llama"))
    retriever = WORLD.fresh_retriever(tmp_path)
    queries, docs, targets = toy_batch()
    loss = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), dream.score(retriever, queries, docs),
                            heads="1-2,0-1", **reading)
    loss.backward()
    assert all(p.grad is None for p in lm.parameters())
    for name, p in retriever.named_parameters():
        if ".pooler." in name:  # BERT's pooler is not used by mean pooling
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def loss_of_scores(kind, **kwargs):
    lm = dream.prepare_lm(tiny_lm(kind, dtype=torch.float64))
    batch = dream.pack(TOK, *toy_batch())
    scores = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), device="cpu")
    scores = scores.to(torch.get_default_device())
    f = lambda s: dream.dream_loss(lm, batch, s, temperature=0.5, **kwargs)
    (grad,) = torch.autograd.grad(f(scores.requires_grad_(True)), scores)
    assert grad.abs().max() > 1e-2  # the checks below are not vacuous
    return f, scores, grad


@pytest.mark.parametrize("reading", READINGS)
def test_gradcheck_loss_wrt_scores(reading):
    f, scores, _ = loss_of_scores("gpt2", **reading)
    assert torch.autograd.gradcheck(f, (scores,), eps=1e-6, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("reading", READINGS)
def test_finite_differences_loss_wrt_scores_rope_gqa(reading):
    """Llama's RMSNorm computes in fp32 even in a float64 model, which makes gradcheck's 1e-6 steps
    noise; central differences with a larger step check the RoPE + GQA path instead."""
    f, scores, grad = loss_of_scores("llama", heads="1-2,0-1", **reading)
    eps = 1e-2
    for i in range(3):
        for j in range(3):
            step = torch.zeros_like(scores)
            step[i, j] = eps
            numeric = (f(scores + step) - f(scores - step)) / (2 * eps)
            assert abs(numeric.item() - grad[i, j].item()) <= 1e-3 * grad.abs().max().item()


def test_no_grad_below_the_first_biased_layer_and_lm_head_only_at_targets():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, out, n=n: seen.append((n, out[0].requires_grad if
                                         isinstance(out, tuple) else out.requires_grad)))
             for n, layer in enumerate(lm.model.layers)]
    head_rows = []
    hooks.append(lm.lm_head.register_forward_hook(lambda m, i, out: head_rows.append(i[0].shape[-2])))
    scores = torch.zeros(3, 3, requires_grad=True)
    dream.dream_loss(lm, batch, scores, heads="1:").backward()
    for hook in hooks:
        hook.remove()
    # the document prefix, then the suffix: only layer 1 of the suffix pass is in the graph
    assert seen == [(0, False), (1, False), (0, False), (1, True)]
    n_targets = int((batch.labels != -100).sum())
    assert head_rows[-1] == n_targets  # the LM head sees the target-predicting positions only
    assert scores.grad is not None and scores.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# padding: a padded batch gives each example's loss alone


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_batch_gives_per_example_loss(kind):
    lm = dream.prepare_lm(tiny_lm(kind))
    queries, docs, targets = toy_batch()
    scores = SCORES
    together = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), scores, reduction="none")
    for b in range(3):
        alone = dream.dream_loss(lm, dream.pack(TOK, queries[b:b + 1], docs[b:b + 1], targets[b:b + 1]),
                                 scores[b:b + 1], reduction="none")
        assert abs(together[b].item() - alone.item()) <= 1e-5
    assert math.isclose(together.mean().item(),
                        dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), scores).item(),
                        rel_tol=1e-6)


# -----------------------------------------------------------------------------
# packing: the layout, spans, truncation and labels; pre-tokenized documents; the token every
# sequence starts on, from tokenizers with a BOS, without one, and with nothing to start with


def test_pack_layout_spans_truncation_and_labels():
    queries, docs, targets = toy_batch()
    batch = dream.pack(TOK, queries, docs, targets, max_doc_tokens=2)
    ids = batch.input_ids[1].tolist()
    word = TOK.convert_tokens_to_ids
    # example 1: [PAD] [k4] [k5 v5] [k6 v6] Question : q2 q3 q4 Answer : [v2 v3] (no BOS or EOS: PAD starts it)
    assert batch.spans[1].tolist() == [[1, 2], [2, 4], [4, 6]]
    assert ids[:6] == word(["[PAD]", "k4", "k5", "v5", "k6", "v6"])
    # example 0: "k2 v2 v3 v4" is cut to its first two tokens
    assert batch.spans[0].tolist() == [[1, 3], [3, 5], [5, 6]]
    labels = batch.labels[1]
    assert labels[labels != -100].tolist() == word(["v2", "v3"])
    assert ids[(labels != -100).nonzero()[0].item() - 2] == word("Answer")
    # right padding: the shorter examples end in pad tokens that are masked out
    assert batch.attention_mask.sum(1).tolist() == [len(row) - (row[1:] == 0).sum().item()  # the start is PAD too
                                                    for row in batch.input_ids]
    assert batch.attention_mask[0, -1] == 0


def test_pack_takes_pre_tokenized_documents():
    queries, docs, targets = toy_batch()
    ids = [[TOK(d, add_special_tokens=False)["input_ids"] for d in ds] for ds in docs]
    a, b = dream.pack(TOK, queries, docs, targets, max_doc_tokens=2), dream.pack(TOK, queries, ids, targets, max_doc_tokens=2)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "attention_mask", "labels", "spans"))


def test_pack_starts_with_an_unbiased_bos_token():
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, pad_token="[PAD]",
                                  unk_token="[UNK]", bos_token="Question")  # adds nothing itself
    batch = dream.pack(tok, *toy_batch())
    assert (batch.input_ids[:, 0] == tok.bos_token_id).all()
    assert (batch.spans[:, 0, 0] == 1).all()  # document 1 starts after it, outside every span


def trained_tokenizer(kind):
    """A small BPE tokenizer trained here: "qwen2" byte-level, no BOS, tok("") == [] (Qwen2's
    layout); "sentencepiece" puts a space before every text's first word and adds <s> (Llama-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    text = ["Paris is the capital of France.\n\nQuestion: what is the capital?\nAnswer: Paris",
            "The cat sat on the mat.\n\nBerlin is in Germany.\n\nQuestion: where is Berlin?\nAnswer: Germany"] * 20
    if kind == "qwen2":
        t = Tokenizer(models.BPE())
        t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["qwen2", "sentencepiece"])
def test_pack_layout_with_a_no_bos_and_a_prefix_space_tokenizer(kind):
    tok = trained_tokenizer(kind)
    docs = [["Paris is the capital of France.", "The cat sat on the mat."]]
    batch = dream.pack(tok, ["what is the capital?"], docs, ["Paris"])
    ids = batch.input_ids[0].tolist()
    start = tok.eos_token_id if kind == "qwen2" else tok.bos_token_id  # Qwen2: no BOS, so its EOS
    assert (tok("")["input_ids"] == []) == (kind == "qwen2")
    assert ids[0] == start and batch.spans[0].tolist()[0][0] == 1  # document 1 is not on the sink
    # after the start, the pieces read exactly as one text: no space token between them
    want = "Paris is the capital of France.\n\nThe cat sat on the mat.\n\nQuestion: what is the capital?\nAnswer: Paris"
    assert tok.decode(ids[1:]) == want
    (s1, e1), (s2, e2) = batch.spans[0].tolist()
    assert tok.decode(ids[s1:e1]) == docs[0][0] + "\n\n" and tok.decode(ids[s2:e2]) == docs[0][1] + "\n\n"
    target = ids[(batch.labels[0] != -100).nonzero()[0].item():]
    assert tok.decode(target).strip() == "Paris"
    if kind == "sentencepiece":  # the text alone gets the spurious space; pack's pieces do not
        assert tok.convert_ids_to_tokens(tok("\n\n", add_special_tokens=False)["input_ids"])[0] == "\u2581"
        assert "\u2581" not in tok.convert_ids_to_tokens(ids[e1 - 2:e1])


def test_pack_refuses_a_tokenizer_with_nothing_to_start_with():
    tok = trained_tokenizer("qwen2")
    tok.eos_token = tok.pad_token = None
    with pytest.raises(ValueError, match="no BOS, EOS or PAD token.*set tok.bos_token"):
        dream.pack(tok, ["q"], [["Paris", "cat"]], ["Paris"])


# -----------------------------------------------------------------------------
# speed paths give the reference's numbers: SDPA with the bias as a float mask, gradient
# checkpointing, bf16 autocast (the bias still reaches the kernel in fp32), a prefix computed once


def loss_and_grad(lm, batch, heads, **kwargs):
    scores = SCORES.clone().requires_grad_()
    loss = dream.dream_loss(lm, batch, scores, heads=heads, temperature=0.3, **kwargs)
    loss.backward()
    return loss.item(), scores.grad


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("heads", ["all", "1-2,0-1"])
@pytest.mark.parametrize("hide", [False, True])
def test_sdpa_float_mask_path_equals_the_hand_written_reference(kind, heads, hide):
    lm = dream.prepare_lm(tiny_lm(kind))
    batch = dream.pack(TOK, *toy_batch())  # padded
    fast, grad_fast = loss_and_grad(lm, batch, heads, reference=False, hide_documents=hide)
    ref, grad_ref = loss_and_grad(lm, batch, heads, reference=True, hide_documents=hide)
    assert grad_ref.abs().max() > 1e-3  # the comparison below is not vacuous
    assert abs(fast - ref) <= 1e-5 and (grad_fast - grad_ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradient_checkpointing_replays_the_suffix_and_changes_nothing(kind):
    batch = dream.pack(TOK, *toy_batch())
    results = []
    for checkpointing in (False, True):
        lm = dream.prepare_lm(tiny_lm(kind), gradient_checkpointing=checkpointing)
        first_op = lm.transformer.h[-1].ln_1 if kind == "gpt2" else lm.model.layers[-1].input_layernorm
        calls = []  # a pre-hook: a replay may stop early, once it has what the backward needs
        hook = first_op.register_forward_pre_hook(lambda *_: calls.append(1))
        results.append((*loss_and_grad(lm, batch, "all"), len(calls)))
        hook.remove()
    (plain, grad_plain, calls_plain), (ckpt, grad_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (2, 3)  # prefix, suffix, and the suffix again in backward
    assert abs(plain - ckpt) <= 1e-6 and (grad_plain - grad_ckpt).abs().max() <= 1e-6


@pytest.mark.parametrize("reference", [False, True])  # the SDPA kernel, and by hand
def test_bf16_autocast_stays_close_to_fp32(reference):
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    loss, grad = loss_and_grad(lm, batch, "all", reference=reference)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the device the tests run on (gpu_check: cuda)
        loss_bf16, grad_bf16 = loss_and_grad(lm, batch, "all", reference=reference)
    assert loss_bf16 != loss  # autocast did run in bf16
    assert abs(loss_bf16 - loss) <= 2e-2 * abs(loss)
    assert torch.cosine_similarity(grad.flatten(), grad_bf16.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_bias_reaches_the_kernel_in_fp32_from_a_bf16_lm(kind, monkeypatch):
    lm = dream.prepare_lm(tiny_lm(kind, dtype=torch.bfloat16))
    batch = dream.pack(TOK, *toy_batch())
    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, attn_mask=None, **kw:
                        seen.append((q.dtype, attn_mask.dtype)) or real(q, k, v, attn_mask=attn_mask, **kw))
    scores = SCORES.clone().requires_grad_()
    fast = dream.dream_loss(lm, batch, scores, heads="1:", temperature=0.3)
    assert (torch.float32, torch.float32) in seen  # the biased layer: fp32 logits, an fp32 bias
    ref = dream.dream_loss(lm, batch, scores, heads="1:", temperature=0.3, reference=True)
    assert abs(fast.item() - ref.item()) <= 1e-3 * abs(ref.item())


def test_prefix_store_gives_the_loss_and_gradient_of_a_fresh_prefix():
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    store = objectives.PrefixStore()
    full = dream.pack(TOK, queries, docs, targets)
    store(lm, full, [tuple(d) for d in docs], max_gb=1)  # every example stored
    pair = dream.pack(TOK, queries[1:], docs[1:], targets[1:])  # reassembled in another batch
    for batch, keys in ((full, docs), (pair, docs[1:])):
        s = torch.randn(len(keys), 3, requires_grad=True)
        cached = dream.dream_loss(lm, batch, s, prefix=store(lm, batch, [tuple(d) for d in keys], max_gb=1))
        g_cached, = torch.autograd.grad(cached, s)
        fresh = dream.dream_loss(lm, batch, s)
        g_fresh, = torch.autograd.grad(fresh, s)
        assert abs(cached.item() - fresh.item()) <= 1e-6
        torch.testing.assert_close(g_cached, g_fresh, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix holds"):
        dream.dream_loss(lm, pair, torch.zeros(2, 3), prefix=dream.encode_prefix(lm, full))


# -----------------------------------------------------------------------------
# finding retrieval heads (QRHead): calibrated attention mass, leave-one-out usefulness


def test_rank_heads_scores_by_calibrated_mass(monkeypatch):
    """Three fake heads over k = 3 documents, the useful one at 0, 1, 2. Head 0 pays the last
    document most for its position and the useful one a little more for the query; head 1 has the
    position bias alone; head 2 looks at the useful document only through the query."""
    position = torch.tensor([0.1, 0.2, 0.6])
    useful = [0, 1, 2]
    bump = 0.05 * F.one_hot(torch.tensor(useful), 3)                       # [n, k]
    def fake_attention(lm, batch):
        is_null = (batch.input_ids == TOK.convert_tokens_to_ids("[UNK]")).any(1)  # "N/A" is unknown
        real = (~is_null).float()[:, None] * bump
        heads = [position + real, position.expand(3, 3), real]
        return torch.stack(heads)[None]                                    # [L=1, H=3, n, k]
    monkeypatch.setattr(heads, "document_attention", fake_attention)
    queries, docs, targets = toy_batch()
    scores = heads.rank_heads(dream.prepare_lm(tiny_lm("llama")), TOK, queries, docs, targets, useful, batch_size=3)
    assert torch.allclose(scores, torch.tensor([[1.0, (1 / 2 + 1 / 2 + 1 / 2) / 3, 1.0]]))
    assert heads.top_heads(scores, 2) in ("0-0,0-2", "0-2,0-0")


def test_leave_one_out_finds_the_document_the_lm_reads(copying_lm):
    queries, docs, targets, gold = WORLD.examples(48)  # the target is the gold document's value
    useful = heads.leave_one_out(copying_lm, TOK, queries, docs, targets, batch_size=16)
    assert (torch.tensor(useful) == gold).float().mean() >= 0.9


def test_document_attention_sums_the_query_rows_attention_per_document():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    mass = heads.document_attention(lm, batch)                              # [L, H, B, k]
    att = dream.biased_forward(lm, batch, torch.zeros(3, 3), output_attentions=True).attentions
    b, layer, head = 1, 1, 3
    docs_end = int(batch.spans[b, -1, 1])
    n_query = int((batch.labels[b] != -100).int().argmax()) - docs_end
    want = [att[layer][b, head, :n_query, s:e].sum(-1).mean() for s, e in batch.spans[b].tolist()]
    assert torch.allclose(mass[layer, head, b], torch.stack(want), atol=1e-6)
    assert (mass.sum(-1) <= 1 + 1e-6).all() and (mass > 0).all()


# -----------------------------------------------------------------------------
# loading the frozen LM, and bad input


def test_load_frozen_lm_from_a_local_folder(tmp_path):
    tiny_lm("llama").save_pretrained(tmp_path)
    tok = TOK.__class__(tokenizer_object=TOK.backend_tokenizer, unk_token="[UNK]")  # no pad token
    tok.save_pretrained(tmp_path)
    lm, tok = dream.load_frozen_lm(str(tmp_path))
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert lm.config._attn_implementation == "dream"
    # no pad token: padding is masked out, so load_frozen_lm sets any token there is: the EOS, else the
    # UNK (here: this tokenizer has no EOS), else token 0
    assert (tok.pad_token, tok.pad_token_id) == ("[UNK]", TOK.convert_tokens_to_ids("[UNK]"))
    for name, special, want in (("eos", dict(unk_token="[UNK]", eos_token="Answer"), "Answer"), ("none", {}, "[PAD]")):
        tiny_lm("llama").save_pretrained(tmp_path / name)
        TOK.__class__(tokenizer_object=TOK.backend_tokenizer, **special).save_pretrained(tmp_path / name)
        tok = dream.load_frozen_lm(str(tmp_path / name))[1]
        assert (tok.pad_token, tok.pad_token_id) == (want, TOK.convert_tokens_to_ids(want)), name


def test_bad_heads():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    with pytest.raises(ValueError, match=r"head \(2, 0\) does not exist: the model has 2 layers of 4"):
        dream.dream_loss(lm, batch, torch.zeros(3, 3), heads=[(2, 0)])
    with pytest.raises(ValueError, match=r"head \(0, 4\) does not exist"):
        dream.resolve_heads(lm, "0-4")
    with pytest.raises(ValueError, match="layer-head"):
        dream.resolve_heads(lm, "0_1")
    with pytest.raises(ValueError, match="selects no head"):
        dream.resolve_heads(lm, "5:9")
    assert sorted(dream.resolve_heads(lm, "-1:")) == [1]
    assert dream.resolve_heads(lm, "1-3,0-0")[1].tolist() == [0, 0, 0, 1]


def test_bad_pack_inputs():
    queries, docs, targets = toy_batch()
    with pytest.raises(ValueError, match="document 1 of example 2 has no tokens"):
        dream.pack(TOK, queries, [docs[0], docs[1], ["k1", "", "k2"]], targets)
    with pytest.raises(ValueError, match="max_doc_tokens=0"):
        dream.pack(TOK, queries, docs, targets, max_doc_tokens=0)
    one_doc = dream.pack(TOK, queries, [d[:1] for d in docs], targets)
    with pytest.raises(ValueError, match="k = 1 .*constant"):
        dream.dream_loss(dream.prepare_lm(tiny_lm("llama")), one_doc, torch.zeros(3, 1, requires_grad=True))
    with pytest.raises(ValueError, match="no documents"):
        dream.pack(TOK, queries, [[], [], []], targets)
    with pytest.raises(ValueError, match="target of example 1 .* tokenizes to nothing"):
        dream.pack(TOK, queries, docs, ["v1", "", "v2"])
    with pytest.raises(ValueError, match="example 1 has 2 documents"):
        dream.pack(TOK, queries, [docs[0], docs[1][:2], docs[2]], targets)
    with pytest.raises(ValueError, match="equally many"):
        dream.pack(TOK, queries[:2], docs, targets)


def test_bad_scores_shape():
    lm = dream.prepare_lm(tiny_lm("gpt2"))
    batch = dream.pack(TOK, *toy_batch())
    with pytest.raises(ValueError, match=r"scores has shape \(3, 2\).* must be \[3, 3\]"):
        dream.dream_loss(lm, batch, torch.zeros(3, 2))


def test_not_a_causal_lm():
    config = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    for model in (BertModel(config), BertLMHeadModel(config)):  # an encoder; a non-causal LM head
        with pytest.raises(ValueError, match="is not a causal LM"):
            dream.prepare_lm(model)
    with pytest.raises(ValueError, match="no score-biased attention"):  # forgot prepare_lm
        dream.dream_loss(tiny_lm("gpt2"), dream.pack(TOK, *toy_batch()), torch.zeros(3, 3))


def test_attention_softcapping_is_refused():
    lm = dream.prepare_lm(tiny_lm("llama"))
    q = k = v = torch.randn(1, 4, 3, 8)
    bias = dream.ScoreBias(torch.zeros(1, 2), torch.zeros(1, 2, 3, dtype=torch.bool), {0: torch.ones(4)})
    with pytest.raises(NotImplementedError, match="softcapping"):
        dream.dream_attention(lm.model.layers[0].self_attn, q, k, v, None, score_bias=bias, softcap=30.0)


def test_the_method_imports_and_trains_without_sentence_transformers():
    code = """import sys; sys.modules['sentence_transformers'] = None
import torch, dream
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
words = ['[PAD]', '[UNK]', 'Question', ':', 'Answer', 'q', 'a', 'b', 'c', 'y']
backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]', unk_token='[UNK]')
lm = dream.prepare_lm(LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)))
s = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
dream.dream_loss(lm, dream.pack(tok, ['q'], [['a', 'b', 'c']], ['y']), s, reading='set').backward()
assert s.grad.abs().sum() > 0
print('ok')"""
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
