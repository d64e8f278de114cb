"""Collation: all completions of a micro-batch's groups in ONE padded batch, plus the plan of what to score.

Two layouts, both one forward per micro-batch:
- separate (TRL's): one row per (group, completion) = prompt + completion, slot-major, so for pairs the rows are
  [chosen ; rejected]; the prompt is computed once per completion.
- shared prompt: one row per group = prompt + completion_1 + ... + completion_K, with position ids that restart
  after the prompt for every completion and an attention mask in which a completion sees the prompt and its own
  earlier tokens only. Each completion's log-probs are exactly those of the separate layout, but the prompt is
  computed once (the prefix-sharing trick of arXiv 2410.20305; our step pairs have long prompts).

The scoring plan (`src`, `tgt`, `seq`) names, for every completion token, the flat position of the hidden state
that predicts it, the token id, and which (group, slot) sequence it belongs to; prompt and padding positions
never reach the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.train.data import Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor        # [R, T] int64, right-padded
    attention_mask: torch.Tensor   # [R, T] int64: 1 = real token
    position_ids: torch.Tensor     # [R, T] int64
    segments: torch.Tensor | None  # [R, T] shared layout only: 0 prompt, k+1 completion k, -1 padding
    src: torch.Tensor              # [N] flat index into [R * T] of the hidden state predicting each token
    tgt: torch.Tensor              # [N] the completion token ids
    seq: torch.Tensor              # [N] which sequence (0..S-1) each scored token belongs to
    group: torch.Tensor            # [S] group (pair / list) of the micro-batch each sequence belongs to
    slot: torch.Tensor             # [S] position in its group (0 = chosen, 1 = rejected for pairs)
    index: torch.Tensor            # [B] index of each group in the Encoded data
    slot_mask: torch.Tensor        # [B, K] which slots exist (lists may have different sizes)

    @property
    def num_groups(self) -> int:
        return int(self.index.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.group.numel())

    def to(self, device) -> "Batch":
        return Batch(**{k: (v.to(device) if v is not None else None) for k, v in self.__dict__.items()})

    def num_tokens(self) -> int:
        """Tokens the model actually runs on (no padding)."""
        return int(self.attention_mask.sum())

    def scatter(self, per_seq: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[S] values -> [B, K] by (group, slot); missing slots get `fill`."""
        out = per_seq.new_full(self.slot_mask.shape, fill)
        out[self.group, self.slot] = per_seq
        return out

    def attention_mask_4d(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """[R, 1, T, T] mask of the shared layout (None for the separate one, where plain causal attention is
        exact because padding only follows real tokens). Bool (True = attend), or additive in `dtype`."""
        if self.segments is None:
            return None
        seg = self.segments
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        key_seg, query_seg = seg[:, None, :], seg[:, :, None]
        allowed = causal & ((key_seg == 0) | (key_seg == query_seg))
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill_(~allowed,
                                                                                        torch.finfo(dtype).min)


def _slot_major(data: Encoded, indices: list[int]) -> list[tuple[int, int, int]]:
    """(batch position b, group index gi, slot k) for every completion, slot-major."""
    k_max = max(len(data.completions[i]) for i in indices)
    return [(b, gi, k) for k in range(k_max) for b, gi in enumerate(indices) if k < len(data.completions[gi])]


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def collate(data: Encoded, indices, pad_id: int, share_prompt: bool = False) -> Batch:
    indices = [int(i) for i in indices]
    seqs = _slot_major(data, indices)
    slot_mask = torch.zeros(len(indices), max(k for _, _, k in seqs) + 1, dtype=torch.bool)
    group = torch.tensor([b for b, _, _ in seqs])
    slot = torch.tensor([k for _, _, k in seqs])
    slot_mask[group, slot] = True
    if share_prompt:
        rows, pos, segs, src, tgt, seq = _shared_rows(data, indices, seqs)
        ids, T = _pad(rows, pad_id), max(map(len, rows))
        positions, segments = _pad(pos, 0), _pad(segs, -1)
    else:
        rows, src, tgt, seq = [], [], [], []
        T = max(len(data.prompts[gi]) + len(data.completions[gi][k]) for _, gi, k in seqs)
        for s, (_, gi, k) in enumerate(seqs):
            p, c = data.prompts[gi], data.completions[gi][k]
            rows.append(p + c)
            start = max(len(p), 1)  # a first token without anything before it cannot be predicted
            src += [s * T + t - 1 for t in range(start, len(p) + len(c))]
            tgt += (p + c)[start:]
            seq += [s] * (len(p) + len(c) - start)
        ids = _pad(rows, pad_id)
        positions, segments = torch.arange(T).expand(len(rows), T).clone(), None
    lengths = torch.tensor([len(r) for r in rows])
    attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(ids, attn, positions, segments, as_t(src), as_t(tgt), as_t(seq), group, slot,
                 torch.tensor(indices), slot_mask)


def _shared_rows(data: Encoded, indices: list[int], seqs: list[tuple[int, int, int]]):
    """Rows of the shared layout and the scoring plan; `seqs` fixes the sequence numbering (slot-major)."""
    seq_of = {(b, k): s for s, (b, _, k) in enumerate(seqs)}
    rows, pos, segs, src, tgt, seq = [], [], [], [], [], []
    lengths = [len(data.prompts[gi]) + sum(map(len, data.completions[gi])) for gi in indices]
    T = max(lengths)
    for b, gi in enumerate(indices):
        p = data.prompts[gi]
        row, position, segment = list(p), list(range(len(p))), [0] * len(p)
        for k, c in enumerate(data.completions[gi]):
            start = len(row)
            row += c
            position += range(len(p), len(p) + len(c))
            segment += [k + 1] * len(c)
            # token j of the completion is predicted by the hidden state before it in the same segment; token 0
            # by the last prompt token
            prev = ([len(p) - 1] if p else []) + list(range(start, start + len(c) - 1))
            first = 0 if p else 1
            src += [b * T + i for i in prev]
            tgt += c[first:]
            seq += [seq_of[(b, k)]] * (len(c) - first)
        rows.append(row)
        pos.append(position)
        segs.append(segment)
    return rows, pos, segs, src, tgt, seq
