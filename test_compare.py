"""compare.py, the research harness: the grid chooses each method's settings on dev and writes
intervals, each reading is a method of its own, a run another dream.py trained is trained again;
the signal probe's step is the descent step it names; --runs tables finished runs (here from a tiny
corpus trained end to end); --drift measures the cosines it names.
"""
import dataclasses
import json
import os
import random
import re

import pytest
import torch
import torch.nn.functional as F

import compare
import data
import dream
import eval as beir_eval
import train
from conftest import (CORPUS, QRELS, QUERIES, TOK, WORLD, corpus_config, encoded, tiny_encoder_folder, tiny_lm,
                      toy_batch, toy_collection, write_beir)
from data import ToyWorld


# -----------------------------------------------------------------------------
# the grid and the baselines (tiny models, tiny SQuAD-schema data)


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


def test_compare_runs_the_grid_chooses_on_dev_and_writes_intervals(tmp_path, model_folders, monkeypatch):
    from train import Config
    lm_dir, enc_dir = model_folders
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
    # lr x tau x heads for DREAM and ADist, lr x tau for REPLUG-LSR, LOOP and EMDR², lr for InfoNCE
    assert len(grid) == 2 * (2 * 2 * 2) + 3 * (2 * 2) + 2
    assert saved["dev_sets"] == ["tinybeir dev"]
    ranked = [g for g in grid.values() if g["heads"] == "loo"]
    assert len(ranked) == 8 and all(len(g["chosen_heads"].split(",")) == 3 for g in ranked)  # head_count ranked heads
    assert {g["chosen_heads"] for g in grid.values() if g["method"] in ("DREAM", "ADist") and g["heads"] == "all"} == {"all"}
    for name in compare.METHODS:  # the best: the highest mean of QA dev and BEIR dev nDCG@10 of the method's runs
        for g in grid.values():
            assert g["dev_score"] == pytest.approx((g["qa"]["dev"]["ndcg@10"] + g["beir"]["tinybeir dev"]["ndcg@10"]) / 2)
        assert grid[best[name]]["dev_score"] == max(g["dev_score"] for g in grid.values() if g["method"] == name)
        assert f"| {name} |" in text
    assert "## tinybeir (2 queries)" in text and "## tinybeir dev" not in text  # dev chooses, test is reported
    assert all(len(final[name]) == 2 for name in ("DREAM", "REPLUG-LSR", "ADist", "LOOP", "EMDR²"))
    assert len(final["InfoNCE (gold labels)"]) == 1
    assert "| vs start encoder | vs REPLUG-LSR | vs DREAM |" in text  # the other objectives against DREAM
    assert re.search(r"\| ADist \| 0 \|( [^|]+ \|){3} [+-]\d\.\d{4} \[", text)
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
             [("dream", ""), ("dream", "_heads-loo"), ("replug", ""), ("adist", ""), ("adist", "_heads-loo"),
              ("loop", ""), ("emdr", "")] for lr in ("0.001", "0.0001")}
    assert added <= set(trained) and all("tau1" in t or "final" in t for t in trained), trained
    with pytest.raises(ValueError, match="--ablations heads: choose from random_heads"):
        compare.compare(cfg, ablations=["heads"], log=lambda *_: None)
    with pytest.raises(ValueError, match="--methods dream,bm25: choose from dream, replug, adist, loop, emdr, infonce"):
        compare.compare(cfg, methods=["dream", "bm25"], log=lambda *_: None)
    # one method alone: its table has no REPLUG-LSR column values, and nothing else is trained
    trained.clear()
    only = dataclasses.replace(cfg, out_dir=str(tmp_path / "only"))
    final = compare.compare(only, grid_lr="1e-3", grid_temperature="0.05", grid_heads="gold", seeds=1,
                            methods=["dream"], log=lambda *_: None)
    assert set(final) == {"start encoder", "DREAM", "BM25"} and len(trained) == 2  # start, one grid run
    assert "_heads-gold" in trained[1] and final["DREAM"][0]["heads"].count(",") == 2
    # tau_g a grid dimension of the methods that have one; the table shows it
    trained.clear()
    final = compare.compare(only, grid_lr="1e-3", grid_temperature="0.05", grid_beta="0.1,0.5", seeds=1,
                            methods=["loop", "emdr"], log=lambda *_: None)
    assert sorted(os.path.basename(t) for t in trained) == ["emdr_lr0.001_tau0.05", "loop_lr0.001_tau0.05",
                                                             "loop_lr0.001_tau0.05_beta0.5"]
    assert {c.beta for c in map(lambda t: compare.Config(**compare.settings(json.loads(open(
        os.path.join(t, "report.json")).read())["config"])), trained) if c.loss == "loop"} == {0.1, 0.5}
    assert "| method | lr | tau | tau_g | heads |" in (tmp_path / "only" / "compare.md").read_text()
    # each its own temperature: EMDR² tries both tau, LOOP both tau_g at the first tau; the grid is as large for each
    trained.clear()
    compare.compare(only, grid_lr="1e-3", grid_temperature="0.05,0.2", grid_beta="0.1,0.5", seeds=1,
                    methods=["loop", "emdr"], own_temperature=True, table="own", log=lambda *_: None)
    assert [os.path.basename(t) for t in trained] == ["emdr_lr0.001_tau0.2"]  # the rest reused
    with pytest.raises(ValueError, match="--grid-own-temperature: give --grid-beta as many tau_g"):
        compare.compare(only, grid_lr="1e-3", grid_temperature="0.05,0.2", seeds=1, methods=["loop", "emdr"],
                        own_temperature=True, log=lambda *_: None)
    grid = json.loads((tmp_path / "only" / "own.json").read_text())["grid"]
    assert sorted(os.path.basename(f) for f in grid) == ["emdr_lr0.001_tau0.05", "emdr_lr0.001_tau0.2",
                                                        "loop_lr0.001_tau0.05", "loop_lr0.001_tau0.05_beta0.5"]


