"""Packing token sequences for training forwards, and the causal shift.

A sequence is `prompt + target`, where the target is a rollout's response (with its stop token when it
stopped) or a golden solution. Sequences are right-padded, so position ids are simply 0..L-1 for every
row. The hidden state at position l predicts the token at l + 1: for a target token at position l we
take the hidden state at l - 1. Only the decoder runs; the vocabulary projection happens in the chunked
kernels (stableopd/core/kernels.py), so no (B, L, V) logits tensor ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    target_mask: torch.Tensor  # (B, L) True at target-token positions
    lengths: list[int]  # (B,) target tokens per row

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[self.target_mask]  # (N,) row-major: row 0's targets, then row 1's, ...


def pack(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device) -> Packed:
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, L)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, L)
    tmask = torch.zeros((len(prompts), width), dtype=torch.bool)  # (B, L)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t, dtype=torch.long)
        attn[i, : len(p) + len(t)] = 1
        tmask[i, len(p) : len(p) + len(t)] = True
    return Packed(ids.to(device), attn.to(device), tmask.to(device), [len(t) for t in targets])


def target_hidden(model, packed: Packed) -> torch.Tensor:
    """Final-layer hidden states that predict each target token: (N, d), row-major like `targets`."""
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask
    ).last_hidden_state  # (B, L, d)
    return select_targets(hidden, packed)


def select_targets(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(B, L, d) hidden states -> (N, d) at the positions that predict target tokens."""
    # causal shift: position l - 1 predicts the token at l; prompts are never empty, so l - 1 >= 0
    return hidden[:, :-1][packed.target_mask[:, 1:]]  # (N, d)


def output_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight  # (V_rows, d)


def head_forward(model, packed: Packed, fn):
    """fn(target hidden (N, d), lm_head weight (V_rows, d)) -> loss tensors, in one call of the model.

    A model sharded by `distributed.Dist.wrap` runs the decoder and `fn` inside its own forward, so FSDP's
    hooks gather the embeddings and head (tied or not) and reduce their gradients; any other model runs the
    decoder and reads the head weight directly. Only `fn` ever touches the vocabulary."""
    if getattr(model, "runs_head_fn", False):
        return model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            head_fn=lambda hidden, weight: fn(select_targets(hidden, packed), weight),
        )
    return fn(target_hidden(model, packed), output_weight(model))


def row_mask(lengths: list[int], device) -> torch.Tensor:
    """(B, T) bool, True at the first lengths[i] positions of row i; T = max(lengths)."""
    width = max(lengths) if lengths else 0
    ar = torch.arange(width, device=device)
    return ar.unsqueeze(0) < torch.tensor(lengths, device=device, dtype=torch.long).reshape(-1, 1)


def to_rows(values: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) flat per-token values -> (B, T) zero-padded values and (B, T) mask."""
    mask = row_mask(lengths, values.device)  # (B, T)
    out = values.new_zeros(mask.shape)  # (B, T)
    out[mask] = values
    return out, mask


def from_lists(rows: list[list[float]], device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged python lists -> (B, T) zero-padded tensor and mask."""
    flat = torch.tensor([v for r in rows for v in r], dtype=dtype, device=device)
    return to_rows(flat, [len(r) for r in rows])
