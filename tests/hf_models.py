"""Small random models built by ``transformers`` (not by llmtrain) and saved with ``save_pretrained``: the folders
``model.init_from`` and ``load_trained`` read in the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

KINDS = ("llama", "gpt2", "gpt2_untied_bin", "gpt2_gelu", "mistral")
"""llama: grouped-query attention, untied, rope_theta 500, eps 1e-6. gpt2: tied. gpt2_untied_bin: untied, saved as
PyTorch weights (pytorch_model.bin). gpt2_gelu: tied, exact GELU (activation_function=gelu) instead of GPT-2's tanh
approximation. mistral: a Llama-family model_type without sliding windows."""
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen2_moe_gated")
"""Mixtures of experts, 4 experts of width 24, top 2, untied. mixtral: 3 blocks, all sparse. qwen2_moe: 4 blocks, every
second one sparse (the others dense, width 40), a shared expert of 2 experts' width behind a zero gate (what llmtrain
computes), top-k weights not renormalized. qwen2_moe_gated: the same with a random shared-expert gate."""


def hf_config(kind: str, vocab_size: int, context: int = 128):
    import transformers

    if kind.startswith("gpt2"):
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=64, n_layer=2, n_head=4,
                                       layer_norm_epsilon=1e-5, tie_word_embeddings=kind in ("gpt2", "gpt2_gelu"),
                                       activation_function="gelu" if kind == "gpt2_gelu" else "gelu_new",
                                       bos_token_id=1, eos_token_id=1)
    if kind == "mixtral":
        return transformers.MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=24,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=context, rms_norm_eps=1e-6, rope_theta=500.0,
                                          num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                          bos_token_id=1, eos_token_id=1)
    if kind.startswith("qwen2_moe"):
        return transformers.Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=40,
                                           moe_intermediate_size=24, shared_expert_intermediate_size=48,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=context, rms_norm_eps=1e-6, rope_theta=500.0,
                                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                                           norm_topk_prob=False, qkv_bias=False, tie_word_embeddings=False,
                                           bos_token_id=1, eos_token_id=1)
    config = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
    return config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, rms_norm_eps=1e-6,
                  rope_theta=500.0, tie_word_embeddings=False, sliding_window=None, bos_token_id=1, eos_token_id=1)


def save_random_hf(kind: str, folder: Path, tokenizer_file: Path | None, vocab_size: int, seed: int = 0):
    """Build a random ``kind`` model with transformers (norms and biases perturbed, so a mix-up in any mapping
    shows), save it into ``folder`` with the tokenizer file; returns the model in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, vocab_size)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, 0.1)
            if name.endswith("shared_expert_gate.weight") and kind != "qwen2_moe_gated":
                param.zero_()  # sigmoid(0) = 1/2 on every token: a shared expert llmtrain computes (ungated)
    if kind.endswith("_bin"):  # transformers 5 saves safetensors only: write PyTorch weights as older versions did
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, folder / tokenizer_file.name)
    return model


def save_byte_level_bpe(folder: Path, vocab_size: int = 1000, documents: int = 60) -> Path:
    """A GPT-2-style byte-level BPE trained by the `tokenizers` library on stdlib files, saved as transformers saves
    a fast tokenizer (tokenizer.json + tokenizer_config.json); returns the tokenizer.json."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    from llmtrain.data.sources import stdlib_files

    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files()[:documents]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return folder / "tokenizer.json"


def greedy_pair(ours, theirs, tokenizer, prompt: list[int], tokens: int = 16) -> tuple[list[int], list[int]]:
    """The greedy continuations of ``prompt`` by our model (``llmtrain-generate``'s generator) and by a transformers
    model, ``tokens`` each."""
    import torch

    from llmtrain.config import SamplingConfig
    from llmtrain.generate import TextGenerator

    greedy = SamplingConfig(max_new_tokens=tokens, temperature=0.0, stop_at_eod=False)
    mine = TextGenerator(ours, tokenizer, torch.device("cpu")).generate_ids([prompt], greedy, seed=0)[0]
    with torch.no_grad():
        hf = theirs.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens,
                             pad_token_id=tokenizer.eod_id)[0, len(prompt):].tolist()
    return mine, hf
