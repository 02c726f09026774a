"""A stand-in for a downloaded Llama-family checkpoint (README, "Continue pretraining"): a random 4-layer Llama saved
by transformers, with a sentencepiece tokenizer.model beside it as Llama 2 / Mistral folders ship theirs.

    .venv/bin/python scripts/standin_llama.py data/tok-source/tokenizer.model runs/llama-ckpt   # vocab 2048
"""
import shutil
import sys

import torch
import transformers

torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=1)
tokenizer, out = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama-ckpt"
transformers.LlamaForCausalLM(cfg).save_pretrained(out)
shutil.copy(tokenizer, f"{out}/tokenizer.model")
