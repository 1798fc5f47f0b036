"""Tiny random transformers models, one per architecture family, built from configs (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

VOCAB = 320


def _llama_like(config_cls: type, model_cls: type, **extra) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        cfg = config_cls(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra,
        )
        return model_cls(cfg)

    return build


def _gpt2() -> torch.nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256))


def _opt() -> torch.nn.Module:
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64))


def _neox() -> torch.nn.Module:
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  max_position_embeddings=256))


def _qwen3_moe() -> torch.nn.Module:
    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, head_dim=16,
        max_position_embeddings=256, decoder_sparse_step=1, mlp_only_layers=[]))


ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _llama_like(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16),
    "gemma2": _llama_like(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=16, sliding_window=8),
    "gemma3": _llama_like(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=16, sliding_window=8),
    "phi3": _llama_like(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0, eos_token_id=1, bos_token_id=1),
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _neox,
    "qwen3_moe": _qwen3_moe,
}


_MOE_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   num_experts_per_tok=2, max_position_embeddings=256)


def _moe(config_cls: type, model_cls: type, **extra) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        return model_cls(config_cls(**{**_MOE_COMMON, **extra}))

    return build


#: MoE architectures with transformers v5 fused experts (expert pruning tests): 3 blocks each, 8 routed experts,
#: top-2; dense blocks where the architecture has them (Qwen2-MoE ``mlp_only_layers``, Qwen3-MoE
#: ``decoder_sparse_step``, DeepSeek-V3 ``first_k_dense_replace``).
MOE_ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "mixtral": _moe(tf.MixtralConfig, tf.MixtralForCausalLM, intermediate_size=32, num_local_experts=8),
    "qwen2_moe": _moe(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, intermediate_size=64, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, num_experts=8, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": _moe(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, intermediate_size=64, moe_intermediate_size=16,
                      num_experts=8, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True),
    "deepseek_v3": _moe(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, num_key_value_heads=4, intermediate_size=64,
                        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "olmoe": _moe(tf.OlmoeConfig, tf.OlmoeForCausalLM, intermediate_size=16, num_experts=8, eos_token_id=1,
                  pad_token_id=0),
    "gpt_oss": _moe(tf.GptOssConfig, tf.GptOssForCausalLM, intermediate_size=16, num_local_experts=8, head_dim=16,
                    sliding_window=8, rope_scaling=None),
}


def build_moe(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random MoE model of ``arch`` (`MOE_ARCHITECTURES`), with router weights spread enough that routing
    differs between tokens."""
    torch.manual_seed(0)
    model = MOE_ARCHITECTURES[arch]().to(dtype)
    return model.eval()


def build(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(dtype)
    return model.eval()


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def save_tiny(folder: Path, model: torch.nn.Module | None = None) -> Path:
    """Save ``model`` (default: the tiny Llama) with the tiny tokenizer into ``folder``, as a user's checkpoint
    folder for the CLI; returns ``folder``."""
    (build("llama") if model is None else model).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a neural network. "
    "Sparse models can be smaller and faster when the hardware or kernels exploit the zeros. "
    "Calibration data drives the choice of which weights matter most for the outputs. "
) * 40


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the fly (vocab <= VOCAB), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_two_processes(script: str, out: Path, *args: str, timeout: int = 170) -> None:
    """Write ``script`` into ``out`` and run it under ``torchrun --nproc_per_node 2`` (gloo, one thread per process)
    with ``out`` and ``args`` as its arguments; fail with the tail of its output unless it exits 0."""
    path = out / "script.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *TORCHRUN_2, str(path), str(out), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
