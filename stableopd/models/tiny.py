"""The built-in offline model family: a character tokenizer built in code and small random-init Llama models.

`tiny` and `tiny-teacher` are standard Hugging Face Llama models saved with `save_pretrained`, so every
code path (loading, sampling, checkpoints, vLLM-format weights) is the one real models take. They share
one tokenizer: one token per printable ASCII character, plus `<|im_start|>`, `<|im_end|>` (the
end-of-sequence token) and `<|pad|>`, with a ChatML chat template. Their embedding matrices are padded to
different row counts on purpose (128 vs 136 rows for a 101-token vocabulary), like Qwen2.5's 151,936 vs
152,064, so the padded-vocabulary path is exercised in every smoke run. Llama rather than Qwen2: transformers 5
replaces the tokenizer class of any `qwen2` checkpoint with Qwen2's byte-level BPE, which would discard
this character tokenizer on reload.

    stableopd rollout --model tiny --data builtin:arith -s sampling.max_new_tokens=16
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
UNK = "<|unk|>"


@dataclass(frozen=True)
class TinySpec:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int
    seed: int


TINY_FAMILY: dict[str, TinySpec] = {
    "tiny": TinySpec(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_rows=128, seed=0),
    "tiny-teacher": TinySpec(
        hidden_size=96, layers=3, heads=4, kv_heads=2, intermediate=192, vocab_rows=136, seed=1
    ),
}


def _characters() -> list[str]:
    return [c for c in string.printable if c not in "\x0b\x0c\r"]


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast with a chat template and `<|im_end|>` as EOS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [UNK] + _characters())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character (whitespace included) is its own token; Fuse joins them back without separators
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=UNK,
        bos_token=None,
        padding_side="left",
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(name: str, out_dir: Path, *, spec: TinySpec | None = None) -> Path:
    """Create and save a random-init tiny model and its tokenizer into `out_dir` (deterministic by seed)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TINY_FAMILY[name]
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=spec.vocab_rows,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
