"""eval.py: the metrics equal pytrec_eval's (ties included), per query and paired bootstrap
intervals; BEIR folders load (plain, gzipped, downloaded once) or fail naming the file; dense and
BM25 search are exact; the command line writes its table, JSON and runs, and searches with
encode_query and encode_document (a model's prompts, or --query-prompt's); torchrun gives the
scores of one process.
"""
import io
import json
import math
import os
import random
import sys
import zipfile
import zlib

import pytest
import torch

import eval as beir_eval
from conftest import CORPUS, QRELS, QUERIES, tiny_encoder_folder, write_beir


# -----------------------------------------------------------------------------
# metrics against pytrec_eval, per query, paired bootstrap intervals


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


# -----------------------------------------------------------------------------
# BEIR loading: plain and gzipped folders, errors that name the file, a bare name downloaded once


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


# -----------------------------------------------------------------------------
# dense and BM25 search


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


# -----------------------------------------------------------------------------
# the command line


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


def test_command_line_several_splits_share_one_search_and_keep_per_query_values(tmp_path, monkeypatch):
    """--split train,test: each split's metrics and run are those of its own eval.py call, from one
    search of the corpus; --per-query keeps each query's values, whose means are the metrics."""
    encoder = toy_bert_folder(tmp_path / "encoder")
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)
    write_beir(tmp_path / "toyset", CORPUS, QUERIES, [("q3", "d3", 1), ("q1", "d2", 1)], split="train")
    searches, search = [], beir_eval.dense_search
    monkeypatch.setattr(beir_eval, "dense_search", lambda r, c, q, **kw: searches.append(sorted(q)) or search(r, c, q, **kw))

    def run(split, *flags):
        out = tmp_path / f"{split}.json"
        monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--bm25", "--split", split,
                                          "--out", str(out), "--save-run", str(tmp_path / f"{split}.tsv"), *flags])
        beir_eval.main()
        return json.loads(out.read_text())
    both = run("train,test", "--per-query")
    assert searches == [["q1", "q2", "q3"]]  # one search, every split's queries
    assert set(both) == {"toyset/train", "toyset/test", "toyset/train/bm25", "toyset/test/bm25"}
    for split in ("train", "test"):
        alone = run(split)
        for system in ("", "/bm25"):
            means, values = both[f"toyset/{split}{system}"]
            assert means == pytest.approx(alone[f"toyset{system}"], abs=1e-6)
            assert set(values["ndcg@10"]) == ({"q1", "q3"} if split == "train" else {"q1", "q2"})
            assert means["ndcg@10"] == pytest.approx(sum(values["ndcg@10"].values()) / 2)
            kept = (tmp_path / f"train,test.toyset.{split}{system.replace('/', '.')}.tsv").read_text().split("\n")
            assert {line.split()[0] for line in kept if line} == set(values["ndcg@10"])
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--split", ","])
    with pytest.raises(SystemExit) as stopped:  # no split named: a clear error, not a crash
        beir_eval.main()
    assert stopped.value.code == 2


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
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    beir_eval.main()
    assert seen == {"length": 2, "bf16": True, "dtype": torch.bfloat16, "cut": 2}
    assert "--dtype bf16 on a CPU without AVX-512 (AVX2): bf16 is emulated" in capsys.readouterr().err
    assert set(json.loads(out.read_text())["toyset"]) == set(beir_eval.METRICS)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data])
    beir_eval.main()  # the defaults: the encoder's own length, fp32, no warning
    assert seen["bf16"] is False and seen["cut"] == 6 and "warning" not in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["eval.py", "--encoder", encoder, "--data", data, "--max-seq-length", "0"])
    with pytest.raises(SystemExit) as stopped:
        beir_eval.main()
    assert stopped.value.code == 2 and "--max-seq-length 0: give a positive number" in capsys.readouterr().err


def test_command_line_searches_with_encode_query_and_encode_document(tmp_path, monkeypatch):
    """A model with prompts: eval.py's run is the search done by hand with its encode_query and
    encode_document; --query-prompt and --document-prompt give a model without them the same run."""
    model = beir_eval.load_retriever(toy_bert_folder(tmp_path / "plain"))
    model.prompts.update({"query": "why ", "document": "water "})
    model.save(str(tmp_path / "prompted"))
    data = write_beir(tmp_path / "toyset", CORPUS, QUERIES, QRELS)

    def run_of(*flags):
        monkeypatch.setattr(sys, "argv", ["eval.py", "--data", data, "--save-run", str(tmp_path / "run.tsv"), *flags])
        beir_eval.main()
        rows = [line.split() for line in (tmp_path / "run.tsv").read_text().splitlines()]
        return {(row[0], row[2]): float(row[4]) for row in rows}
    q = model.encode_query([x["text"] for x in QUERIES], convert_to_tensor=True, normalize_embeddings=True)
    d = model.encode_document([(x["title"] + " " + x["text"]).strip() for x in CORPUS], convert_to_tensor=True,
                              normalize_embeddings=True)
    judged = {qid for qid, _, _ in QRELS}  # eval.py searches for the judged queries only
    by_hand = {(x["_id"], y["_id"]): (q[i] @ d[j]).item() for i, x in enumerate(QUERIES) if x["_id"] in judged
               for j, y in enumerate(CORPUS)}
    prompted = run_of("--encoder", str(tmp_path / "prompted"))
    assert prompted.keys() == by_hand.keys() and all(abs(prompted[k] - by_hand[k]) <= 1e-5 for k in by_hand)
    flags = run_of("--encoder", str(tmp_path / "plain"), "--query-prompt", "why ", "--document-prompt", "water ")
    assert all(abs(flags[k] - by_hand[k]) <= 1e-5 for k in by_hand)
    plain = run_of("--encoder", str(tmp_path / "plain"))
    assert max(abs(plain[k] - by_hand[k]) for k in by_hand) > 1e-3  # the prompts were read


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


# -----------------------------------------------------------------------------
# torchrun: two processes (gloo, CPU) give the scores of one


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
