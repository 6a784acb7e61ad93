"""train.py (and config.py, objectives.py): a resumed run ends with the weights of an uninterrupted
one, a NaN loss stops with the checkpoint intact, bad data names its file and line, checkpoints keep
the random state; the step losses (REPLUG-LSR, question normalisation, centred scores) are what they
say, in fp32 under bf16 autocast; --decoder trains a LoRA retriever from the LM; --train-side query
keeps every document embedding; two torchrun processes train as one; every flag explains itself.
"""
import dataclasses
import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

import compare
import config
import data
import dream
import eval as beir_eval
import objectives
import train
from conftest import (TOK, WORLD, encoded, tiny_encoder_folder, tiny_lm, tiny_training_setup, toy_batch,
                      toy_questions)


# -----------------------------------------------------------------------------
# checkpoints, resume, faults (tiny models, tiny data)


def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    cfg = tiny_training_setup(tmp_path)
    quiet = lambda *_: None
    whole, _ = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")), log=quiet)

    # dream_loss's calls before the first step: the start encoder's validation loss would make one a batch
    # of its questions, math.ceil(min(cfg.dev_questions, cfg.val_loss_questions) / cfg.batch_size), but the
    # whole run above left that evaluation in the cache (out_dir is no part of its key): reused, none
    before_training = 0
    real_loss, calls, logged = dream.dream_loss, [], []
    def killed_at_step_4(*args, **kwargs):  # steps 0..3 run, then the process "dies"
        calls.append(1)
        if len(calls) > before_training + 4:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(dream, "dream_loss", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, log=logged.append)
    monkeypatch.setattr(dream, "dream_loss", real_loss)
    assert any("the start encoder: evaluation reused" in line for line in logged)
    assert len(calls) == before_training + 4 + 1  # steps 0..3, and step 4's call that "died"
    assert torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=False)["step"] == 3
    real_machine = train.machine()  # resumed elsewhere: the machine it started on is kept, the other said
    monkeypatch.setattr(train, "machine", lambda: {**real_machine, "cpu": "another CPU"})
    resumed, report = train.train(dataclasses.replace(cfg, resume=True), log=logged.append)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert report["machine"] == real_machine and report["machine_resumed"]["cpu"] == "another CPU"
    assert any("resumed on another machine" in line for line in logged)
    # the seconds a step average the steps before the crash too (a resume that only evaluates: not 0)
    assert len(report["step_seconds"]) == cfg.steps and all(t > 0 for t in report["step_seconds"])
    assert report["seconds_per_step"] == pytest.approx(sum(report["step_seconds"]) / cfg.steps)
    key = "0.model.embeddings.word_embeddings.weight"
    assert not torch.equal(whole.state_dict()[key], dream.load_retriever(cfg.encoder).state_dict()[key])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_training_setup(tmp_path)
    # dream_loss's calls before the first step: the start encoder's validation loss, one call a batch of
    # its questions (the first val_loss_questions dev questions); then one a step, step 4 the fifth
    before_training = math.ceil(min(cfg.dev_questions, cfg.val_loss_questions) / cfg.batch_size)
    real_loss, calls = dream.dream_loss, []
    def nan_at_step_4(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == before_training + 4 + 1 else loss
    monkeypatch.setattr(dream, "dream_loss", nan_at_step_4)
    with pytest.raises(SystemExit, match=r"step 4: the loss is nan.*checkpoint is intact: .*ckpt.pt \(step 3\)"):
        train.train(cfg, log=lambda *_: None)
    ckpt = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["retriever"].values()
                                     if v.is_floating_point())


def test_resume_refuses_other_settings(tmp_path):
    cfg = tiny_training_setup(tmp_path)
    train.train(dataclasses.replace(cfg, steps=3), log=lambda *_: None)
    with pytest.raises(SystemExit, match="other settings.*'lr': \\(0.001, 0.01\\)"):
        train.train(dataclasses.replace(cfg, steps=3, lr=1e-2, resume=True), log=lambda *_: None)


def test_checkpoints_keep_the_gpu_random_state_too(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(state.tolist()))
    state = train.rng_state(cuda)
    assert set(state) == {"cpu", "cuda"} and set(train.rng_state(cpu)) == {"cpu"}
    torch.rand(3)
    train.set_rng_state(state, cuda)
    assert restored == [[7]] and torch.equal(torch.get_rng_state(), state["cpu"])
    train.set_rng_state(state["cpu"], cpu)  # an older checkpoint's lone CPU state still resumes on a CPU
    with pytest.raises(SystemExit, match="keeps no GPU random state"):
        train.set_rng_state(state["cpu"], cuda)


