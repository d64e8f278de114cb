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
    # Host-side copies, kept when the tensors move to a GPU, so that the trainer never waits on the device to
    # read them: the groups' data indices and the number of real tokens.
    index_host: np.ndarray | None = None
    tokens_host: int | None = None

    @property
    def num_groups(self) -> int:
        return int(self.index.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.group.numel())

    def to(self, device) -> "Batch":
        return Batch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    def num_tokens(self) -> int:
        """Tokens the model actually runs on (no padding)."""
        return self.tokens_host if self.tokens_host is not None else int(self.attention_mask.sum())

    def host_index(self) -> np.ndarray:
        return self.index_host if self.index_host is not None else self.index.cpu().numpy()

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


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = np.full((len(rows), T), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


@dataclass
class _Row:
    prompt: list[int]
    completions: list[list[int]]
    seq_ids: list[int]  # sequence number of each completion


def _rows(data: Encoded, indices: list[int], share_prompt: bool, with_extra: bool):
    """The rows to run and the (group, slot) of every sequence. Sequences are numbered slot-major (for pairs:
    all chosen, then all rejected), then one own-prompt extra sequence per group (e.g. an RDPO rationale) in
    slot K."""
    k_max = max(len(data.completions[i]) for i in indices)
    seqs = [(b, k) for k in range(k_max) for b, gi in enumerate(indices) if k < len(data.completions[gi])]
    seq_of = {bk: s for s, bk in enumerate(seqs)}
    if share_prompt:
        rows = [_Row(data.prompts[gi], data.completions[gi], [seq_of[(b, k)] for k in range(len(data.completions[gi]))])
                for b, gi in enumerate(indices)]
    else:
        rows = [_Row(data.prompts[indices[b]], [data.completions[indices[b]][k]], [s]) for s, (b, k) in enumerate(seqs)]
    if with_extra and data.extra is not None:
        for b, gi in enumerate(indices):
            prompt, completion = data.extra[gi]
            rows.append(_Row(prompt, [completion], [len(seqs)]))
            seqs.append((b, k_max))
    return rows, seqs


def collate(data: Encoded, indices, pad_id: int, share_prompt: bool = False, with_extra: bool = True) -> Batch:
    indices = [int(i) for i in indices]
    rows, seqs = _rows(data, indices, share_prompt, with_extra)
    T = max(len(r.prompt) + sum(map(len, r.completions)) for r in rows)
    ids, pos, segs, src, tgt, seq = [], [], [], [], [], []
    for r_i, row in enumerate(rows):
        p = row.prompt
        ids_r, pos_r, seg_r = list(p), list(range(len(p))), [0] * len(p)
        for k, (c, s) in enumerate(zip(row.completions, row.seq_ids)):
            start = len(ids_r)
            ids_r += c
            pos_r += range(len(p), len(p) + len(c))
            seg_r += [k + 1] * len(c)
            # completion token j is predicted by the hidden state before it in its own segment; token 0 by the
            # last prompt token (without a prompt, token 0 cannot be predicted and is not scored)
            prev = ([len(p) - 1] if p else []) + list(range(start, start + len(c) - 1))
            first = 0 if p else 1
            src += [r_i * T + i for i in prev]
            tgt += c[first:]
            seq += [s] * (len(c) - first)
        ids.append(ids_r)
        pos.append(pos_r)
        segs.append(seg_r)
    input_ids = _pad(ids, pad_id)
    lengths = torch.tensor([len(r) for r in ids])
    attn = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    # With one completion per row plain causal attention is exact (padding only follows real tokens).
    segments = _pad(segs, -1) if any(len(r.completions) > 1 for r in rows) else None
    group = torch.tensor([b for b, _ in seqs])
    slot = torch.tensor([k for _, k in seqs])
    slot_mask = torch.zeros(len(indices), int(slot.max()) + 1, dtype=torch.bool)
    slot_mask[group, slot] = True
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Batch(input_ids, attn, _pad(pos, 0), segments, as_t(src), as_t(tgt), as_t(seq), group, slot,
                 torch.tensor(indices), slot_mask, index_host=np.asarray(indices), tokens_host=int(lengths.sum()))
