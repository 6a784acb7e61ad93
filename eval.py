"""
Evaluate a retriever on BEIR datasets: exact dense search, optional BM25, BEIR's metrics.

    python eval.py --encoder NAME_OR_DIR --data DIR_OR_NAME [--data ...] [--split test]
                   [--out results.json] [--save-run run.tsv] [--bm25] [--batch-size 64]
                   [--max-seq-length 256] [--dtype bf16] [--query-prompt "query: "] [--document-prompt ...]
    python eval.py --bm25 --data DIR_OR_NAME [--data ...]      (BM25 alone, no encoder)
    torchrun --standalone --nproc_per_node=2 eval.py --encoder ... --data ...

Under torchrun each process encodes one slice of the corpus (and of the queries) and they share
the embeddings: the scores are one process's (up to rounding); only rank 0 prints and writes files.

--encoder  a hub name or a local folder (a sentence-transformers model, e.g. train.py's out_dir/encoder). Give
           --encoder, --bm25 or both. Queries are encoded by its encode_query, documents by its
           encode_document: its own prompts and, for a Router model, its query and document routes.
--query-prompt, --document-prompt  set the encoder's prompts (e.g. "query: ", "passage: ") where it
           does not carry the ones its card asks for.
--data     a folder in BEIR layout (below), or a bare BEIR name such as scifact or nfcorpus,
           downloaded once from the official BEIR release into ~/.cache/dream/beir/<name>
           (offline, with HF_HUB_OFFLINE=1, pass the folder instead).
--bm25     also run BM25 (bm25s: Lucene scoring, k1=1.5, b=0.75, English stopwords, no stemming,
           which gives BEIR's numbers: SciFact 0.662, BEIR paper 0.665), beside the encoder
           or, without --encoder, alone.
--out      JSON {dataset: {"ndcg@10", "recall@100", "mrr@10", "map@100"}} for the encoder;
           with --bm25, BM25's metrics sit beside it (or alone) under the key "<dataset>/bm25".
--max-seq-length  the encoder reads at most this many of its tokens of a text (default: the
           encoder's own setting: 256 word pieces for all-MiniLM-L6-v2, but the whole context, 8,192
           tokens, for a decoder retriever built from a plain LM such as train.py --decoder's).
--dtype    fp32 (default) or bf16: encode under bf16 autocast, about 2x faster on CPUs with bf16
           support, the embeddings close to fp32's but not equal (numbers not comparable to fp32's);
           on a CPU without AVX-512 bf16 is emulated and far slower: eval.py warns.
--save-run TREC run file(s) "qid Q0 docid rank score tag". With more than one run to save, the
           result key goes before the extension: run.scifact.tsv, run.scifact.bm25.tsv.

Metrics follow BEIR (pytrec_eval): nDCG@10, Recall@100, MRR@10 and MAP@100, the mean over the
judged queries; a document whose id equals its query's id is dropped; ties in score are ordered
as trec_eval orders them (by document id, descending). Document text is title + " " + text.

From Python (e.g. the trainer):

    from eval import load_beir, dense_search, bm25_search, evaluate, paired_bootstrap, init_distributed
    corpus, queries, qrels = load_beir("../shared/data/scifact")
    print(evaluate(qrels, dense_search(retriever, corpus, queries)))
    bm25_search(list_of_passages, list_of_questions, top_k=20)  # {question i: {passage j: score}}

    # is the encoder better than BM25 beyond chance? per-query nDCG@10, paired bootstrap
    _, ours = evaluate(qrels, dense_search(retriever, corpus, queries), per_query=True)
    _, bm25 = evaluate(qrels, bm25_search(corpus, queries), per_query=True)
    print(paired_bootstrap(ours["ndcg@10"], bm25["ndcg@10"]))  # {"difference", "low", "high", "queries"}
"""
import argparse
import contextlib
import gzip
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.request
import zipfile

import bm25s
import numpy as np
import torch
import torch.distributed as dist

from dream import load_retriever

LAYOUT = """expected BEIR layout:
  <folder>/corpus.jsonl        one {"_id", "title", "text"} a line
  <folder>/queries.jsonl       one {"_id", "text"} a line
  <folder>/qrels/<split>.tsv   query-id, corpus-id, score (tab-separated, one header line)
  (any of them may be gzipped: corpus.jsonl.gz, ...)"""
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{}.zip"
METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100")