def test_training_data_errors_name_the_file_and_line(tmp_path):
    cfg = tiny_training_setup(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q1", "target": "v1"}\n{"query": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: malformed JSON"):
        data.load_questions(dataclasses.replace(cfg, train_data=str(bad)), TOK, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl not found: --train-data takes"):
        data.load_questions(dataclasses.replace(cfg, train_data=str(tmp_path / "missing.jsonl")), TOK,
                             log=lambda *_: None)
    with pytest.raises(ValueError, match="give --corpus"):
        data.load_questions(dataclasses.replace(cfg, corpus=""), TOK, log=lambda *_: None)


# -----------------------------------------------------------------------------
# the step losses: REPLUG-LSR, question-normalised DREAM, centred scores; fp32 under bf16 autocast


def test_replug_matches_the_lm_per_document_and_pulls_every_candidate(tmp_path):
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), loss="replug", k=3, beta=0.5)
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    questions, doc_ids = toy_questions(queries, docs, targets)
    nll = objectives.nll_per_document(lm, TOK, questions, doc_ids, [0, 1, 2], cfg, "cpu")
    for b in range(3):
        for i in range(3):  # the LM alone, one document in its context
            alone = dream.pack(TOK, [queries[b]], [[docs[b][i]]], [targets[b]])
            logits = lm(input_ids=alone.input_ids).logits[0, :-1]
            want = F.cross_entropy(logits, alone.labels[0, 1:], ignore_index=-100)
            assert abs(nll[b, i].item() - want.item()) <= 1e-5
    scores = torch.zeros(3, 3, requires_grad=True)
    passages = {j: "" for j in doc_ids}  # the retriever below ignores the texts
    loss, _ = objectives.step_loss(cfg, lm, TOK, lambda q, d: scores * 1.0, questions, passages, doc_ids, [0, 1, 2], "cpu")
    loss.backward()
    q = F.softmax(-nll / cfg.beta, -1)
    assert abs(loss.item() - (q * (q.log() + math.log(3))).sum(-1).mean().item()) <= 1e-5  # KL(Q || uniform)
    assert (scores.grad != 0).all()  # every candidate's score is pulled, not only the last one's


def test_code_version_is_read_once_a_process(monkeypatch):
    first = train.code_version()  # a later commit or edit in the checkout does not rename what runs
    monkeypatch.setattr(train.subprocess, "run", lambda *a, **k: pytest.fail("git read again"))
    monkeypatch.setattr(train.dream, "__file__", "/nonexistent/dream.py")
    assert train.code_version() == first and first["dream_sha256"]


def test_only_the_losses_that_read_heads_rank_them(tmp_path, monkeypatch):
    ranked = []
    monkeypatch.setattr(train, "detect_heads", lambda cfg, *_: ranked.append(cfg.loss) or "0-0")
    for loss in ("replug", "loop", "emdr", "infonce", "dream", "adist"):
        cfg = dataclasses.replace(tiny_training_setup(tmp_path), loss=loss, heads="auto")
        run = train.setup(cfg, lambda *_: None)
        assert run.cfg.heads == ("0-0" if loss in ("dream", "adist") else "all")
    assert ranked == ["dream", "adist"]


def test_question_normalised_dream_gives_every_question_a_unit_gradient(tmp_path):
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), k=3, normalize="question")
    lm = dream.prepare_lm(tiny_lm("llama"))
    queries, docs, targets = toy_batch()
    questions, doc_ids = toy_questions(queries, docs, targets)
    passages = {j: "" for j in doc_ids}
    scores = torch.tensor([[0.1, 0.0, -0.1], [0.2, 0.3, 0.0], [0.0, 0.0, 0.1]], requires_grad=True)
    loss, _ = objectives.step_loss(cfg, lm, TOK, lambda q, d: scores * 1.0, questions, passages, doc_ids, [0, 1, 2], "cpu")
    loss.backward()
    plain = scores.detach().requires_grad_()
    want = dream.dream_loss(lm, dream.pack(TOK, queries, docs, targets), plain)
    assert abs(loss.item() - want.item()) <= 1e-6  # the value is the DREAM loss
    g, = torch.autograd.grad(want, plain)
    torch.testing.assert_close(scores.grad, g / g.norm(dim=1, keepdim=True) / 3)  # its direction, unit per question


