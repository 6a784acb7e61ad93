"""
The research harness: DREAM against its baselines from the same start, and the signal probe.

    python compare.py --seeds 4 --ablations normalize --out-dir out/compare
    python compare.py --methods dream --grid-heads all,loo --grid-lr 3e-5    heads as a grid dimension
    python compare.py --rebuild --out-dir out/compare   compare.md, compare.json and plots from the
                                                         saved runs; trains nothing
    python compare.py --probe [--temperature 0.2]        what the LM's signal says, before training
    python compare.py --runs out/a,out/b+out/c           a table of finished train.py runs (b+c: seeds), with intervals
    python compare.py --drift start,out/a/encoder        how far the space moved (SciFact train queries)

The grid: every method (DREAM; the label-free baselines REPLUG-LSR, ADist, LOOP, EMDR²; InfoNCE
with gold labels; --methods) trains from the same start encoder on the same questions, candidates,
steps and schedule, for each --grid-lr, (the label-free ones) each --grid-temperature, (DREAM and
ADist) each --grid-heads and (REPLUG-LSR, ADist, LOOP) each --grid-beta. Each method's settings are
chosen on dev alone: the mean nDCG@10 of QA dev (held-out SQuAD articles) and of the BEIR folders'
dev queries (SciFact's train queries), so not on four in-domain articles alone. The report: that
run and --seeds - 1 more seeds on QA test and the BEIR test sets, every row against the start
encoder and REPLUG-LSR by a paired bootstrap 95% interval over the queries. A finished run
whose settings match is reused, so a stopped grid goes on where it stopped. Every train.py flag
applies (the --small settings by default).
"""
import argparse
import dataclasses
import json
import os
import random

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

import dream
from data import beir_sets, load_data
from eval import encode, evaluate_beir, evaluate_questions, ids_and_texts, load_beir, paired_bootstrap
from config import Config, add_config_flags, load_lm, resolve_models, settings
from objectives import (adist_mass, emdr_loss, examples, lm_batch, loop_losses, nll_per_document,
                        token_nll_per_document)
from train import HEADED, choose_heads, code_version, load_encoder, train  # HEADED: the losses --grid-heads applies to

# -----------------------------------------------------------------------------
# the grid on QA dev, the report on QA test and BEIR with paired bootstrap intervals

METHODS = {"DREAM": "dream", "REPLUG-LSR": "replug", "ADist": "adist", "LOOP": "loop", "EMDR²": "emdr",
           "InfoNCE (gold labels)": "infonce"}
TARGET_TEMPERATURE = {"replug", "adist", "loop"}  # the methods whose target has a temperature tau_g (--beta)
HEADS = {"all": {"heads": "all"},  # --grid-heads: the heads DREAM biases; any other value is a --heads value
         "loo": {"heads": "auto", "head_source": "loo"},  # head_count heads ranked without labels
         "gold": {"heads": "auto", "head_source": "gold"}}  # ranked on detection_questions gold-labelled questions
READINGS = {"scale": {"reading": "scale", "hide_documents": False},  # --grid-reading: DREAM's readings,
            "set": {"reading": "set", "hide_documents": False},     # each reported as a method of its own
            "scale+hide": {"reading": "scale", "hide_documents": True},
            "set+hide": {"reading": "set", "hide_documents": True}}
ABLATIONS = {"random_heads": ("DREAM, 16 random heads", {"heads": "random"}),
             "normalize": ("DREAM, question-normalised gradient", {"normalize": "question"}),
             "k": ("DREAM, k 8", {"k": 8})}