def test_compare_runs_each_reading_as_a_method_and_retrains_what_another_dream_py_trained(tmp_path, model_folders,
                                                                                        monkeypatch):
    from train import Config
    lm_dir, enc_dir = model_folders
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
    assert report["machine"]["cpu"] and report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
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
# the signal probe: what a descent step on the DREAM (or REPLUG-LSR) loss does to the useful document


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


def test_probe_command_prints_a_table_and_one_json_line(tmp_path, model_folders, capsys, monkeypatch):
    from train import Config
    lm_dir, enc_dir = model_folders
    WORLD.copying_lm(steps=50).save_pretrained(lm_dir)  # a copying LM in the tiny random one's place
    cfg = Config(lm=str(lm_dir), encoder=str(enc_dir), train_data=tiny_squad(tmp_path), eval_data="none",
                 out_dir=str(tmp_path / "probe"), heads="all", k=3, dev_questions=10, test_questions=10,
                 batch_size=4, seed=0)
    # what signal_probe computes on the way, recorded: each share it reports is a count of these
    seen = {"probe": [], "replug_step": [], "descent": [], "nll_per_document": [], "adist_mass": [],
            "loop_losses": [], "token_nll_per_document": []}  # name: [(its arguments, what it gave)]

    def recorded(name, real):
        def spy(*args, **kwargs):
            seen[name].append((args, real(*args, **kwargs)))
            return seen[name][-1][1]
        return spy
    for name in seen:
        monkeypatch.setattr(compare, name, recorded(name, getattr(compare, name)))
    lines = []
    result = compare.signal_probe(cfg, questions=6, log=lines.append)
    assert "| a descent step raises p(gold) |" in lines[-1] and "| REPLUG-LSR" in lines[-1]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "probe" / "probe.json").read_text()) == result
    assert 1 <= result["questions"] <= 6 and result["chance_first"] == 1 / 3
    for label in ("REPLUG-LSR", "ADist", "LOOP", "EMDR²"):
        assert f"| {label}: its step raises the gold's score most |" in lines[-1]
    # per batch: probe at equal scores, then at the retriever's own scores; at each, replug_step for
    # REPLUG-LSR, ADist and LOOP (in that order), descent for EMDR²
    equal, own = seen["probe"][0::2], seen["probe"][1::2]
    assert all(not args[2].any() for args, _ in equal) and all(args[2].any() for args, _ in own)
    useful = [args[3] for args, _ in own]  # the gold's place among each question's k candidates
    assert sum(map(len, useful)) == result["questions"]
    share = lambda hits: int(sum(h.sum() for h in hits)) / result["questions"]
    median = lambda calls: sorted(torch.cat([out["raise"] for _, out in calls]).tolist())[result["questions"] // 2]
    steps = {"replug": seen["replug_step"][0::3], "adist": seen["replug_step"][1::3],
             "loop": seen["replug_step"][2::3], "emdr": seen["descent"]}
    views = {"replug": [-nll for _, nll in seen["nll_per_document"]], "adist": [a for _, a in seen["adist_mass"]],
             "loop": [l for _, l in seen["loop_losses"]],
             "emdr": [-(nll * t[:, None]).sum(-1) for _, (nll, t) in seen["token_nll_per_document"]]}
    assert all(len(calls) == 2 * len(useful) for calls in steps.values())
    want = {"equal_raises_gold": share(out["raise"] > 0 for _, out in equal),
            "equal_favours_gold": share(out["favours"] == u for (_, out), u in zip(equal, useful)),
            "own_raises_gold": share(out["raise"] > 0 for _, out in own),
            "own_favours_gold": share(out["favours"] == u for (_, out), u in zip(own, useful)),
            "focus_on_gold_lowest_loss": share(out["focused"] == u for (_, out), u in zip(own, useful)),
            "retriever_ranks_gold_first": share(args[2].argmax(1) == u for (args, _), u in zip(own, useful)),
            "equal_median_raise": median(equal), "own_median_raise": median(own)}
    for m, calls in steps.items():
        for at, part in (("equal", calls[0::2]), ("own", calls[1::2])):
            want[f"{m}_{at}_raises_gold"] = share(up > 0 for _, (up, _) in part)
            want[f"{m}_{at}_favours_gold"] = share(favours == u for (_, (_, favours)), u in zip(part, useful))
        want[f"{m}_ranks_gold_first"] = share(v.argmax(1) == u for v, u in zip(views[m], useful))
    assert {key: result[key] for key in want} == want
    # the REPLUG-LSR target is softmax(-nll / beta), ADist's softmax(alpha / beta), LOOP's softmax(l_-i / beta)
    for m in ("replug", "adist", "loop"):
        for (args, _), v in zip(steps[m][0::2], views[m]):
            torch.testing.assert_close(args[1], torch.softmax(v / cfg.beta, -1))


# -----------------------------------------------------------------------------
# --runs: the table of finished runs, here of a tiny corpus trained end to end


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
    # seeds whose kept values hold different metrics are averaged on the metrics they share
    with open(os.path.join(zero.out_dir, "beir.json"), "w") as f:
        json.dump({"other dev": [{}, {"ndcg@10": {"a": 0.25, "b": 0.5}, "mrr@10": {"a": 1.0, "b": 1.0}}]}, f)
    seeds = f"{zero.out_dir}+{replug.out_dir}"
    assert f"| {seeds} | 0.5625 |" in compare.runs_table([seeds])
    assert "different dream.py" not in table  # one dream.py trained both; another is named
    path = os.path.join(zero.out_dir, "report.json")
    with open(path) as f:
        saved = json.load(f)
    saved["code"]["dream_sha256"] = "another"
    with open(path, "w") as f:
        json.dump(saved, f)
    assert f"{zero.out_dir} another" in compare.runs_table([replug.out_dir, zero.out_dir])


# -----------------------------------------------------------------------------
# --drift: how far the embeddings moved


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