def test_centred_scores_take_off_what_the_other_queries_give_each_document(tmp_path):
    torch.manual_seed(0)
    e = F.normalize(torch.randn(3 + 6, 8), dim=-1)
    model = lambda queries, docs: (e[[int(t) for t in queries]], e[[int(t) for t in docs]])
    queries, docs = ["0", "1", "2"], [["3", "4"], ["5", "6"], ["7", "8"]]
    s = e[:3] @ e[3:].T  # every query against every document
    want = torch.tensor([[s[b, 2 * b + j] - (s[:, 2 * b + j].sum() - s[b, 2 * b + j]) / 2 for j in range(2)]
                         for b in range(3)])
    torch.testing.assert_close(objectives.centered_scores(model, queries, docs), want)
    e[1], e[2] = e[0], e[0]  # every query alike: what each gives a document, the others give it too
    assert objectives.centered_scores(model, queries, docs).abs().max() < 1e-6
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), center=True, batch_size=1)
    with pytest.raises(ValueError, match="--center.*--batch-size 1"):
        train.train(cfg)


def test_scores_centring_and_infonce_logits_stay_fp32_under_bf16_autocast(tmp_path):
    retriever = dream.load_retriever(tiny_encoder_folder(tmp_path))
    queries, docs, _ = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dream.score(retriever, queries, docs).dtype == torch.float32
    e = F.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    # fixed fp32 embeddings: only the products differ
    model = lambda queries, docs: (e[:len(queries)], e[len(queries):len(queries) + len(docs)])
    fp32 = objectives.centered_scores(model, queries, docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        centred = objectives.centered_scores(model, queries, docs)
    assert centred.dtype == torch.float32 and torch.equal(centred, fp32)
    qs = [{"query": q, "gold": 0, "candidates": [0, 1, 2]} for q in queries]
    cfg = config.Config(k=3, temperature=0.05)
    loss = objectives.infonce_loss(cfg, model, qs, ["a", "b", "c"], [0, 1, 2])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(objectives.infonce_loss(cfg, model, qs, ["a", "b", "c"], [0, 1, 2])[0], loss)


# -----------------------------------------------------------------------------
# --decoder: the paper's retriever, a LoRA on the LM itself


def test_decoder_preset_sets_the_paper_retriever_and_flags_given_win():
    _, cfg = train.parse_args(["--decoder"])
    assert (cfg.encoder, cfg.pooling, cfg.lora, cfg.lr, cfg.out_dir) == ("lm", "last", 16, 1e-3, "out/decoder")
    assert (cfg.query_prompt, cfg.document_prompt) == ("query: ", "passage: ")  # both dev signals' choice
    _, cfg = train.parse_args(["--decoder", "--query-prompt", "", "--document-prompt", ""])  # the runs before
    assert (cfg.query_prompt, cfg.document_prompt) == ("", "")
    _, cfg = train.parse_args(["--decoder", "--lr", "3e-5", "--out-dir", "mine", "--lora=4"])
    assert (cfg.encoder, cfg.lr, cfg.out_dir, cfg.lora) == ("lm", 3e-5, "mine", 4)
    _, cfg = train.parse_args(["--small"])
    assert (cfg.encoder, cfg.pooling, cfg.lora, cfg.out_dir) == ("auto", "", 0, "out/small")
    quiet = lambda *_: None
    gguf = os.path.join("pkg", "SmolLM2-135M-Instruct.Q4_1.gguf")  # the retriever: the folder load_lm converts it to
    assert config.resolve_models(dataclasses.replace(cfg, lm=gguf, encoder="lm"), quiet)[1] == config.converted(gguf)
    assert config.resolve_models(dataclasses.replace(cfg, lm="some/folder", encoder="lm"), quiet) == ("some/folder",) * 2


def test_decoder_retriever_trains_from_the_lm_and_its_folder_embeds_as_in_training(tmp_path):
    from sentence_transformers import SentenceTransformer
    cfg = tiny_training_setup(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="Answer").save_pretrained(cfg.lm)  # a decoder's tokenizer has an EOS
    cfg = dataclasses.replace(cfg, encoder="lm", pooling="last", lora=4)
    lm_before = {n: p.clone() for n, p in dream.load_frozen_lm(cfg.lm)[0].named_parameters()}
    retriever, report = train.train(cfg, log=lambda *_: None)
    assert {n for n, p in retriever.named_parameters() if p.requires_grad} == {
        n for n, _ in retriever.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, lm_before[n]) for n, p in dream.load_frozen_lm(cfg.lm)[0].named_parameters())
    again = SentenceTransformer(os.path.join(cfg.out_dir, "encoder"), device="cpu")
    assert again[1].pooling_mode == "lasttoken" and again.tokenizer("k1 v1")["input_ids"][-1] == again.tokenizer.eos_token_id
    assert (encoded(again) - encoded(retriever)).abs().max() <= 1e-5
    assert (encoded(again) - encoded(dream.load_retriever(cfg.lm, pooling="last"))).abs().max() > 1e-4  # trained


