"""
The data DREAM trains on: questions (queries) with targets, a pool of passages, and each
question's k candidate passages (its BM25 top-k). The LM never sees a relevance label; the gold
passage, where the data has one, is only counted and evaluated.

- SQuAD-schema data: every paragraph is cut into passages of whole sentences that fit the LM's
  max_doc_tokens, so the retriever scores exactly what the LM reads; the target is the answer.
- {"query", "target"} JSON lines with a --corpus of passages (a BEIR folder or a JSONL).
- Held out by article: whole articles go to dev (to choose settings) and test (to report).
- The toy world of train.py --toy: keys, values, a tiny LM taught to copy, and its training loop.
"""
import gzip
import json
import os
import random
import re
import tempfile
import time
from collections import Counter

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import dream
from eval import bm25_search, find_file, ids_and_texts, read_json_lines, read_jsonl, read_qrels

# -----------------------------------------------------------------------------
# questions, passages, a held-out split by article, BM25 candidates


def read_json_rows(path):
    """Rows of a JSON-lines file (plain or .gz) or of a JSON file holding a list or SQuAD's {"data": ...}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --train-data takes a SQuAD-schema JSON/JSONL file "
                                "(id, title, context, question, answers) or a JSONL of {\"query\", \"target\"}")
    if ".jsonl" in path:
        return [row for _, row in read_json_lines(path)]
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and "data" in data:  # the original SQuAD nesting
        return [{"id": qa["id"], "title": art["title"], "context": par["context"], "question": qa["question"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    return data


def lm_tokens(tok):
    """text -> how many LM tokens it is."""
    return lambda text: len(dream.text_ids(tok, [text])[0])


def read_corpus(path):
    """{doc id: {"title", "text"}} of a BEIR folder (its corpus.jsonl[.gz]) or of a JSONL of
    passages, one {"text": ...} a line ("_id" or "id", and "title", optional)."""
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("corpus.jsonl", "corpus.jsonl.gz")):
            raise ValueError(f"--corpus {path}: a folder needs corpus.jsonl (or .gz), the BEIR layout; or give "
                             "a JSONL file of passages, one {\"text\": ...} a line")
        return read_jsonl(find_file(path, "corpus.jsonl"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--corpus {path} not found: give a BEIR folder or a JSONL file of passages")
    corpus = {}
    for n, row in read_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}, line {n}: expected a JSON object with a \"text\" field (a passage)")
        corpus[str(row.get("_id", row.get("id", n)))] = row
    return corpus


def load_questions(cfg, tok, log):
    """questions: list of dicts {query, target, group, gold}; passages: list of strings.
    SQuAD-schema data: each paragraph is cut into passages of whole sentences that fit
    max_doc_tokens of the LM (the retriever scores exactly what the LM reads); gold is the
    passage holding the answer span. {query, target} data: gold is None."""
    path = cfg.train_data or os.path.join(cfg.data_dir, "squad", "train.jsonl.gz")
    if not cfg.train_data and not os.path.exists(path):
        log(f"{path} not found (set --data-dir or DREAM_DATA): using SQuAD from the hub")
        path = "squad"
    if not os.path.exists(path) and path == "squad":
        rows = load_hub_squad(log)
    else:
        rows = read_json_rows(path)
    if not rows:
        raise ValueError(f"{path}: no questions")
    if "context" in rows[0]:  # SQuAD schema
        questions, passages, _ = squad_passages(rows, lm_tokens(tok), cfg.max_doc_tokens, path, log)
    elif "query" in rows[0] and "target" in rows[0]:
        if not cfg.corpus:
            raise ValueError(f"{path} holds {{query, target}} rows: give --corpus (a BEIR folder or a JSONL "
                             "of passages with a \"text\" field) to mine candidates from")
        passages = ids_and_texts(read_corpus(cfg.corpus))[1]
        # the retriever scores what the LM reads: a passage longer than max_doc_tokens is cut for both
        ids = dream.text_ids(tok, passages)
        passages = [tok.decode(t[:cfg.max_doc_tokens]) if len(t) > cfg.max_doc_tokens else p
                    for p, t in zip(passages, ids)]
        questions = [{"query": r["query"], "target": r["target"], "group": r.get("group", i), "gold": None}
                     for i, r in enumerate(rows)]
    else:
        raise ValueError(f"{path}: rows need SQuAD's fields (title, context, question, answers) "
                         "or {\"query\", \"target\"}")
    if not passages:
        raise ValueError("the passage pool is empty")
    log(f"{len(questions):,} questions over {len(passages):,} passages from {path}")
    return questions, passages


def load_hub_squad(log):
    try:
        import datasets
        return list(datasets.load_dataset("squad", split="train"))
    except Exception as e:  # offline, or datasets missing
        raise SystemExit(f"could not load 'squad' from the hub ({type(e).__name__}: {e}); pass a local "
                         "file, e.g. --train-data ../shared/data/squad/train.jsonl.gz") from None


def sentence_spans(text):
    """(start, end) of each sentence: a cut after . ! or ? and the whitespace that follows."""
    cuts = [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", text)]
    return [(a, b) for a, b in zip([0] + cuts, cuts + [len(text)]) if text[a:b].strip()]


def split_paragraph(text, count, max_tokens):
    """Passages of whole sentences, as many as fit max_tokens (count(text) -> tokens), as (start, end)
    spans of text; a sentence longer than that alone is cut between words."""
    pieces = []
    for a, b in sentence_spans(text):
        if count(text[a:b].strip()) <= max_tokens:
            pieces.append((a, b))
            continue
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+\s*", text[a:b])]
        start = 0
        for i in range(1, len(words) + 1):  # close a piece before the word that would not fit
            if i < len(words) and count(text[a + words[start][0]:a + words[i][1]].strip()) > max_tokens:
                pieces.append((a + words[start][0], a + words[i - 1][1]))
                start = i
        pieces.append((a + words[start][0], b))
    passages, start, end = [], None, None
    for a, b in pieces:  # greedy: add sentences while the passage still fits
        if start is not None and count(text[start:b].strip()) <= max_tokens:
            end = b
        else:
            if start is not None:
                passages.append((start, end))
            start, end = a, b
    if start is not None:
        passages.append((start, end))
    return passages


def squad_passages(rows, count, max_tokens, path, log):
    """(questions, passages, the paragraph of each passage) from SQuAD rows: every paragraph split
    by split_paragraph; a question whose answer crosses a passage boundary is dropped (and counted)."""
    passages, spans, owner = [], {}, []
    for n, r in enumerate(rows, 1):
        context = r["context"]
        if context in spans:
            continue
        if not context.strip():
            raise ValueError(f"{path}, row {n} (id {r.get('id', '?')}): the context is empty; "
                             "remove the row or give it its paragraph")
        spans[context] = []
        for a, b in split_paragraph(context, count, max_tokens):
            spans[context].append((a, b, len(passages)))
            passages.append(context[a:b].strip())
            owner.append(len(spans))
    questions, crossing = [], 0
    for r in rows:
        answers = r["answers"]
        if not answers["text"]:
            continue
        answer, at = answers["text"][0], (answers.get("answer_start") or [None])[0]
        if at is None or r["context"][at:at + len(answer)] != answer:  # no offset: its first occurrence
            at = r["context"].find(answer)
        gold = next((j for a, b, j in spans[r["context"]] if a <= at and at + len(answer) <= b), None) \
            if at >= 0 else None
        if gold is None:
            crossing += 1
            continue
        questions.append({"query": r["question"], "target": answer, "group": r["title"], "gold": gold})
    log(f"{len(spans):,} paragraphs cut into {len(passages):,} passages of <= {max_tokens} LM tokens; "
        f"{crossing} of {crossing + len(questions):,} questions dropped (answer across a passage boundary)")
    return questions, passages, owner


def hold_out(questions, n_dev, n_test, seed):
    """(train, dev, test): whole articles (groups) go to dev until it holds n_dev questions, then to
    test until n_test; the rest is training. No article is in two of them."""
    groups = sorted({q["group"] for q in questions}, key=str)
    random.Random(seed).shuffle(groups)
    part, sizes = {}, [0, 0]
    for g in groups:
        side = 0 if sizes[0] < n_dev else 1 if sizes[1] < n_test else None
        if side is None or len(part) == len(groups) - 1:  # keep at least one article to train on
            break
        part[g] = side
        sizes[side] += sum(q["group"] == g for q in questions)
    split = [[q for q in questions if part.get(q["group"], -1) == side] for side in (-1, 0, 1)]
    return tuple(split)


def load_data(cfg, tok, log):
    """(train, dev, test questions with their BM25 candidates, passages, {passage: LM token ids})."""
    if cfg.corpus and not cfg.train_data:  # no labels at all: examples made from the text
        train_qs, dev_qs, test_qs, passages = corpus_data(cfg, tok, log)
    else:
        questions, passages = load_questions(cfg, tok, log)
        train_qs, dev_qs, test_qs = hold_out(questions, cfg.dev_questions, cfg.test_questions, cfg.data_seed)
        if not dev_qs:
            raise ValueError("no held-out question: the data needs at least two articles (groups) and "
                             "--dev-questions >= 1")
        add_candidates(train_qs + dev_qs + test_qs, passages, cfg.k, cfg.data_seed)
        log(f"{len(train_qs):,} training questions; held out (whole articles): {len(dev_qs)} dev, {len(test_qs)} test")
    used = sorted({j for q in train_qs + dev_qs + test_qs for j in q["candidates"]})
    tokenized = dream.text_ids(tok, [passages[j] for j in used])  # once, not per step, as pack reads them
    doc_ids = {j: ids[:cfg.max_doc_tokens] for j, ids in zip(used, tokenized)}
    golds = [q for q in train_qs if q["gold"] is not None and q["gold"] in q["candidates"]]
    if golds:  # the LM must be able to read the answer: its passage is never cut
        inside = sum(q["target"] in tok.decode(doc_ids[q["gold"]]) for q in golds)
        log(f"training answers inside what the LM reads: {inside / len(golds):.1%} of the {len(golds):,} "
            f"questions whose gold passage is a candidate")
    return train_qs, dev_qs, test_qs, passages, doc_ids


def add_candidates(questions, passages, k, seed, owner=None, siblings=0):
    """Each question's BM25 top-k over the pool (the retriever then scores just these), in a
    random order: BM25's order would tell the position of its favourite. owner: each passage's
    document; then a question's own document (its group) gives none of its candidates, except
    siblings: that many other passages of it (BM25's best first), never a question's own
    passage (q["passage"], which holds its target)."""
    spare = max(Counter(owner).values()) if owner else 0  # enough to skip a whole document's pieces
    run = bm25_search({f"p{j}": p for j, p in enumerate(passages)},
                      {f"q{i}": q["query"] for i, q in enumerate(questions)}, top_k=k + spare)
    pieces = {}  # siblings: each document's passages, for one that BM25 did not rank
    for j, doc in enumerate(owner if siblings else []):
        pieces.setdefault(doc, []).append(j)
    for i, q in enumerate(questions):
        ranked = [int(pid[1:]) for pid in run[f"q{i}"]]
        mine = [j for j in dict.fromkeys(ranked + pieces.get(q["group"], []))
                if owner[j] == q["group"] and j != q.get("passage")][:siblings] if siblings else []
        q["candidates"] = mine + [j for j in ranked if owner is None or owner[j] != q["group"]][:k - len(mine)]
        if siblings:  # its own document's passage BM25 likes best: what --probe asks about, infonce's positive
            q["sibling"] = mine[0] if mine else None
        random.Random(seed + i).shuffle(q["candidates"])
        if len(q["candidates"]) < k:
            raise ValueError(f"BM25 found only {len(q['candidates'])} passages for {q['query']!r}"
                             f"{' outside its own document' if owner else ''}; need k={k}: lower --k")


def beir_sets(cfg, log, dev=False):
    """[(name, BEIR folder, split, query ids or None for all)] to evaluate: each --eval-data folder's
    test queries (none; a list; "" = <data_dir>/scifact, else downloaded). With --corpus alone and
    a BEIR folder there, that folder: its dev queries to choose settings on ("<name> dev":
    qrels/dev.tsv, else train.tsv, else a fixed random half of the test queries) and its test
    queries to report (the other half, if halved). dev: every folder's dev queries too, where its
    qrels have a dev or train split (compare.py chooses on them)."""
    corpus_folder = cfg.corpus if cfg.corpus and not cfg.train_data and os.path.isdir(cfg.corpus) else None
    if corpus_folder and not any(os.path.isfile(os.path.join(corpus_folder, "qrels", f"test.tsv{gz}")) and
                                 os.path.isfile(os.path.join(corpus_folder, f"queries.jsonl{gz}")) for gz in ("", ".gz")):
        corpus_folder = None  # a corpus without queries: the --eval-data default, as for any run
    if cfg.eval_data == "none":
        return []
    if cfg.eval_data or corpus_folder:
        folders = cfg.eval_data.split(",") if cfg.eval_data else [corpus_folder]
    elif os.path.isdir(os.path.join(cfg.data_dir, "scifact")):
        folders = [os.path.join(cfg.data_dir, "scifact")]
    else:
        log(f"{os.path.join(cfg.data_dir, 'scifact')} not found: SciFact will be downloaded (eval.py's cache)")
        folders = ["scifact"]
    sets = []
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder))
        split = next((split for split in ("dev", "train")
                      if os.path.isfile(os.path.join(folder, "qrels", f"{split}.tsv"))), None)
        if folder != corpus_folder and not (dev and split):
            sets.append((name, folder, "test", None))
        elif split:
            sets += [(f"{name} dev", folder, split, None), (name, folder, "test", None)]
        else:  # a fixed random half of the test queries chooses, the other half is reported
            qids = sorted(read_qrels(find_file(folder, os.path.join("qrels", "test.tsv"))))
            half = set(random.Random(cfg.data_seed).sample(qids, len(qids) // 2))
            sets += [(f"{name} dev", folder, "test", half), (name, folder, "test", set(qids) - half)]
    return sets


def health_set(dev_qs, n_passages, cfg):
    """(questions, pool) of the cheap held-out health number logged during training: a fixed random
    sample of health_questions dev questions (of every dev article), over their gold and candidate
    passages and a fixed random sample of the rest (health_pool passages in all)."""
    qs = [q for q in dev_qs if q["gold"] is not None]
    qs = random.Random(cfg.data_seed).sample(qs, min(len(qs), cfg.health_questions))
    pool = {j for q in qs for j in [q["gold"], *q["candidates"]]}
    rest = [j for j in range(n_passages) if j not in pool]
    pool |= set(random.Random(cfg.data_seed).sample(rest, max(0, min(len(rest), cfg.health_pool - len(pool)))))
    return qs, sorted(pool)


# -----------------------------------------------------------------------------
# no labels at all (--corpus without --train-data): training examples made from the text alone


def corpus_data(cfg, tok, log):
    """(train examples, dev, test, passages) from --corpus alone. A BEIR folder or a JSONL of
    passages: its documents, each its title (a sentence of its own) and text. A SQuAD-schema file:
    its paragraphs; its questions never train, they only evaluate (QA dev and test, held out by
    article as with --train-data, over the same passages). Every document is cut into passages the
    LM reads whole; every passage (or, with corpus_examples="document", every document) gives one
    example (corpus_examples); the examples of a few whole documents are held out (first in dev)
    for the validation loss."""
    count, path, questions = lm_tokens(tok), cfg.corpus, []
    rows = None if os.path.isdir(path) or not os.path.isfile(path) else read_json_rows(path)
    if rows and isinstance(rows[0], dict) and "context" in rows[0]:
        questions, passages, owner = squad_passages(rows, count, cfg.max_doc_tokens, path, log)
        documents = {n: text for n, text in enumerate(dict.fromkeys(r["context"] for r in rows), 1)}  # as owner
    else:
        documents, passages, owner = {}, [], []
        for doc, row in read_corpus(path).items():
            title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
            documents[doc] = f"{title}{'' if title[-1:] in '.!?' else '.'} {text}".strip() if title else text
            for a, b in split_paragraph(documents[doc], count, cfg.max_doc_tokens):
                passages.append(documents[doc][a:b].strip())
                owner.append(doc)
    if not passages:
        raise ValueError(f"--corpus {path}: no document has any text (the corpus is empty): give documents "
                         "with a \"text\" field")
    if len(passages) <= cfg.k:
        raise ValueError(f"--corpus {path}: {len(passages)} passages with text; each example needs k = {cfg.k} "
                         f"candidates from other documents: give more than {cfg.k} passages, or a lower --k")
    if cfg.corpus_examples not in ("passage", "document"):
        raise ValueError(f"--corpus-examples {cfg.corpus_examples!r}: choose passage or document")
    if cfg.corpus_siblings and cfg.corpus_examples != "passage":
        raise ValueError(f"--corpus-siblings {cfg.corpus_siblings}: only with --corpus-examples passage (a "
                         "document's example has no other passage of its own)")
    if not 0 <= cfg.corpus_siblings < cfg.k:
        raise ValueError(f"--corpus-siblings {cfg.corpus_siblings}: give 0 to k - 1 = {cfg.k - 1}")
    texts = (list(zip(owner, passages, range(len(passages)))) if cfg.corpus_examples == "passage"
             else [(doc, text, None) for doc, text in documents.items()])
    examples = corpus_examples(texts, count, cfg.target_tokens)
    if not examples:
        raise ValueError(f"--corpus {path}: no document has text to split into a query and a target (two words "
                         "or more); give documents of a sentence or longer")
    train_qs, val_qs, _ = hold_out(examples, cfg.val_loss_questions, 0, cfg.data_seed)
    add_candidates(train_qs + val_qs, passages, cfg.k, cfg.data_seed, owner, cfg.corpus_siblings)
    _, dev_qs, test_qs = hold_out(questions, cfg.dev_questions, cfg.test_questions, cfg.data_seed)
    if dev_qs + test_qs:
        add_candidates(dev_qs + test_qs, passages, cfg.k, cfg.data_seed)
    log(f"{len(examples):,} examples from the text of {len(documents):,} documents ({len(passages):,} passages "
        f"of <= {cfg.max_doc_tokens} LM tokens; no question trains); {len(val_qs)} held out (whole documents) "
        f"for the validation loss" + (f"; QA questions only evaluate: {len(dev_qs)} dev, {len(test_qs)} test"
                                      if questions else ""))
    return train_qs, val_qs + dev_qs, test_qs, passages


def corpus_examples(texts, count, target_tokens):
    """One example a text [(its document, text, its passage index or None)], a passage or a whole
    document, from the text alone: the query its opening sentence (a BEIR document's: its title),
    the target the sentences after it, cut to target_tokens (a text of one sentence: its first and
    second half of words). The group is the document: no piece of it is among the example's
    candidates (but --corpus-siblings), and never its own passage, or the LM would copy the
    continuation out of its source."""
    examples = []
    for doc, text, passage in texts:
        spans = sentence_spans(text)
        if len(spans) >= 2:
            query, target = text[:spans[0][1]].strip(), text[spans[1][0]:].strip()
        else:
            words = text.split()
            query, target = " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])
        if query and target:
            examples.append({"query": query, "target": first_words(target, count, target_tokens), "group": doc,
                             "gold": None, "passage": passage})
    return examples


def first_words(text, count, max_tokens):
    """The longest run of text's first words (one at least) that fits max_tokens."""
    words = text.split()
    lo, hi = 1, len(words)
    while lo < hi:  # the largest n whose first n words fit
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(" ".join(words[:mid])) <= max_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


# -----------------------------------------------------------------------------
# the toy world: documents "k<a> v<x>" pair a key with a value; a query "q<a>" asks for the value
# of key a, and the target is that value. Queries and documents share no token, so an untrained
# retriever ranks at chance


class ToyWorld:
    def __init__(self, n_keys=32, n_values=16, k=4, seed=0):
        self.n_keys, self.n_values, self.k = n_keys, n_values, k
        self.rng = random.Random(seed)
        words = ["[PAD]", "[UNK]", "Question", "Answer", ":"]
        words += [f"q{a}" for a in range(n_keys)] + [f"k{a}" for a in range(n_keys)]
        words += [f"v{x}" for x in range(n_values)]
        wordlevel = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        wordlevel.pre_tokenizer = pre_tokenizers.Whitespace()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="[PAD]",
                                                 unk_token="[UNK]")

    def examples(self, n, random_target=False):
        """n (query, k docs, target, gold index). random_target: the target is the value of a
        random document, unrelated to the query (how the LM is taught to copy)."""
        queries, docs, targets, gold = [], [], [], []
        for _ in range(n):
            keys = self.rng.sample(range(self.n_keys), self.k)
            values = self.rng.sample(range(self.n_values), self.k)
            g = self.rng.randrange(self.k)
            answer = self.rng.randrange(self.k) if random_target else g
            queries.append(f"q{keys[g]}")
            docs.append([f"k{a} v{x}" for a, x in zip(keys, values)])
            targets.append(f"v{values[answer]}")
            gold.append(g)
        return queries, docs, targets, torch.tensor(gold)

    def copying_lm(self, steps=300, batch_size=64, lr=3e-3, seed=0):
        """A tiny Llama (RoPE, grouped-query attention) taught to copy a value from its context."""
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(self.tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                             eos_token_id=None)
        lm = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(lm.parameters(), lr=lr)
        for _ in range(steps):
            q, d, y, _ = self.examples(batch_size, random_target=True)
            batch = dream.pack(self.tokenizer, q, d, y)
            loss = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      labels=batch.labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return dream.prepare_lm(lm)

    def fresh_retriever(self, folder, seed=0):
        """A randomly initialised tiny BERT, saved to folder and loaded back as a SentenceTransformer
        with mean pooling."""
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
        BertModel(config).save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return dream.load_retriever(folder, pooling="mean")

    @torch.no_grad()
    def top1(self, retriever, n=512):
        q, d, _, gold = self.examples(n)
        return (dream.score(retriever, q, d).argmax(-1) == gold).float().mean().item()


def train_toy(steps=250, batch_size=32, lr=1e-3, temperature=0.05, seed=0, log=print):
    """train.py --toy: a frozen copying LM teaches a fresh retriever which document answers the
    query, with no label. Returns the retriever's top-1 before and after."""
    world = ToyWorld(seed=seed)
    t0 = time.time()
    lm = world.copying_lm(seed=seed)
    q, d, y, gold = world.examples(512)
    batch = dream.pack(world.tokenizer, q, d, y)
    with torch.no_grad():
        lm_alone = dream.biased_forward(lm, batch, torch.zeros(len(q), world.k)).logits
    lm_acc = (lm_alone.argmax(-1) == batch.labels[batch.labels != -100]).float().mean().item()
    log(f"frozen LM alone answers {lm_acc:.2f} of toy questions ({time.time() - t0:.0f}s to teach it)")
    with tempfile.TemporaryDirectory() as folder:
        retriever = world.fresh_retriever(folder, seed=seed)
    before = world.top1(retriever)
    log(f"retriever top-1 before: {before:.3f} (chance {1 / world.k:.3f})")
    opt = torch.optim.AdamW(retriever.parameters(), lr=lr)
    retriever.train()
    for step in range(1, steps + 1):
        q, d, y, _ = world.examples(batch_size)
        loss = dream.dream_loss(lm, dream.pack(world.tokenizer, q, d, y), dream.score(retriever, q, d),
                                temperature=temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log(f"step {step}: loss {loss.item():.3f}, top-1 {world.top1(retriever, 256):.3f}")
    after = world.top1(retriever)
    log(f"retriever top-1 after: {after:.3f} ({time.time() - t0:.0f}s in all)")
    return before, after
