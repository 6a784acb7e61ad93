"""What the test files share: the device, the toy world and its tokenizer, tiny models and the folders
they are saved to, tiny data (BEIR folders, a --corpus collection), and a copying LM.

Plain helpers are imported by the test files (`from conftest import tiny_lm, ...`); fixtures are found
by pytest. conftest.py sits at the repository root, next to the test files."""
import dataclasses
import gzip
import json
import os

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaModel, PreTrainedTokenizerFast)

from data import ToyWorld
import objectives
import train

# gpu_check.py runs the method's tests on a GPU: DREAM_TEST_DEVICE=cuda builds every model and tensor there
DEVICE = os.environ.get("DREAM_TEST_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)
WORLD = ToyWorld(n_keys=8, n_values=8, k=3)
TOK = WORLD.tokenizer
V = len(TOK)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Each test its own cache of start-encoder evaluations (train.py keeps them under ~/.cache/dream):
    a test never reuses what another run left there. Child processes inherit it through $DREAM_CACHE.
    And none of the frozen LM's values that objectives.py keeps in memory."""
    folder = str(tmp_path_factory.mktemp("cache"))
    monkeypatch.setattr(train, "CACHE", folder)
    monkeypatch.setenv("DREAM_CACHE", folder)
    # the frozen LM's per-question values are kept by question and candidates: tests reuse both
    for cache in (objectives.LOOPS, objectives.TOKEN_NLLS, objectives.PREFIXES.items):
        cache.clear()
    objectives.PREFIXES.bytes = 0


# -----------------------------------------------------------------------------
# tiny models and toy examples


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


def toy_questions(queries, docs, targets):
    """train.py's view of toy_batch() (or any examples of k documents): questions with candidate
    indices, and each passage's token ids."""
    k = len(docs[0])
    questions = [{"query": q, "target": y, "candidates": [k * b + i for i in range(k)], "gold": None}
                 for b, (q, y) in enumerate(zip(queries, targets))]
    doc_ids = {k * b + i: TOK(d, add_special_tokens=False)["input_ids"] for b, ds in enumerate(docs)
               for i, d in enumerate(ds)}
    return questions, doc_ids


def target_logits_plain(lm, batch):
    """The unmodified model's logits at the positions that predict a target token."""
    logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    predicts = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts[:, :-1] = batch.labels[:, 1:] != -100
    return logits[predicts]


@pytest.fixture(scope="session")
def copying_lm():
    """A tiny Llama taught to copy a value from its context, trained once for every test that asks.
    Its own world: the shared WORLD's random state depends on which tests ran before."""
    return ToyWorld(n_keys=8, n_values=8, k=3, seed=0).copying_lm(steps=300)


# -----------------------------------------------------------------------------
# retrievers: a tiny encoder (or decoder) saved as a model folder, and what SentenceTransformer.encode gives


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


# -----------------------------------------------------------------------------
# train.py's inputs: model folders, a tiny training set, its Config


def save_model_folders(tmp_path):
    """A tiny frozen Llama with the toy tokenizer in tmp_path/lm, a fresh tiny BERT retriever in
    tmp_path/enc: (lm folder, encoder folder)."""
    lm_dir, enc_dir = tmp_path / "lm", tmp_path / "enc"
    tiny_lm("llama").save_pretrained(lm_dir)
    TOK.save_pretrained(lm_dir)
    WORLD.fresh_retriever(enc_dir)
    return lm_dir, enc_dir


@pytest.fixture
def model_folders(tmp_path):
    """save_model_folders(tmp_path): the LM and retriever folders train.py and compare.py load."""
    return save_model_folders(tmp_path)


def tiny_training_setup(tmp_path):
    from train import Config
    lm_dir, enc_dir = save_model_folders(tmp_path)
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


# -----------------------------------------------------------------------------
# BEIR folders, and a --corpus collection without labels


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