def test_frozen_documents_are_embedded_once_and_score_as_the_router_does(tmp_path):
    """--train-side query's Scorer: each document through the frozen route once (encode_document,
    no grad), kept; the scores those of dream.score; the query side's train mode left as it was."""
    retriever = train.load_encoder(config.Config(train_side="query"), tiny_encoder_folder(tmp_path), "cpu")
    scorer = objectives.Scorer(retriever, frozen_documents=True)
    calls = []
    retriever[0].sub_modules["document"][0].register_forward_hook(lambda *_: calls.append(1))
    queries, docs, _ = toy_batch()
    retriever.train()
    assert scorer(queries, docs).requires_grad and retriever.training and retriever[0].sub_modules["query"].training
    scorer(queries, [ds[::-1] for ds in docs])
    assert len(calls) == 1  # the second call's documents were all kept
    retriever.eval()
    torch.testing.assert_close(scorer(queries, docs), dream.score(retriever, queries, docs))
    q, d = scorer(queries, docs[0])  # a flat list: the queries' and the documents' embeddings
    torch.testing.assert_close(q @ d.T, dream.score(retriever, queries, [docs[0]] * len(queries)))


def test_train_side_query_keeps_every_document_embedding_of_the_start_encoder(tmp_path):
    """--train-side query: after training, the saved encoder embeds every document as the start
    encoder did (an index built with it stays valid), and its queries moved."""
    from sentence_transformers import SentenceTransformer
    cfg = dataclasses.replace(tiny_training_setup(tmp_path), train_side="query", query_prompt="q1 ")
    passages = [json.loads(line)["text"] for line in open(cfg.corpus)]
    queries = [json.loads(line)["query"] for line in open(cfg.train_data)]
    start = dream.load_retriever(cfg.encoder)
    start.prompts["query"] = "q1 "
    embed = lambda model, task, texts: getattr(model, f"encode_{task}")(texts, convert_to_tensor=True,
                                                                         normalize_embeddings=True)
    retriever, report = train.train(cfg, log=lambda *_: None)
    assert report["loss"] and {n for n, p in retriever.named_parameters() if p.requires_grad} == {
        n for n, _ in retriever.named_parameters() if n.startswith("0.sub_modules.query.")}
    again = SentenceTransformer(os.path.join(cfg.out_dir, "encoder"), device="cpu")
    assert again.prompts["query"] == "q1 "
    for model in (retriever, again):
        assert (embed(model, "document", passages) - embed(start, "document", passages)).abs().max() <= 1e-5
        assert (embed(model, "query", queries) - embed(start, "query", queries)).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# torchrun: two processes (gloo, CPU) train exactly as one process with the same global batch


def as_flags(cfg):
    flags = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [f"{flag}={value}"]
    return flags


