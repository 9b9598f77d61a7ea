"""Test tokenizers with the exact special-token layout of the paper's Qwen-family models.

The real tokenizer files cannot be downloaded here, so each builder reproduces what matters for pairing:
the 151,643-entry base vocabulary (stand-in strings, identical across the family), the added tokens at
their real ids with their real strings and `special` flags, the EOS / PAD / BOS tokens, the chat template
(the parts without tools) and the generation config's eos ids. Each mirrors one public file:

- `qwen_math`:     Qwen/Qwen2.5-Math-1.5B tokenizer_config.json + generation_config.json
                   (EOS and PAD `<|endoftext|>` 151643; template with the default system prompt "Please reason
                   step by step, and put your final answer within \\boxed{}."; generation eos 151643)
- `qwen_instruct`: Qwen/Qwen2.5-7B-Instruct tokenizer_config.json + generation_config.json (EOS `<|im_end|>`
                   151645, PAD `<|endoftext|>`; default system "You are Qwen, created by Alibaba Cloud. You
                   are a helpful assistant."; generation eos [151645, 151643]). OpenThinker3-7B is fine-tuned
                   from it and keeps this layout.
- `r1_distill`:    deepseek-ai/DeepSeek-R1-Distill-Qwen-7B tokenizer_config.json + generation_config.json
                   (151643 `<｜end▁of▁sentence｜>` EOS and PAD, 151644 `<｜User｜>`, 151645 `<｜Assistant｜>`,
                   151646 `<｜begin▁of▁sentence｜>` BOS, 151647 `<|EOT|>`, 151648 `<think>`, 151649 `</think>`;
                   template `{bos}{system}<｜User｜>...<｜Assistant｜>`; generation bos 151646, eos 151643).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

BASE = 151643  # Qwen2.5's byte-level BPE vocabulary size (tokenizer.vocab_size)
ROWS = 151936  # the models' embedding rows (padded past the 151,665 tokens)

QWEN_ADDED = [  # (string, special) at ids 151643.. in Qwen2.5's tokenizer_config.json
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
R1_ADDED = [  # DeepSeek-R1-Distill-Qwen replaces the first seven
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", False),
    ("<think>", False),
    ("</think>", False),
    *QWEN_ADDED[7:],
]

_QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nDEFAULT<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not "
    "loop.first) or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\\\boxed{}."
INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == "
    "'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = "
    "content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor -%}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}"
)

SPECS = {
    "qwen_math": dict(
        added=QWEN_ADDED,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        bos=None,
        template=_QWEN_TEMPLATE.replace("DEFAULT", MATH_SYSTEM),
        gen_eos=151643,
    ),
    "qwen_instruct": dict(
        added=QWEN_ADDED,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        bos=None,
        template=_QWEN_TEMPLATE.replace("DEFAULT", INSTRUCT_SYSTEM),
        gen_eos=[151645, 151643],
    ),
    "r1_distill": dict(
        added=R1_ADDED,
        eos="<｜end▁of▁sentence｜>",
        pad="<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
        template=R1_TEMPLATE,
        gen_eos=151643,
    ),
}


def _base_vocab() -> dict[str, int]:
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"<w{i}>": i for i in range(len(chars), BASE)})
    return vocab


def build(kind: str):
    """A fresh PreTrainedTokenizerFast with `kind`'s layout (one character per base token)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[kind]
    core = Tokenizer(models.WordLevel(vocab=_base_vocab(), unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    core.decoder = decoders.Fuse()
    for text, special in spec["added"]:  # one at a time: each gets the next id, 151643, 151644, ...
        tok = AddedToken(text, special=special, normalized=False)
        (core.add_special_tokens if special else core.add_tokens)([tok])
    extra = {"bos_token": spec["bos"]} if spec["bos"] else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=spec["eos"], pad_token=spec["pad"], **extra
    )
    tok.chat_template = spec["template"]
    return tok


@cache
def model_dir(kind: str, root: str, weights: bool = True, context: int = 512) -> Path:
    """A Hugging Face directory with `kind`'s tokenizer and generation config and a tiny random Llama
    (151,936 rows, hidden 16, `context` positions); without `weights`, only the files a pairing check reads."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(root) / f"{kind}{'' if weights else '-noweights'}-{context}"
    tok = build(kind)
    tok.save_pretrained(out)
    spec = SPECS[kind]
    config = LlamaConfig(
        vocab_size=ROWS,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    GenerationConfig(eos_token_id=spec["gen_eos"], pad_token_id=tok.pad_token_id).save_pretrained(out)
    if weights:
        torch.manual_seed(len(kind))
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    else:
        (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out