# -----------------------------------------------------------------------------
# loading


def find_file(folder, name):
    """folder/name, plain or gzipped."""
    path = os.path.join(folder, name)
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path} (or {path}.gz) not found\n{LAYOUT}")


def read_lines(path):
    """(line number, line) for each non-blank line of a text file, plain or gzipped."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def read_json_lines(path):
    """(line number, object) for each line of a JSON-lines file; a bad line names file and line."""
    for n, line in read_lines(path):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: malformed JSON ({e.msg})") from None


def read_jsonl(path):
    """{_id: object} from a JSON-lines file of BEIR records."""
    rows = {}
    for n, row in read_json_lines(path):
        if not isinstance(row, dict) or "_id" not in row:
            raise ValueError(f"{path}, line {n}: expected a JSON object with an \"_id\"")
        rows[str(row["_id"])] = row
    return rows


def read_qrels(path):
    """{query id: {doc id: relevance}} from a BEIR qrels file."""
    qrels = {}
    for n, line in read_lines(path):
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
            if n == 1:
                continue  # the header line
            raise ValueError(f"{path}, line {n}: expected query-id<TAB>corpus-id<TAB>integer score")
        qrels.setdefault(fields[0].strip(), {})[fields[1].strip()] = int(fields[2])
    return qrels


def download_beir(name):
    """The folder of BEIR dataset `name`, downloaded and unzipped on first use."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dream", "beir")
    folder = os.path.join(cache, name)
    if os.path.isdir(folder):
        return folder
    url = BEIR_URL.format(name)
    hint = f"pass a local copy instead: --data path/to/{name}\n{LAYOUT}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"{name!r} is not a folder, and HF_HUB_OFFLINE is set: "
                                f"not downloading {url}; {hint}")
    print(f"downloading {url}", file=sys.stderr)
    os.makedirs(cache, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, tempfile.TemporaryFile() as zipped, \
                tempfile.TemporaryDirectory(dir=cache) as tmp:
            shutil.copyfileobj(response, zipped)
            with zipfile.ZipFile(zipped) as z:
                z.extractall(tmp)  # the zip holds <name>/...
            os.replace(os.path.join(tmp, name), folder)  # all or nothing in the cache
    except (OSError, zipfile.BadZipFile) as e:  # URLError is an OSError
        raise FileNotFoundError(f"could not download {url} ({e}); {hint}") from None
    return folder


def beir_folder(path_or_name):
    """A local folder: path_or_name itself, or a bare BEIR name, downloaded on first use."""
    if os.path.isdir(path_or_name):
        return path_or_name
    if os.path.exists(path_or_name) or os.path.basename(path_or_name) != path_or_name \
            or path_or_name.startswith("."):
        raise FileNotFoundError(f"{path_or_name}: no such folder\n{LAYOUT}")
    return download_beir(path_or_name)


def load_beir(path_or_name, split="test"):
    """(corpus {doc id: {"title", "text"}}, queries {qid: text}, qrels {qid: {doc id: relevance}})
    of one split: only the queries judged in qrels/<split>.tsv."""
    folder = beir_folder(path_or_name)
    corpus = {i: {"title": row.get("title") or "", "text": row.get("text") or ""}
              for i, row in read_jsonl(find_file(folder, "corpus.jsonl")).items()}
    if not corpus:
        raise ValueError(f"{folder}: the corpus is empty")
    all_queries = {i: row.get("text") or ""
                   for i, row in read_jsonl(find_file(folder, "queries.jsonl")).items()}
    qrels_path = find_file(folder, os.path.join("qrels", f"{split}.tsv"))
    raw = read_qrels(qrels_path)
    # judgments that name an unknown query or document are dropped, with one warning
    qrels = {q: {d: r for d, r in docs.items() if d in corpus} for q, docs in raw.items() if q in all_queries}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    unknown = sum(map(len, raw.values())) - sum(map(len, qrels.values()))
    if unknown:
        print(f"warning: {qrels_path}: {unknown} judgments name a query or document that is not "
              "in the data; skipping them", file=sys.stderr)
    if not qrels:
        raise ValueError(f"{qrels_path}: no judged query of queries.jsonl is left to evaluate")
    return corpus, {q: all_queries[q] for q in qrels}, qrels


# -----------------------------------------------------------------------------
# several processes (torchrun)


def init_distributed():
    """(rank, world size, device); under torchrun, joins the process group (nccl on GPUs, else gloo)."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, "cuda" if cuda else "cpu"
    device = "cpu"
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                               "visible: run one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local_rank)  # before the group forms, so nccl uses this GPU
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def encode(retriever, texts, batch_size=64, progress=False, task=None):
    """[N, d] float32 unit vectors on the CPU, without grad (SentenceTransformer.encode_query for
    task "query", encode_document for "document", where the retriever has them, else encode; its
    train/eval mode is kept). In a process group every rank encodes one contiguous slice, and every
    rank gets all N rows back, in order."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    texts = list(texts)
    method = getattr(retriever, f"encode_{task}", retriever.encode) if task else retriever.encode

    def own(part, progress):
        was_training = retriever.training
        out = method(part, batch_size=batch_size, show_progress_bar=progress, convert_to_tensor=True,
                     normalize_embeddings=True)
        retriever.train(was_training)
        return out.float().cpu()

    if world == 1 or len(texts) < world:  # too few texts to give each rank one
        return own(texts, progress)
    rank = dist.get_rank()
    bounds = [r * len(texts) // world for r in range(world + 1)]  # slices differ by at most one text
    mine = own(texts[bounds[rank]:bounds[rank + 1]], progress and rank == 0)
    # all_gather wants equal shapes: pad every slice to the longest, trim after
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros(longest, mine.shape[1], dtype=mine.dtype, device=device)
    padded[:len(mine)] = mine
    slices = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(slices, padded)
    return torch.cat([s[:b - a] for s, a, b in zip(slices, bounds, bounds[1:])]).cpu()


# -----------------------------------------------------------------------------
# search: both return a run {qid: {doc id: score}}, best first


def ids_and_texts(items):
    """(ids, texts) of {id: text}, {id: {"title", "text"}} or a list of strings (ids: positions)."""
    if not isinstance(items, dict):
        items = dict(enumerate(items))
    to_text = lambda v: (v.get("title", "") + " " + v.get("text", "")).strip() if isinstance(v, dict) else v
    return list(items), [to_text(v) for v in items.values()]


def to_run(qids, doc_ids, scores, indices, top_k, drop_self):
    """A run from [Q, >= top_k] scores and document indices. drop_self: a document named like its
    query is dropped, as BEIR does (which is why searches ask for one spare)."""
    run = {}
    for qid, row_scores, row_indices in zip(qids, scores.tolist(), indices.tolist()):
        hits = [(doc_ids[i], s) for i, s in zip(row_indices, row_scores)
                if not (drop_self and doc_ids[i] == qid)]
        run[qid] = dict(hits[:top_k])
    return run


def top_k_search(q, d, k, query_block=256, doc_block=8192):
    """Exact top-k inner products of queries q [Q, dim] against documents d [N, dim]:
    (scores, indices), both [Q, min(k, N)]. At most query_block x doc_block scores at a time."""
    k = min(k, len(d))
    all_scores, all_indices = [], []
    for i in range(0, len(q), query_block):
        qb = q[i:i + query_block]
        best, best_idx = qb.new_empty(len(qb), 0), torch.empty(len(qb), 0, dtype=torch.long)
        for j in range(0, len(d), doc_block):
            db = d[j:j + doc_block]
            s = torch.cat([best, qb @ db.T], 1)  # the running top-k, then this block's scores
            idx = torch.cat([best_idx, torch.arange(j, j + len(db)).expand(len(qb), -1)], 1)
            best, pos = s.topk(min(k, s.shape[1]), dim=1)
            best_idx = idx.gather(1, pos)
        all_scores.append(best)
        all_indices.append(best_idx)
    return torch.cat(all_scores), torch.cat(all_indices)


def dense_search(retriever, corpus, queries, top_k=100, batch_size=64, progress=True):
    """Exact cosine search with a SentenceTransformer (its encode_query and encode_document; anything
    with an .encode will do).
    corpus: {doc id: {"title", "text"}} or a list of strings; queries: {qid: text} or a list
    (with lists the ids are positions). Given ids, a document named like its query is dropped.
    In a process group (init_distributed) the ranks share the encoding and all return the run."""
    doc_ids, doc_texts = ids_and_texts(corpus)
    qids, query_texts = ids_and_texts(queries)
    d = encode(retriever, doc_texts, batch_size=batch_size, progress=progress, task="document")
    q = encode(retriever, query_texts, batch_size=batch_size, progress=progress, task="query")
    scores, indices = top_k_search(q, d, top_k + 1)
    return to_run(qids, doc_ids, scores, indices, top_k, drop_self=isinstance(queries, dict))


def bm25_search(corpus, queries, top_k=100, stem=False, progress=False):
    """BM25 through bm25s (Lucene variant, k1=1.5, b=0.75, English stopwords).
    corpus: {doc id: {"title", "text"}}, {doc id: text} or a list of passages; queries: {qid: text}
    or a list. With lists the ids are positions: {question i: {passage j: score}}, best first.
    stem=True adds Snowball stemming (needs PyStemmer): higher recall, SciFact nDCG@10 0.686."""
    doc_ids, doc_texts = ids_and_texts(corpus)
    qids, query_texts = ids_and_texts(queries)
    stemmer = None
    if stem:
        import Stemmer  # PyStemmer
        stemmer = Stemmer.Stemmer("english")
    tokenize = lambda texts, **kw: bm25s.tokenize(texts, stopwords="en", stemmer=stemmer,
                                                  show_progress=progress, **kw)
    index = bm25s.BM25()
    index.index(tokenize(doc_texts), show_progress=progress)
    indices, scores = index.retrieve(tokenize(query_texts, return_ids=False),
                                     k=min(top_k + 1, len(doc_ids)), show_progress=progress)
    return to_run(qids, doc_ids, scores, indices, top_k, drop_self=isinstance(queries, dict))


# -----------------------------------------------------------------------------
# metrics, as pytrec_eval computes ndcg_cut.10, recall.100, recip_rank (on the top 10), map_cut.100


def ranked(docs):
    """Doc ids of {doc id: score} in trec_eval's order: score descending, then doc id descending."""
    return sorted(docs, key=lambda d: (docs[d], d), reverse=True)


def query_metrics(judged, docs):
    """{"ndcg@10", "recall@100", "mrr@10", "map@100"} of one query: judged {doc id: relevance},
    docs {doc id: score} (the query's own id already dropped). All 0 when nothing is relevant."""
    gains = [max(judged.get(d, 0), 0) for d in ranked(docs)]  # relevance at each rank
    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)
    if not ideal:
        return dict.fromkeys(METRICS, 0.0)
    dcg = lambda g: sum(gain / math.log2(rank + 2) for rank, gain in enumerate(g[:10]))
    hits = [rank for rank, gain in enumerate(gains[:100]) if gain > 0]  # 0-based ranks
    return {"ndcg@10": dcg(gains) / dcg(ideal),
            "recall@100": len(hits) / len(ideal),
            "mrr@10": 1 / (hits[0] + 1) if hits and hits[0] < 10 else 0.0,
            "map@100": sum((n + 1) / (rank + 1) for n, rank in enumerate(hits)) / len(ideal)}


def evaluate(qrels, run, per_query=False):
    """{"ndcg@10", "recall@100", "mrr@10", "map@100"}: means over the queries in qrels (a query
    missing from the run scores 0). Relevance >= 1 is relevant; nDCG gains are the relevance.
    per_query=True returns (means, {metric: {qid: value}}), with a value for every judged query,
    e.g. for paired_bootstrap."""
    if not qrels:
        raise ValueError("evaluate: qrels is empty, there is no judged query to average over")
    totals, values = dict.fromkeys(METRICS, 0.0), {m: {} for m in METRICS}
    for qid, judged in qrels.items():
        docs = {d: s for d, s in run.get(qid, {}).items() if d != qid}
        for m, value in query_metrics(judged, docs).items():
            totals[m] += value  # summed in qrels order, so the means are the per-query values' means
            values[m][qid] = value
    means = {m: total / len(qrels) for m, total in totals.items()}
    return (means, values) if per_query else means


def paired_bootstrap(a, b, resamples=10000, confidence=0.95, seed=0):
    """Is system a better than b beyond chance? a, b: per-query values of both on the same queries,
    dicts {qid: value} with the same keys (e.g. evaluate(..., per_query=True)[1]["ndcg@10"]) or
    equal-length sequences. Resamples the queries with replacement and returns
    {"difference": mean(a - b), "low", "high": the percentile interval of the resampled mean
    difference at `confidence`, "queries": n}. The bounds are the lower and the higher of the two
    values around each percentile (numpy's method="lower" and "higher"): on a discrete
    distribution they are values the resampled mean actually takes, and the interval errs wide.
    An interval that excludes 0 says a and b differ (at that confidence)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            raise ValueError("paired_bootstrap: pass a and b both as dicts {qid: value} or both as sequences")
        if a.keys() != b.keys():
            only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
            raise ValueError(f"paired_bootstrap: a and b must hold the same queries; only in a: "
                             f"{only_a[:5]} ({len(only_a)}), only in b: {only_b[:5]} ({len(only_b)})")
        a, b = list(a.values()), [b[q] for q in a]  # paired by qid
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: a and b must be flat and of equal length, got shapes "
                         f"{a.shape} and {b.shape}")
    if not len(a):
        raise ValueError("paired_bootstrap: a and b are empty, there is no query to resample")
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"paired_bootstrap: need 0 < confidence < 1 and resamples >= 1, "
                         f"got confidence={confidence}, resamples={resamples}")
    diff, n = a - b, len(a)
    rng = np.random.default_rng(seed)
    step = max(1, 2 ** 20 // n)  # resamples per draw: about a million indices at a time
    means = np.concatenate([diff[rng.integers(0, n, size=(min(step, resamples - i), n))].mean(axis=1)
                            for i in range(0, resamples, step)])
    tail = 100 * (1 - confidence) / 2
    return {"difference": float(diff.mean()),
            "low": float(np.percentile(means, tail, method="lower")),
            "high": float(np.percentile(means, 100 - tail, method="higher")),
            "queries": n}


# -----------------------------------------------------------------------------
# whole evaluations, as train.py runs them: held-out questions over a passage pool, BEIR folders


def evaluate_questions(retriever, sets, passages, pool=None, log=lambda *_: None):
    """{name: (means, per-query values)} of finding each question's gold passage among passages
    (or the indices in pool), for sets {name: [{"query", "gold"}, ...]} (train.py's held-out
    questions; those without a gold passage are left out); one encoding of the pool serves them
    all. retriever None: BM25."""
    judged = {f"{name}{i}": q for name, qs in sets.items() for i, q in enumerate(qs) if q["gold"] is not None}
    if not judged:
        return None
    corpus = {f"p{j}": passages[j] for j in (range(len(passages)) if pool is None else pool)}
    queries = {qid: q["query"] for qid, q in judged.items()}
    run = bm25_search(corpus, queries) if retriever is None else \
        dense_search(retriever, corpus, queries, top_k=100, progress=pool is None)  # quiet health checks
    out = {}
    for name in sets:
        qids = [f"{name}{i}" for i, q in enumerate(sets[name]) if q["gold"] is not None]
        if not qids:  # a set with no judged question (--test-questions 0, say): nothing to report
            continue
        out[name] = evaluate({qid: {f"p{judged[qid]['gold']}": 1} for qid in qids},
                             {qid: run.get(qid, {}) for qid in qids}, per_query=True)
        log(f"QA {name}: nDCG@10 {out[name][0]['ndcg@10']:.4f}, Recall@100 {out[name][0]['recall@100']:.4f} "
            f"({len(qids)} questions)")
    return out


def evaluate_beir(retriever, sets, log):
    """{name: (means, per-query values)} of BEIR query sets [(name, folder, split, query ids or
    None for all)] (data.beir_sets); one search of a folder's corpus serves all its sets (a query id
    names one query in every split). retriever None: BM25."""
    results = {}
    for folder in dict.fromkeys(folder for _, folder, _, _ in sets):
        mine = [(name, split, keep) for name, f, split, keep in sets if f == folder]
        qrels, queries = {}, {}
        for name, split, keep in mine:
            corpus, split_queries, split_qrels = load_beir(folder, split)
            qrels[name] = {q: r for q, r in split_qrels.items() if keep is None or q in keep}
            queries.update({q: split_queries[q] for q in qrels[name]})
        run = bm25_search(corpus, queries) if retriever is None else dense_search(retriever, corpus, queries)
        for name, _, _ in mine:
            results[name] = evaluate(qrels[name], {q: run.get(q, {}) for q in qrels[name]}, per_query=True)
            log(f"{name}: nDCG@10 {results[name][0]['ndcg@10']:.4f}, Recall@100 {results[name][0]['recall@100']:.4f} "
                f"({len(qrels[name])} queries)")
    return results


def summary(report, encoder_dir):
    """The before/after table, then each set's nDCG@10 difference with a paired bootstrap interval."""
    columns = [c for c in ("before", "after") if c in report]
    rows = [("val loss (held out)", lambda r: r["val_loss_and_gold_top1"][0], ".4f"),
            ("val gold in top-1", lambda r: r["val_loss_and_gold_top1"][1], ".3f")]
    for name in report["after"].get("qa") or {}:
        rows += [(f"QA {name} {m}", lambda r, name=name, m=m: r["qa"][name][m], ".4f") for m in ("ndcg@10", "recall@100")]
    rows += [(f"{name} {m}", lambda r, name=name, m=m: r["beir"][name][m], ".4f")
             for name in report["after"]["beir"] for m in ("ndcg@10", "recall@100")]
    lines = [f"{'':26}" + "".join(f"{c:>10}" for c in columns)]
    lines += [f"{label:26}" + "".join(f"{get(report[c]):>10{fmt}}" for c in columns) for label, get, fmt in rows]
    if "before" in report:  # paired over the same queries: is the change more than noise?
        for name, after in report["after"]["per_query"].items():
            d = paired_bootstrap(after["ndcg@10"], report["before"]["per_query"][name]["ndcg@10"])
            lines.append(f"{'QA ' + name if name in ('dev', 'test') else name} nDCG@10, after - before: "
                         f"{d['difference']:+.4f}, 95% interval [{d['low']:+.4f}, {d['high']:+.4f}] "
                         f"(paired bootstrap over {d['queries']} queries)")
    gold = report.get("gold_top1_by_step", [])
    if gold:
        n = max(1, len(gold) // 4)
        first, last = [g for _, g in gold[:n]], [g for _, g in gold[-n:]]
        lines.append(f"training questions whose top candidate is their gold paragraph (of those whose gold "
                     f"is a candidate), first and last quarter: {sum(first) / n:.3f} -> {sum(last) / n:.3f}")
    lines.append(f"encoder saved to {encoder_dir} (SentenceTransformer('{encoder_dir}'); "
                 f"python eval.py --encoder {encoder_dir} --data ...)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def save_run(run, path, tag):
    with open(path, "w") as f:
        for qid, docs in run.items():
            for rank, d in enumerate(ranked(docs), 1):
                f.write(f"{qid} Q0 {d} {rank} {docs[d]!r} {tag}\n")


def run_file(path, key, several):
    """path itself, or with the result key before the extension when several runs are saved."""
    root, ext = os.path.splitext(path)
    return f"{root}.{key.replace('/', '.')}{ext}" if several else path


def print_table(results, names, encoder, bm25):
    """One row per dataset, one group of METRICS columns per system (the encoder's, BM25's)."""
    systems = [("encoder", "")] * encoder + [("BM25", "/bm25")] * bm25
    width = max(len("dataset"), *map(len, names))
    group = lambda cells: "  ".join(f"{c:>10}" for c in cells)
    print(f"{'':<{width}}" + "".join(f" | {label:<{10 * 4 + 6}}" for label, _ in systems))
    print(f"{'dataset':<{width}}" + " | ".join([""] + [group(METRICS)] * len(systems)))
    for name in names:
        rows = [group(f"{results[name + key][m]:.4f}" for m in METRICS) for _, key in systems]
        print(f"{name:<{width}}" + " | ".join([""] + rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # every default shown
    parser.add_argument("--encoder", help="hub name or local folder (or leave out, with --bm25)")
    parser.add_argument("--data", action="append", required=True, help="BEIR folder or name (repeatable)")
    parser.add_argument("--split", default="test", help="the qrels split(s) whose queries are evaluated; "
                        "several (train,test): one search of the corpus serves them all")
    parser.add_argument("--out", help="write the metrics here as JSON")
    parser.add_argument("--per-query", action="store_true", help="--out keeps each query's values too: "
                        "{set: [means, {metric: {query id: value}}]}, as compare.py pairs them (beir.json)")
    parser.add_argument("--save-run", help="write the run(s) here in TREC format")
    parser.add_argument("--bm25", action="store_true", help="evaluate BM25 (too, or alone)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts encoded at once")
    parser.add_argument("--max-seq-length", type=int, help="cut each text to this many encoder tokens; "
                        "None: the encoder's own setting")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: encode under autocast")
    parser.add_argument("--query-prompt", help="the text before each query (the encoder's prompts['query'])")
    parser.add_argument("--document-prompt", help="the text before each document (prompts['document'])")
    args = parser.parse_args()
    if not args.encoder and not args.bm25:
        parser.error("nothing to evaluate: give --encoder NAME_OR_DIR and/or --bm25")
    if not [split for split in args.split.split(",") if split]:
        parser.error(f"--split {args.split!r}: name a qrels split (test), or several (train,test)")
    if args.max_seq_length is not None and args.max_seq_length < 1:
        parser.error(f"--max-seq-length {args.max_seq_length}: give a positive number of tokens")

    rank, world, device = init_distributed()
    master = rank == 0  # the one process that talks and writes files
    log = lambda message: print(message, file=sys.stderr) if master else None
    cpu = torch.backends.cpu.get_cpu_capability()
    if args.dtype == "bf16" and torch.device(device).type == "cpu" and cpu != "AVX512":
        log(f"warning: --dtype bf16 on a CPU without AVX-512 ({cpu}): bf16 is emulated, far slower than "
            "--dtype fp32 (a decoder retriever on SciFact: hours, not minutes, on an AVX2 CPU)")
    # the other ranks' loading bars and warnings would repeat rank 0's (exceptions still show)
    quiet = contextlib.nullcontext if master else lambda: contextlib.redirect_stderr(io.StringIO())
    try:  # find or download every dataset before the encoder loads; rank 0 downloads, then the rest
        if not master:
            dist.barrier()
        folders = [beir_folder(data) for data in args.data]
        if master and world > 1:
            dist.barrier()
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.encoder:
        with quiet():
            retriever = load_retriever(args.encoder, device=device)
        if args.max_seq_length:
            retriever.max_seq_length = args.max_seq_length
        for task, prompt in (("query", args.query_prompt), ("document", args.document_prompt)):
            if prompt is not None:
                retriever.prompts[task] = prompt
        tag = os.path.basename(os.path.normpath(args.encoder))
    splits = [split for split in args.split.split(",") if split]
    several_runs = len(args.data) * len(splits) * (bool(args.encoder) + args.bm25) > 1
    results, per_query, names = {}, {}, []
    for data, folder in zip(args.data, folders):
        name = os.path.basename(os.path.normpath(data))
        try:
            with quiet():
                loaded = {split: load_beir(folder, split) for split in splits}
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        corpus = loaded[splits[0]][0]
        queries = {q: text for _, split_queries, _ in loaded.values() for q, text in split_queries.items()}
        log(f"{name}: {len(corpus)} documents, " + ", ".join(f"{len(q)} {s} queries" for s, (_, q, _) in loaded.items()))
        runs = {}  # one search of the corpus for every split's queries, keyed by system
        if args.encoder:
            t0 = time.time()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                runs[""] = dense_search(retriever, corpus, queries, batch_size=args.batch_size)
            log(f"{name}: encoded and searched in {time.time() - t0:.1f}s")
        if not master:
            continue  # the encoding was shared; the rest is rank 0's
        if args.bm25:
            runs["/bm25"] = bm25_search(corpus, queries, progress=True)
        for split, (_, split_queries, qrels) in loaded.items():
            entry = name if len(splits) == 1 else f"{name}/{split}"
            for system, run in runs.items():
                run = {q: run.get(q, {}) for q in split_queries}
                results[entry + system], per_query[entry + system] = evaluate(qrels, run, per_query=True)
                if args.save_run:
                    save_run(run, run_file(args.save_run, entry + system, several_runs), "bm25" if system else tag)
            names.append(entry)
    if master:
        print_table(results, names, bool(args.encoder), args.bm25)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({k: [v, per_query[k]] for k, v in results.items()} if args.per_query else results, f,
                          indent=None if args.per_query else 2)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
