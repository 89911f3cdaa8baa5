"""Membership inference: tell training documents from held-out ones by the model's likelihood.

Three attacks, each a membership score where higher means "member" (members have LOWER loss, so the
loss-based scores are negated; the official notebook did not, which flips the AUC):
  loss:  -mean token loss
  zlib:  -(mean token loss / zlib-compressed length of the text in bytes)  (Carlini et al. 2021)
  min_k: mean of the k% lowest token log-probs                            (Shi et al. 2024)
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from goldfish_ds.eval.documents import Document

ATTACKS = ("loss", "zlib", "min_k")


@dataclass(frozen=True)
class DocumentScores:
    """Likelihood statistics of one document (its tokens after the first)."""

    index: int
    loss: float            # mean negative log-likelihood per token
    zlib_ratio: float      # loss / len(zlib.compress(text))
    min_k_log_prob: float  # mean of the k% lowest token log-probs

    def membership_score(self, attack: str) -> float:
        """Higher = more likely a member."""
        if attack == "loss":
            return -self.loss
        if attack == "zlib":
            return -self.zlib_ratio
        if attack == "min_k":
            return self.min_k_log_prob
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")


@dataclass(frozen=True)
class MembershipResult:
    """Per-document statistics and, per attack, ROC AUC and TPR at 1% FPR (members are the positives)."""

    members: list[DocumentScores]
    nonmembers: list[DocumentScores]
    auc: dict[str, float]
    tpr_at_1pct_fpr: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def token_log_probs(model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16,
                    progress: bool = False) -> list[torch.Tensor]:
    """log p(ids[t + 1] | ids[:t + 1]) for each sequence: float32 [len(ids) - 1], on the CPU.

    One forward pass per batch of right-padded sequences (padding masked; sorted by length to pad little).
    """
    if any(len(s) < 2 for s in sequences):
        raise ValueError("token_log_probs: every sequence needs at least 2 tokens")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    bar = tqdm(total=len(sequences), desc="log-probs", unit="doc", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in rows) - 1
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros_like(inputs)
        for r, i in enumerate(rows):
            ids = torch.tensor(sequences[i], dtype=torch.long)
            inputs[r, :len(ids) - 1], targets[r, :len(ids) - 1], attention_mask[r, :len(ids) - 1] = ids[:-1], ids[1:], 1
        logits = model(input_ids=inputs.to(device), attention_mask=attention_mask.to(device)).logits.float()
        # log-softmax at the target only: the target logit minus the log-sum-exp, no [B, T, V] copy
        target_logits = logits.gather(-1, targets.to(device)[..., None])[..., 0]
        log_probs = (target_logits - torch.logsumexp(logits, dim=-1)).cpu()
        for r, i in enumerate(rows):
            out[i] = log_probs[r, :len(sequences[i]) - 1].clone()
        bar.update(len(rows))
    bar.close()
    return out


def min_k_mean(log_probs: torch.Tensor, k_percent: float) -> float:
    """Mean of the k% lowest values (at least one) of a [T] tensor."""
    if not 0 < k_percent <= 100:
        raise ValueError(f"k_percent must be in (0, 100], got {k_percent}")
    count = max(1, int(len(log_probs) * k_percent / 100))
    return torch.topk(log_probs.double(), count, largest=False).values.mean().item()


def document_scores(model: torch.nn.Module, documents: Sequence[Document], *, k_percent: float = 20.0,
                    batch_size: int = 16, progress: bool = False) -> list[DocumentScores]:
    """Loss, zlib ratio and min-k% log-prob of each document (documents need at least 2 tokens)."""
    log_probs = token_log_probs(model, [doc.ids for doc in documents], batch_size, progress)
    scores = []
    for doc, lp in zip(documents, log_probs):
        loss = -lp.double().mean().item()
        zlib_bytes = len(zlib.compress(doc.text.encode("utf-8")))
        scores.append(DocumentScores(doc.index, loss, loss / zlib_bytes, min_k_mean(lp, k_percent)))
    return scores


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve, members positive: P(member score > non-member score), ties counting 1/2."""
    pos, neg = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs at least one member and one non-member score")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct value, ties averaged
    u = mid_ranks[inverse[:len(pos)]].sum() - len(pos) * (len(pos) + 1) / 2.0  # Mann-Whitney U
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(member_scores: Sequence[float], nonmember_scores: Sequence[float], max_fpr: float = 0.01) -> float:
    """Highest true-positive rate of a threshold rule "score >= t means member" whose FPR is <= max_fpr."""
    pos = np.sort(np.asarray(member_scores, dtype=np.float64))
    neg = np.sort(np.asarray(nonmember_scores, dtype=np.float64))
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("tpr_at_fpr needs at least one member and one non-member score")
    thresholds = np.concatenate([[math.inf], np.unique(np.concatenate([pos, neg]))])
    tpr = (len(pos) - np.searchsorted(pos, thresholds, side="left")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, thresholds, side="left")) / len(neg)
    return float(tpr[fpr <= max_fpr].max())


def membership_inference(model: torch.nn.Module, members: Sequence[Document], nonmembers: Sequence[Document], *,
                         k_percent: float = 20.0, batch_size: int = 16, progress: bool = False) -> MembershipResult:
    """Run the three attacks (ATTACKS) on members (the training documents) against held-out non-members."""
    member, nonmember = (document_scores(model, docs, k_percent=k_percent, batch_size=batch_size, progress=progress)
                         for docs in (members, nonmembers))
    auc, tpr = {}, {}
    for attack in ATTACKS:
        pos = [s.membership_score(attack) for s in member]
        neg = [s.membership_score(attack) for s in nonmember]
        auc[attack], tpr[attack] = roc_auc(pos, neg), tpr_at_fpr(pos, neg, 0.01)
    return MembershipResult(member, nonmember, auc, tpr)
