"""A stand-in for a downloaded Llama-family checkpoint (README, "Continue pretraining"): a random 4-layer Llama saved
by transformers, with a sentencepiece tokenizer.model beside it as Llama 2 / Mistral folders ship theirs.

    python scripts/standin_llama.py tok-source/tokenizer.model   # writes ./llama-ckpt (vocab 2048)
"""
import shutil
import sys

import torch
import transformers

torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=1)
transformers.LlamaForCausalLM(cfg).save_pretrained("llama-ckpt")
shutil.copy(sys.argv[1], "llama-ckpt/tokenizer.model")
