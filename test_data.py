"""data.py: SQuAD paragraphs cut into passages that keep every answer inside; --corpus alone (no
labels) makes training examples whose candidates never hold a piece of their own document, and
--corpus-siblings one sibling passage; corpus errors name the file and the fix; beir_sets adds a
folder's dev queries and never halves its test queries.
"""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import compare
import data
import eval as beir_eval
import objectives
from conftest import CORPUS, QRELS, QUERIES, TOK, TOPICS, corpus_config, toy_collection, write_beir


# -----------------------------------------------------------------------------
# SQuAD passages: every answer inside one


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


# -----------------------------------------------------------------------------
# no labels at all: --corpus alone makes its training examples from the text


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
    one_hot = lambda texts: F.one_hot(torch.tensor([place[t] for t in texts]), width).float()
    embed = lambda queries, docs: (one_hot(queries), one_hot(docs))  # the Scorer's (queries, documents) call
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


# -----------------------------------------------------------------------------
# the BEIR sets evaluated: dev queries where a folder has them


def test_beir_sets_with_dev_add_a_folders_dev_queries_and_never_halve_its_test_queries(tmp_path):
    from train import Config
    with_train = write_beir(tmp_path / "a", CORPUS, QUERIES, [("q2", "d2", 1)], split="train")
    write_beir(tmp_path / "a", CORPUS, QUERIES, QRELS)
    test_only = write_beir(tmp_path / "b", CORPUS, QUERIES, QRELS)
    cfg = Config(eval_data=f"{with_train},{test_only}")
    assert data.beir_sets(cfg, print) == [("a", with_train, "test", None), ("b", test_only, "test", None)]
    assert data.beir_sets(cfg, print, dev=True) == [("a dev", with_train, "train", None), ("a", with_train, "test", None),
                                                    ("b", test_only, "test", None)]  # b: nothing to choose on