def test_torchrun_two_processes_train_as_one(tmp_path):
    import subprocess
    from safetensors.torch import load_file
    cfg = tiny_training_setup(tmp_path)
    config_file = os.path.join(cfg.encoder, "config.json")
    config = json.load(open(config_file))  # no dropout: two ranks would draw other masks than one
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    json.dump(config, open(config_file, "w"))
    # Adam turns float noise in a near-zero gradient (a different summation order) into up to
    # lr * noise / eps of weight: 1.4e-5 at lr 1e-3, 1.4e-6 at lr 1e-4. the steps stay 100x that
    cfg = dataclasses.replace(cfg, steps=3, batch_size=4, checkpoint_every=3, dev_questions=3, lr=1e-4)
    _, one = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "one")), log=lambda *_: None)
    two_dir = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *as_flags(dataclasses.replace(cfg, out_dir=str(two_dir)))],
                          cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.load(open(two_dir / "report.json"))
    assert "2 processes" in done.stdout + done.stderr
    assert abs(two["loss"][0][1] - one["loss"][0][1]) <= 1e-5  # step 1
    for when in ("before", "after"):
        assert abs(two[when]["val_loss_and_gold_top1"][0] - one[when]["val_loss_and_gold_top1"][0]) <= 1e-5
    a, b = load_file(tmp_path / "one" / "encoder" / "model.safetensors"), load_file(two_dir / "encoder" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-5
    start = load_file(os.path.join(cfg.encoder, "model.safetensors"))
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 2e-4  # it did train


# -----------------------------------------------------------------------------
# the command lines: every flag explains itself


def test_every_flag_explains_itself_with_its_default_and_choices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # each flag's help on one line

    def help_of(main, argv):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        out, err = capsys.readouterr()
        return stop.value.code, out + err

    code, text = help_of(train.parse_args, ["--help"])
    assert code == 0
    assert re.search(r"--loss \{dream,replug,adist,loop,emdr,infonce\}\s+dream; or the label-free baselines .*"
                     r"\(default: dream\)", text), text
    for f in dataclasses.fields(config.Config):  # the help and the choices are written once, on the field
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"^  {flag}[ ,\[]", text, re.M), flag
        assert f.metadata["help"] in text and "(default: " in text.split(f.metadata["help"], 1)[1][:60], flag
        if f.metadata["choices"]:
            assert f"{flag} {{{','.join(f.metadata['choices'])}}}" in text, flag
    assert re.search(r"--pooling \{,mean,cls,last\}\s+.*\(default: ''\)", text)
    assert "--small  " in text and "the Config defaults" in text
    code, text = help_of(train.parse_args, ["--decoder", "--help"])  # the preset's defaults, shown
    assert re.search(r"--lr LR\s+.*\(default: 0\.001\)", text)
    assert re.search(r"--out-dir OUT_DIR\s+.*\(default: out/decoder\)", text)
    assert "--query-prompt 'query: '" in " ".join(text.split())  # the preset, quoted as a shell reads it
    code, text = help_of(train.parse_args, ["--small", "--loss", "bm25"])  # a bad choice: argparse names the choices
    assert code == 2 and ("argument --loss: invalid choice: 'bm25' (choose from 'dream', 'replug', 'adist', 'loop', "
                          "'emdr', 'infonce')") in text
    with pytest.raises(ValueError, match=r"--pooling 'max': choose '', mean, cls, last"):  # from Python, no argparse
        train.train(config.Config(pooling="max"))
    with pytest.raises(ValueError, match=r"--head-source 'labels': choose gold, loo"):
        train.train(config.Config(head_source="labels"))

    monkeypatch.setattr(sys, "argv", ["compare.py", "--help"])
    code, text = help_of(lambda _: compare.main(), None)
    assert code == 0 and re.search(r"--grid-lr GRID_LR\s+.*\(default: 3e-5,1e-4,3e-4\)", text), text
    assert re.search(r"--seeds SEEDS\s+.*\(default: 2\)", text)
    assert re.search(r"--out-dir OUT_DIR\s+.*\(default: out/compare\)", text)
    assert text.count("(default: out/compare)") == 1 and text.count("(default: dream)") == 1  # shown once
    monkeypatch.setattr(sys, "argv", ["eval.py", "--help"])
    code, text = help_of(lambda _: beir_eval.main(), None)
    assert code == 0 and re.search(r"--split SPLIT\s+.*\(default: test\)", text), text
    assert re.search(r"--batch-size BATCH_SIZE\s+.*\(default: 64\)", text) and "(default: fp32)" in text


# -----------------------------------------------------------------------------
# the run a reader repeats: the start encoder's evaluation is kept and reused


def test_a_rerun_reuses_the_start_encoders_evaluation_and_another_start_does_not(tmp_path):
    cfg = tiny_training_setup(tmp_path)
    logs = []
    run = lambda out, **changes: train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / out), **changes),
                                             log=logs.append)[1]
    first = run("a", steps=2)
    assert sum("the start encoder evaluated in" in line for line in logs) == 1
    # training-only settings (steps, lr, seed, out_dir) decide nothing the start encoder is scored on
    logs.clear()
    second = run("b", steps=3, lr=1e-4, seed=1)
    assert not any("the start encoder evaluated in" in line for line in logs)
    assert sum("the start encoder: evaluation reused from" in line for line in logs) == 1
    assert second["before"] == json.loads(json.dumps(first["before"]))
    with open(tmp_path / "b" / "report.json") as f:
        assert json.load(f)["before"] == second["before"]  # written into report.json as before
    # what the evaluation depends on: another k (other candidates, another validation loss), other
    # weights (another start encoder)
    for out, changes in [("c", {"k": 3}), ("d", {"encoder": str(tmp_path / "other")})]:
        if out == "d":
            WORLD.fresh_retriever(str(tmp_path / "other"), seed=1)
        logs.clear()
        run(out, steps=1, **changes)
        assert sum("the start encoder evaluated in" in line for line in logs) == 1, out
        assert not any("reused" in line for line in logs), out
