"""
bench.py runs: on a tiny LM and encoder, every ratio it promises comes out, positive and finite (a
change of a signature it calls fails here, not in a user's hands).
"""
import json
import math
import os
import subprocess
import sys

from transformers import LlamaConfig, LlamaForCausalLM

from data import ToyWorld

HERE = os.path.dirname(os.path.abspath(__file__))
RATIOS = {"dream_step_vs_lm_forward", "score_with_grad_vs_encode", "peak_memory_dream_vs_forward",
          "biased_attention_vs_sdpa", "decoder_step_vs_lm_forward", "decoder_encode_vs_minilm_encode",
          "biased_sdpa_vs_sdpa", "dream_step_by_hand_vs_lm_forward", "dream_step_fused_vs_lm_forward",
          "peak_memory_checkpointed_vs_forward", "replug_step_vs_dream_step", "adist_step_vs_dream_step",
          "loop_step_vs_dream_step", "emdr_step_vs_dream_step"}


def test_bench_prints_every_ratio_on_a_tiny_model(tmp_path):
    world = ToyWorld()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(world.tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, pad_token_id=0))
    lm.save_pretrained(tmp_path / "lm")
    world.tokenizer.save_pretrained(tmp_path / "lm")
    world.fresh_retriever(str(tmp_path / "encoder"))
    done = subprocess.run([sys.executable, "bench.py", "--json", "--repeats", "1", "--lm", str(tmp_path / "lm"),
                           "--encoder", str(tmp_path / "encoder"), "--data-dir", str(tmp_path)],
                          cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(ratios) == RATIOS
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