def compare(cfg, grid_lr="3e-5,1e-4,3e-4", grid_temperature="0.05,0.2", seeds=2, ablations=(), rebuild=False,
            grid_heads="all,loo,gold", methods=tuple(METHODS.values()), grid_reading="scale", reuse_older=False,
            table="compare", grid_beta="", own_temperature=False, log=print):
    """The grid (grid_lr; grid_temperature for every label-free method; grid_heads for DREAM and
    ADist; grid_beta, tau_g, for REPLUG-LSR, ADist and LOOP, "" = cfg.beta alone; own_temperature: those
    three at grid_temperature's first tau only, so that every method tries as many temperatures) for
    every method named in `methods`, DREAM once for each reading in grid_reading (keys of
    READINGS; "DREAM" is scale, "DREAM (set)" another); each method's settings are the ones with the best dev score:
    the mean nDCG@10 of QA dev and of every BEIR folder's dev queries (SciFact's train queries), or
    QA dev alone without them. Those settings with `seeds` seeds (InfoNCE one), the start encoder
    and BM25 on QA test and the BEIR test sets; the ablations named (keys of ABLATIONS) at DREAM's
    best, on QA dev. Writes <table>.md, <table>.json, health.png and loss.png under cfg.out_dir. A
    finished run whose settings match is reused if the same dream.py trained it (reuse_older: any
    dream.py, with a warning); rebuild: every run must be there, none is trained."""
    unknown = set(ablations) - set(ABLATIONS)
    if unknown:
        raise ValueError(f"--ablations {','.join(sorted(unknown))}: choose from {','.join(ABLATIONS)}")
    if not methods or set(methods) - set(METHODS.values()) or ablations and "dream" not in methods:
        raise ValueError(f"--methods {','.join(methods)}: choose from {', '.join(METHODS.values())} (dream, for "
                         "--ablations)")
    readings = grid_reading.split(",")
    if not readings or set(readings) - set(READINGS):
        raise ValueError(f"--grid-reading {grid_reading}: choose from {','.join(READINGS)}")
    # (name, loss, reading, folder suffix): DREAM once for each reading
    methods = [(name if r == "scale" else f"{name} ({r})", loss, r, "" if r == "scale" else "_" + r.replace("+", "-"))
               for name, loss in METHODS.items() if loss in methods for r in (readings if loss == "dream" else ["scale"])]
    os.makedirs(cfg.out_dir, exist_ok=True)
    runs, today = {}, code_version()["dream_sha256"]

    def run(folder, **changes):
        c = dataclasses.replace(cfg, out_dir=os.path.join(cfg.out_dir, folder), evaluate_before=False,
                                resume=False, **changes)
        path = os.path.join(c.out_dir, "report.json")
        if os.path.exists(path):
            with open(path) as f:
                report = json.load(f)
            code = report.get("code", {})
            older = code.get("dream_sha256") != today  # numbers another dream.py gave
            # the same run wherever it and the data lie: out_dir and data_dir are places, not settings
            where = {"out_dir": "", "data_dir": ""}
            same = {**settings(report["config"]), **where} == {**dataclasses.asdict(c), **where}
            if same and (reuse_older or not older):
                log(f"{folder}: reusing {path}" + (f" (WARNING: trained by another dream.py, commit "
                                                   f"{code.get('commit')})" if older else ""))
                runs[folder] = report
                return report
            if same:
                log(f"{folder}: {path} was trained by another dream.py (commit {code.get('commit')}): "
                    "training it again (--reuse-older keeps it)")
        if rebuild:
            raise SystemExit(f"--rebuild: {path} is missing, was trained with other settings or by another "
                             "dream.py (--reuse-older takes it all the same); run without --rebuild to train it")
        log(f"--- {folder}")
        runs[folder] = train(c, log)[1]
        return runs[folder]

    sets = beir_sets(cfg, log, dev=True)
    dev_sets = [name for name, *_ in sets if name not in {n for n, *_ in beir_sets(cfg, lambda *_: None)}]

    def scored(folder):  # a grid run's BEIR dev and test sets, from its saved encoder (kept in beir.json)
        report, path = runs[folder], os.path.join(cfg.out_dir, folder, "beir.json")
        beir = {}
        if os.path.exists(path):
            with open(path) as f:
                beir = json.load(f)
        if set(beir) != {name for name, *_ in sets}:
            if rebuild:
                raise SystemExit(f"--rebuild: {path} is missing or holds other query sets; run without --rebuild")
            beir = evaluate_beir(dream.load_retriever(os.path.join(cfg.out_dir, folder, "encoder")), sets, log)
            with open(path, "w") as f:
                json.dump(beir, f)
        report["after"]["beir"] = {n: means for n, (means, _) in beir.items()}
        report["after"]["per_query"].update({n: {m: v[m] for m in ("ndcg@10", "recall@100")} for n, (_, v) in beir.items()})
        report["dev_score"] = sum([report["after"]["qa"]["dev"]["ndcg@10"]] + [report["after"]["beir"][n]["ndcg@10"]
                                   for n in dev_sets]) / (1 + len(dev_sets))
        return report

    lrs = [float(x) for x in grid_lr.split(",")]
    taus = [float(x) for x in grid_temperature.split(",")]
    betas = [float(x) for x in grid_beta.split(",")] if grid_beta else [cfg.beta]
    if own_temperature and len(betas) != len(taus):  # else one kind of method silently gets the larger grid
        raise ValueError(f"--grid-own-temperature: give --grid-beta as many tau_g as --grid-temperature has tau "
                         f"({grid_temperature}), so that every method tries as many temperatures")
    shown_beta = grid_beta or any(loss in ("adist", "loop") for _, loss, _, _ in methods)  # the grid table's tau_g
    run("start", steps=0, eval_data="none", heads="all")  # heads: only DREAM's runs use them
    grid, best = {}, {}
    for name, loss, reading, suffix in methods:
        for lr in lrs:
            for tau in ([cfg.temperature] if loss == "infonce" else
                        taus[:1] if own_temperature and loss in TARGET_TEMPERATURE else taus):
                for heads in (grid_heads.split(",") if loss in HEADED else ["all"]):
                    for beta in (betas if loss in TARGET_TEMPERATURE else [cfg.beta]):
                        folder = f"grid/{loss}{suffix}_lr{lr:g}_tau{tau:g}"
                        folder += f"_heads-{heads}" if loss in HEADED and heads != "all" else ""
                        folder += f"_beta{beta:g}" if loss in TARGET_TEMPERATURE and beta != Config.beta else ""
                        run(folder, loss=loss, lr=lr, temperature=tau, beta=beta, eval_data="none",
                            **HEADS.get(heads, {"heads": heads}), **READINGS[reading])
                        grid[folder] = (name, lr, tau, heads, beta, scored(folder))
        best[name] = max((r["dev_score"], f) for f, (n, *_, r) in grid.items() if n == name)[1]

    final = {"start encoder": [scored("start")]}
    for name, loss, reading, suffix in methods:
        _, lr, tau, heads, beta, _ = grid[best[name]]
        final[name] = [grid[best[name]][-1]] + [
            run(f"final/{loss}{suffix}_seed{cfg.seed + i}", loss=loss, lr=lr, temperature=tau, beta=beta,
                seed=cfg.seed + i, **HEADS.get(heads, {"heads": heads}), **READINGS[reading])
            for i in range(1, seeds if loss != "infonce" else 1)]
    final["BM25"] = [bm25_report(cfg, log)]
    ablation_rows = {}
    if ablations:  # at the first reading's best
        name, _, reading, suffix = next(m for m in methods if m[1] == "dream")
        _, lr, tau, heads, _, _ = grid[best[name]]
        ablation_rows = {ABLATIONS[a][0]: run(f"ablation/{a}{suffix}", lr=lr, temperature=tau, eval_data="none",
                                              **{**HEADS.get(heads, {"heads": heads}), **READINGS[reading], **ABLATIONS[a][1]})
                         for a in ablations}
    text = report_tables(cfg, grid, best, final, ablation_rows, dev_sets, shown_beta)
    with open(os.path.join(cfg.out_dir, f"{table}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out_dir, f"{table}.json"), "w") as f:
        json.dump({"best": best, "dev_sets": dev_sets,
                   "grid": {f: {"method": n, "lr": lr, "temperature": t, "heads": h, "beta": b,
                                "chosen_heads": r.get("heads"), "code": r.get("code"),
                                "dev_score": r["dev_score"], "qa": r["after"]["qa"], "beir": r["after"]["beir"],
                                "health": r.get("health")} for f, (n, lr, t, h, b, r) in grid.items()},
                   "final": {n: [{k: v for k, v in r.items() if k not in ("loss", "gold_top1_by_step")} for r in rs]
                             for n, rs in final.items()}}, f, indent=1)
    plot(grid, final, cfg.out_dir)
    log(text)
    return final


def bm25_report(cfg, log):
    """BM25 on the same QA questions over the same passages, and on the BEIR sets, as a run report
    (kept in out_dir/bm25.json and reused while the settings are the same)."""
    path = os.path.join(cfg.out_dir, "bm25.json")
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        if settings(report["config"]) == dataclasses.asdict(cfg):
            return report
    lm_name, _ = resolve_models(cfg, log)
    _, tok = load_lm(lm_name, log)
    _, dev_qs, test_qs, passages, _ = load_data(cfg, tok, lambda *_: None)
    qa = evaluate_questions(None, {"dev": dev_qs, "test": test_qs}, passages)
    beir = evaluate_beir(None, beir_sets(cfg, log), lambda *_: None)
    report = {"config": dataclasses.asdict(cfg),
              "after": {"qa": {n: m for n, (m, _) in qa.items()}, "beir": {n: m for n, (m, _) in beir.items()},
                        "per_query": {n: {m: v[m] for m in ("ndcg@10", "recall@100")}
                                      for n, (_, v) in [*qa.items(), *beir.items()]}}}
    with open(path, "w") as f:
        json.dump(report, f)
    return report


def seed_mean(reports):
    """Per-query values averaged over a method's seeds (one report: itself), on the query sets and
    metrics they share (a grid run's beir.json keeps more metrics than a report)."""
    first = reports[0]["after"]["per_query"]
    shared = [s for s in first if all(s in r["after"]["per_query"] for r in reports)]
    return {s: {m: {q: sum(r["after"]["per_query"][s][m][q] for r in reports) / len(reports) for q in first[s][m]}
                for m in first[s] if all(m in r["after"]["per_query"][s] for r in reports)} for s in shared}


def report_tables(cfg, grid, best, final, ablation_rows, dev_sets=(), shown_beta=False):
    """compare.md: the grid on dev, then QA test and BEIR test with paired bootstrap 95% intervals
    of each method's difference to the start encoder, to REPLUG-LSR and, where other readings or
    other label-free objectives ran, to DREAM (their seeds averaged per query). shown_beta: the grid
    has a tau_g column."""
    chosen_on = " and ".join(["QA dev"] + list(dev_sets))
    lines = [f"## The grid (nDCG@10 on dev; each method's best dev score, the mean of {chosen_on}, in bold, is "
             "the one reported)", "",
             "| method | lr | tau | " + ("tau_g | " if shown_beta else "") + "heads | QA dev nDCG@10 | " +
             "".join(f"{n} nDCG@10 | " for n in dev_sets) +
             "dev score | QA dev R@100 | health (QA dev nDCG@10, small pool) by step | s/step |",
             "|---|---|---|---|---|" + "---|" * (len(dev_sets) + bool(shown_beta)) + "---|---|---|---|"]
    for folder, (name, lr, tau, heads, beta, r) in grid.items():
        dev = r["after"]["qa"]["dev"]
        value = f"**{r['dev_score']:.4f}**" if best[name] == folder else f"{r['dev_score']:.4f}"
        health = " ".join(f"{v:.3f}" for _, v in r.get("health", []))
        tau_g = (f"{beta:g} | " if r["config"]["loss"] in TARGET_TEMPERATURE else " | ") if shown_beta else ""
        headed = name.startswith("DREAM") or r["config"]["loss"] in HEADED
        lines.append(f"| {name} | {lr:g} | {tau:g} | {tau_g}{heads if headed else ''} | {dev['ndcg@10']:.4f} | " +
                     "".join(f"{r['after']['beir'][n]['ndcg@10']:.4f} | " for n in dev_sets) +
                     f"{value} | {dev['recall@100']:.4f} | {health} | {r.get('seconds_per_step', 0):.2f} |")
    sets = ["test"] + [n for n in final["start encoder"][0]["after"]["beir"] if n not in dev_sets]
    base = seed_mean(final["start encoder"])
    # every row against the start encoder and, for nDCG@10, REPLUG-LSR and (with other readings) DREAM
    others = [m for m in final if m.startswith("DREAM (") or m in ("ADist", "LOOP", "EMDR²")]
    versus = [n for n in ("REPLUG-LSR", "DREAM") if n in final and (n == "REPLUG-LSR" or others)]
    means = {n: seed_mean(final[n]) for n in versus}
    for s in sets:
        label = "QA test" if s == "test" else s
        lines += ["", f"## {label} ({len(base[s]['ndcg@10'])} queries): mean and, in brackets, the paired "
                  "bootstrap 95% interval of the difference", "",
                  "| method | seed | nDCG@10 | vs start encoder | " + "".join(f"vs {n} | " for n in versus) +
                  "R@100 | vs start encoder |", "|---|---|---|---|" + "---|" * len(versus) + "---|---|"]
        for name, reports in final.items():
            rows = [(str(r["config"]["seed"]) if name != "BM25" else "", r["after"]["per_query"]) for r in reports]
            if len(reports) > 1:
                rows.append(("mean", seed_mean(reports)))
            for seed, per_query in rows:
                cells = [name, seed]
                for m in ("ndcg@10", "recall@100"):
                    values = per_query[s][m]
                    cells.append(f"{sum(values.values()) / len(values):.4f}")
                    for other in ["start encoder"] + (versus if m == "ndcg@10" else []):
                        d = None if name == other else paired_bootstrap(
                            values, (base if other == "start encoder" else means[other])[s][m], seed=0)
                        cells.append("" if d is None else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
                lines.append("| " + " | ".join(cells) + " |")
    if ablation_rows:
        lines += ["", "## Ablations at DREAM's best settings (QA dev)", "", "| run | QA dev nDCG@10 | QA dev R@100 |",
                  "|---|---|---|"]
        for name, r in ablation_rows.items():
            dev = r["after"]["qa"]["dev"]
            lines.append(f"| {name} | {dev['ndcg@10']:.4f} | {dev['recall@100']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(grid, final, out_dir):
    """health.png: QA dev nDCG@10 (small pool) during each grid run; loss.png: the reported runs'
    training loss (a moving average over a tenth of the run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = [name for name in final if name not in ("start encoder", "BM25")]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
    for ax, name in zip(axes[0], methods):
        for folder, (n, lr, tau, heads, beta, r) in grid.items():
            if n == name and r.get("health"):
                ax.plot(*zip(*r["health"]), marker="o",
                        label=f"lr {lr:g}, tau {tau:g}" + (f", heads {heads}" if name.startswith("DREAM") else ""))
        ax.set(title=f"{name}: health", xlabel="step", ylabel="QA dev nDCG@10 (small pool)")
        if ax.get_legend_handles_labels()[0]:  # runs without health checks draw nothing
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "health.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
    for ax, name in zip(axes[0], methods):
        for r in final[name]:
            steps, losses = zip(*r["loss"])
            w = max(1, len(losses) // 10)
            ax.plot(steps, [sum(losses[max(0, i - w + 1):i + 1]) / len(losses[max(0, i - w + 1):i + 1])
                            for i in range(len(losses))], label=f"seed {r['config']['seed']}")
        ax.set(title={"DREAM": "DREAM: target cross-entropy", "REPLUG-LSR": "REPLUG-LSR: KL(Q || P_R)",
                      "ADist": "ADist: KL(Q || P_R)", "LOOP": "LOOP: KL(Q || P_R)",
                      "EMDR²": "EMDR²: -log sum_i P_R(d_i) p_LM(y_t | d_i)"}.get(name, name),
               xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# a table of runs already trained: python compare.py --runs out/a,out/b


def runs_table(names):
    """Markdown: every query set the runs share, nDCG@10 of each run, with paired bootstrap 95%
    intervals of its difference to the first run and to the start encoder (the first run that
    evaluated it before training, or a run of 0 steps, as compare.py's start; the column is left out
    where none did). "a+b" is one method's seeds, averaged per query. A run folder's beir.json (a grid
    run's BEIR sets, as compare() writes it) adds its query sets."""
    groups = {name: name.split("+") for name in names}
    reports = {}
    for folder in [f for group in groups.values() for f in group]:
        with open(os.path.join(folder, "report.json")) as f:
            reports[folder] = json.load(f)
        beir = os.path.join(folder, "beir.json")  # a grid run's BEIR dev and test sets, kept apart
        if os.path.exists(beir):
            with open(beir) as f:
                reports[folder]["after"]["per_query"].update({n: v for n, (_, v) in json.load(f).items()})
    start = next((r.get("before", r["after"])["per_query"] for r in reports.values()
                  if "before" in r or r["config"]["steps"] == 0), None)
    rows = {name: seed_mean([reports[f] for f in group]) for name, group in groups.items()}
    rows = {**({"start encoder": start} if start is not None else {}), **rows}
    first = rows[names[0]]
    versus = [(names[0], first)] + ([("start encoder", start)] if start is not None else [])
    lines = []
    for s in [s for s in first if all(s in per_query for per_query in rows.values())]:
        lines += ["", f"{s} ({len(first[s]['ndcg@10'])} queries): nDCG@10, and the paired bootstrap 95% interval of "
                  f"the difference", "", "| " + " | ".join(["run", "nDCG@10"] + [f"vs {n}" for n, _ in versus]) + " |",
                  "|---|---|" + "---|" * len(versus)]
        for name, per_query in rows.items():
            values = per_query[s]["ndcg@10"]
            cells = [name, f"{sum(values.values()) / len(values):.4f}"]
            for _, other in versus:
                d = None if other is per_query else paired_bootstrap(values, other[s]["ndcg@10"], seed=0)
                cells.append("" if d is None else f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]")
            lines.append("| " + " | ".join(cells) + " |")
    if start is None:
        lines += ["", "No run evaluated its start encoder (train without --no-evaluate-before, or add a run of "
                  "--steps 0): no column against it."]
    code = {folder: r.get("code", {}).get("dream_sha256") for folder, r in reports.items()}
    if len(set(code.values())) > 1 or None in code.values():  # said, not hidden: numbers of other code
        lines += ["", "Trained by different dream.py versions (sha256 prefix; none: not recorded): " +
                  ", ".join(f"{folder} {sha}" for folder, sha in code.items())]
    return "\n".join(lines[1:]) + "\n"


# -----------------------------------------------------------------------------
# how the space moved: python compare.py --drift out/a/encoder,out/b/encoder --drift-data DIR


def drift(encoders, folder, split="train", start="", queries=300, docs=600, seed=0):
    """Markdown: for each encoder (a folder, a hub name; "start" = start, the start encoder), on
    a fixed random sample of a BEIR folder's judged queries (each with its first judged document) and of
    its other documents, the mean cosine of a query to its judged document, to a random document, of two
    random documents, and how often the judged document is above every random one."""
    corpus, texts, qrels = load_beir(folder, split)
    rng = random.Random(seed)
    qids = rng.sample(sorted(qrels), min(queries, len(qrels)))
    judged = [next(iter(qrels[q])) for q in qids]
    rest = sorted(set(corpus) - set(judged))
    others = rng.sample(rest, min(docs, len(rest)))
    lines = ["| encoder | cos(query, judged) | cos(query, random) | cos(doc, doc) | judged first |",
             "|---|---|---|---|---|"]
    for name in encoders:
        model = SentenceTransformer(start if name == "start" else name)
        q = encode(model, [texts[i] for i in qids], task="query")
        g = encode(model, ids_and_texts([corpus[d] for d in judged])[1], task="document")
        o = encode(model, ids_and_texts([corpus[d] for d in others])[1], task="document")
        to_judged, to_other, pairs = (q * g).sum(1), q @ o.T, o @ o.T
        doc_doc = (pairs.sum() - pairs.diagonal().sum()) / (len(o) * (len(o) - 1))
        first = (to_other < to_judged[:, None]).all(1).float().mean()
        lines.append(f"| {name} | {to_judged.mean():.4f} | {to_other.mean():.4f} | {doc_doc:.4f} | {first:.3f} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the signal probe: before training, does one step on the DREAM loss pull the gold passage up?


# the label-free baselines the probe measures beside DREAM: (name, what "ranks the gold first" means)
BASELINES = {"replug": ("REPLUG-LSR", "the gold alone, the lowest loss"),
             "adist": ("ADist", "the gold gets the most attention"),
             "loop": ("LOOP", "removing the gold raises the loss most"),
             "emdr": ("EMDR²", "the gold alone, the likeliest target (REPLUG-LSR's)")}


def probe(lm, batch, scores, useful, heads="all", temperature=0.05, focus=5.0, prefix=None, **reading):
    """What the training signal says about each example's useful document (useful: [B] indices
    among its k), at the given scores [B, k]. Returns [B] tensors:
      raise:   the first-order change of p(useful) = softmax(s/tau)[useful] along a unit step of
               descent on the DREAM loss (> 0: the step pulls the useful document up)
      favours: the document whose score the descent step raises most
      focused: the document whose bias focused on it (s/tau = focus there, 0 elsewhere) gives the
               lowest loss: where the LM itself would look
    reading: dream_loss's reading and hide_documents."""
    B, k = scores.shape
    prefix = dream.encode_prefix(lm, batch) if prefix is None else prefix
    s = scores.detach().float().requires_grad_()
    grad, = torch.autograd.grad(dream.dream_loss(lm, batch, s, heads, temperature, prefix=prefix, **reading), s)
    p = F.softmax(s.detach() / temperature, -1)
    p_useful = p.gather(1, useful[:, None])[:, 0]
    # d p_u / d s = p_u (e_u - p) / tau, dotted with the unit descent direction -grad / |grad|
    slope = -(grad.gather(1, useful[:, None])[:, 0] - (p * grad).sum(1)) * p_useful / temperature
    with torch.no_grad():
        focused = torch.stack([dream.dream_loss(lm, batch, temperature * focus * F.one_hot(torch.full((B,), i), k).to(s),
                                                heads, temperature, reduction="none", prefix=prefix, **reading)
                               for i in range(k)], 1)
    return {"raise": slope / grad.norm(dim=1).clamp(min=1e-30), "favours": (-grad).argmax(1),
            "focused": focused.argmin(1)}


def signal_probe(cfg, questions=64, log=print):
    """python compare.py --probe: before training, what the LM's signal says on dev questions whose
    gold passage is among their candidates, at equal scores and at the retriever's own scores. With
    --corpus alone (no gold) and --corpus-siblings: the held-out corpus examples (first among the
    dev questions), their sibling (a passage of their own document) in the gold's place."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm_name, encoder_name = resolve_models(cfg, log)
    lm, tok = load_lm(lm_name, log, device=device)
    retriever = load_encoder(dataclasses.replace(cfg, lora=0, train_side="both"), encoder_name, device)  # its prompts
    train_qs, dev_qs, _, passages, doc_ids = load_data(cfg, tok, log)
    os.makedirs(cfg.out_dir, exist_ok=True)
    heads = choose_heads(cfg, lm, tok, train_qs, passages, log)
    kind = "gold" if dev_qs and dev_qs[0]["gold"] is not None else "sibling"  # --corpus alone: no gold
    qs = [q for q in dev_qs if q.get(kind) is not None and q[kind] in q["candidates"]][:questions]
    if not qs:
        raise ValueError("--probe: no dev question has its gold passage among its candidates (with --corpus "
                         "alone, none has one: give --corpus-siblings 1, and the sibling is asked about)")
    # LOOP removes one of the k and compares what is left: it needs k >= 3
    baselines = {m: labels for m, labels in BASELINES.items() if m != "loop" or cfg.k >= 3}
    seen = {key: [] for key in ("equal raise", "equal favours", "own raise", "own favours", "focused", "retriever",
                                *(f"{m}{at}" for m in baselines for at in ("", " equal raise", " equal favours",
                                                                           " own raise", " own favours")))}
    lm_cfg = dataclasses.replace(cfg, heads=heads)
    for i in tqdm(range(0, len(qs), cfg.batch_size), desc="probe"):
        idx = range(i, min(i + cfg.batch_size, len(qs)))
        q, d, _ = examples(qs, passages, idx)
        batch = lm_batch(tok, qs, doc_ids, idx, cfg).to(device)
        useful = torch.tensor([qs[j]["candidates"].index(qs[j][kind]) for j in idx], device=device)
        prefix = dream.encode_prefix(lm, batch)
        with torch.no_grad():
            own = dream.score(retriever, q, d)
            # each baseline's view of the candidates: higher is the document it pulls up
            views = {"replug": -nll_per_document(lm, tok, qs, doc_ids, idx, cfg, device),
                     "adist": adist_mass(lm, batch, lm_cfg)}
            if "loop" in baselines:
                views["loop"] = loop_losses(lm, tok, qs, doc_ids, idx, cfg, device)
            token_nll = token_nll_per_document(lm, tok, qs, doc_ids, idx, cfg, device)
            views["emdr"] = -(token_nll[0] * token_nll[1][:, None]).sum(-1)  # log p_LM(y | d_i, q): its posterior
        for name, scores in (("equal", torch.zeros_like(own)), ("own", own)):
            out = probe(lm, batch, scores, useful, heads, cfg.temperature, prefix=prefix, reading=cfg.reading,
                        hide_documents=cfg.hide_documents)
            seen[f"{name} raise"] += out["raise"].tolist()
            seen[f"{name} favours"] += (out["favours"] == useful).tolist()
            for m in baselines:
                if m == "emdr":
                    up, favours = descent(lambda s: emdr_loss(s, *token_nll, cfg.temperature), scores, useful,
                                          cfg.temperature)
                else:
                    up, favours = replug_step(scores, F.softmax(views[m] / cfg.beta, -1), useful, cfg.temperature)
                seen[f"{m} {name} raise"] += up.tolist()
                seen[f"{m} {name} favours"] += (favours == useful).tolist()
        seen["focused"] += (out["focused"] == useful).tolist()
        for m in baselines:
            seen[m] += (views[m].argmax(1) == useful).tolist()
            seen[f"{m} spread"] = seen.get(f"{m} spread", []) + (views[m].amax(1) - views[m].amin(1)).tolist()
        seen["retriever"] += (own.argmax(1) == useful).tolist()
    share = lambda key: sum(v > 0 for v in seen[key]) / len(qs)
    median = lambda key: sorted(seen[key])[len(qs) // 2]
    result = {"questions": len(qs), "k": cfg.k, "temperature": cfg.temperature, "beta": cfg.beta, "heads": heads,
              "reading": cfg.reading, "hide_documents": cfg.hide_documents,
              "equal_raises_gold": share("equal raise"), "equal_median_raise": median("equal raise"),
              "equal_favours_gold": share("equal favours"), "own_raises_gold": share("own raise"),
              "own_median_raise": median("own raise"), "own_favours_gold": share("own favours"),
              "focus_on_gold_lowest_loss": share("focused"),
              **{key: share(f"{m}{at}") for m in baselines for key, at in (
                  (f"{m}_ranks_gold_first", ""), (f"{m}_equal_raises_gold", " equal raise"),
                  (f"{m}_equal_favours_gold", " equal favours"), (f"{m}_own_raises_gold", " own raise"),
                  (f"{m}_own_favours_gold", " own favours"))},
              "retriever_ranks_gold_first": share("retriever"), "chance_first": 1 / cfg.k,
              # how far apart each target's candidates lie before / beta: what sets a tau_g
              **{f"{m}_median_spread": median(f"{m} spread") for m in baselines}}
    rows = [("a descent step raises p(gold)", result["equal_raises_gold"], result["own_raises_gold"], "0.50"),
            ("  its median size (dp(gold) per unit step)", result["equal_median_raise"], result["own_median_raise"], ""),
            ("the step raises the gold's score most", result["equal_favours_gold"], result["own_favours_gold"],
             f"{1 / cfg.k:.2f}"),
            ("bias focused on the gold: the lowest loss", result["focus_on_gold_lowest_loss"], None, f"{1 / cfg.k:.2f}")]
    for m, (label, first) in baselines.items():
        rows += [(f"{label}: {first}", result[f"{m}_ranks_gold_first"], None, f"{1 / cfg.k:.2f}"),
                 (f"{label}: its step raises p(gold)", result[f"{m}_equal_raises_gold"], result[f"{m}_own_raises_gold"],
                  "0.50"),
                 (f"{label}: its step raises the gold's score most", result[f"{m}_equal_favours_gold"],
                  result[f"{m}_own_favours_gold"], f"{1 / cfg.k:.2f}")]
    rows.append(("the retriever ranks the gold first", None, result["retriever_ranks_gold_first"], f"{1 / cfg.k:.2f}"))
    fmt = lambda v: "" if v is None else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
    lines = [f"signal probe: {len(qs)} dev questions with the {kind} "
             f"among k = {cfg.k} candidates, tau = {cfg.temperature}, reading {cfg.reading}"
             + (", the documents hidden from the other heads" if cfg.hide_documents else ""),
             "| | equal scores | retriever's scores | chance |", "|---|---|---|---|"]
    lines += [f"| {label} | {fmt(a)} | {fmt(b)} | {c} |" for label, a, b, c in rows]
    log("\n".join(lines))
    with open(os.path.join(cfg.out_dir, "probe.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def descent(loss_of_scores, scores, useful, temperature):
    """Any loss's descent step on the scores [B, k] (autograd), reported as replug_step reports its own."""
    s = scores.detach().float().requires_grad_()
    grad, = torch.autograd.grad(loss_of_scores(s), s)
    p = F.softmax(s.detach() / temperature, -1)
    step = -F.normalize(grad, dim=-1)
    p_useful = p.gather(1, useful[:, None])[:, 0]
    return p_useful * (step.gather(1, useful[:, None])[:, 0] - (p * step).sum(1)) / temperature, step.argmax(1)


def replug_step(scores, target, useful, temperature):
    """REPLUG-LSR's descent step on the scores [B, k] for the LM's target distribution Q [B, k]:
    (the first-order change of p(useful) along a unit step, the document whose score it raises
    most), as probe reports them for DREAM. d KL(Q || softmax(s/tau)) / ds = (p - Q) / tau."""
    p = F.softmax(scores / temperature, -1)
    step = F.normalize(target - p, dim=-1)
    p_useful = p.gather(1, useful[:, None])[:, 0]
    return p_useful * (step.gather(1, useful[:, None])[:, 0] - (p * step).sum(1)) / temperature, step.argmax(1)


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, every flag's default shown."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--probe", action="store_true", help="measure the training signal before training "
                        "(a table and one JSON line)")
    parser.add_argument("--probe-questions", type=int, default=64,
                        help="--probe: dev questions whose gold passage is among their candidates")
    parser.add_argument("--rebuild", action="store_true", help="tables and plots from the saved runs; train nothing")
    parser.add_argument("--runs", help="comma-separated out_dirs of finished train.py runs (a+b: one method's "
                        "seeds, averaged per query): their table, with intervals against the first and the start encoder")
    parser.add_argument("--drift", help="comma-separated encoders (folders; start = the start encoder): how "
                        "their space moved on --drift-data's judged queries (mean cosines)")
    parser.add_argument("--drift-data", default="", help="--drift: a BEIR folder and its --drift-split "
                        "(default: %(default)r, <data_dir>/scifact)")
    parser.add_argument("--drift-split", default="train", help="--drift: the qrels split whose queries it reads")
    parser.add_argument("--grid-lr", default="3e-5,1e-4,3e-4", help="every method tries these on QA dev")
    parser.add_argument("--grid-temperature", default="0.05,0.2", help="and every label-free method these")
    parser.add_argument("--grid-beta", default="", help="and REPLUG-LSR, ADist and LOOP these tau_g (default: "
                        "%(default)r, --beta alone)")
    parser.add_argument("--grid-own-temperature", action="store_true", help="each method its own temperature: tau "
                        "(DREAM, EMDR²) from --grid-temperature, tau_g (REPLUG-LSR, ADist, LOOP) from --grid-beta at "
                        "--grid-temperature's first: every method the same grid size")
    parser.add_argument("--grid-heads", default="all,loo,gold", help="and DREAM and ADist these heads: all; loo or gold, "
                        "--head-count heads ranked without labels or on --detection-questions gold-labelled "
                        "questions; or any --heads value")
    parser.add_argument("--methods", default=",".join(METHODS.values()), help="the methods to run (dream, replug, "
                        "adist, loop, emdr, infonce)")
    parser.add_argument("--grid-reading", default="scale", help=f"DREAM's readings, each a method of its own "
                        f"({', '.join(READINGS)}; +hide: the documents hidden from the other heads)")
    parser.add_argument("--table", default="compare", help="the grid's table is written to <out-dir>/TABLE.md "
                        "and TABLE.json (another name: two tables of one folder's runs)")
    parser.add_argument("--reuse-older", action="store_true", help="reuse a finished run that another dream.py "
                        "trained (with a warning) rather than train it again")
    parser.add_argument("--seeds", type=int, default=2, help="DREAM and REPLUG-LSR at their best, this many seeds")
    parser.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                        help=f"these ablations at DREAM's best, or all of them ({','.join(ABLATIONS)}) "
                        f"(default: %(default)r, none)")
    args = add_config_flags(parser, out_dirs=("out/compare", "out/compare-decoder")).parse_args()
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    torch.set_num_threads(os.cpu_count() or 1)
    if args.runs:
        print(runs_table(args.runs.split(",")), end="")
    elif args.drift:
        print(drift(args.drift.split(","), args.drift_data or os.path.join(cfg.data_dir, "scifact"), args.drift_split,
                    start=resolve_models(cfg, print)[1]), end="")
    elif args.probe:
        signal_probe(cfg, args.probe_questions)
    else:
        compare(cfg, args.grid_lr, args.grid_temperature, args.seeds, [a for a in args.ablations.split(",") if a],
                args.rebuild, args.grid_heads, args.methods.split(","), args.grid_reading, args.reuse_older, args.table,
                args.grid_beta, args.grid_own_temperature)


if __name__ == "__main__":
    main()
