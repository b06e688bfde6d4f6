"""Token-level unlikelihood training (Welleck et al., ICLR 2020, "Neural Text Generation with Unlikelihood
Training": the token-level objective, previous-context candidates).

Cross-entropy teaches a small generator which sentence usually follows which, not which it has already written:
the demo's SFT ended 180 of its 200 greedy test reports by restating "no pulmonary edema", because after
"no pulmonary" the training reports most often continue with "edema". Unlikelihood adds, at each report position
``t``, ``-log(1 - p_t(c))`` for every distinct token ``c`` the report already used before ``t`` that is not the
target at ``t``. The target is never a candidate, so a model that puts all its mass on the references pays nothing:
the term changes which mistakes maximum likelihood tolerates (restating), not what it aims at. Candidates come from
the report's own earlier tokens only, never from the prompt, whose retrieved reports the generator may copy.
"""

from __future__ import annotations

import torch

from rlhf_rrg.models.processor import IGNORE_INDEX

_MAX_PROB = 1.0 - 1e-5  # log(1 - p) stays finite (the reference implementation clamps 1 - p at 1e-5)


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood of a report batch.

    Args:
        logits: ``(b, L, V)`` model outputs.
        labels: ``(b, L)`` targets, ``-100`` where ignored (the model's convention: position ``t`` predicts
            ``t + 1``); the targets that are not ignored are the report's tokens.

    Returns:
        Scalar: the sum over target positions ``t`` and candidates ``c`` of ``-log(1 - p_t(c))``, divided by the
        number of target positions, where the candidates at ``t`` are the distinct targets before ``t`` in the same
        row other than the target at ``t``.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    tokens = labels.clamp(min=0)
    n = tokens.shape[1]
    same = tokens[:, :, None] == tokens[:, None, :]  # (b, t, j)
    before = torch.ones(n, n, dtype=torch.bool, device=labels.device).tril(-1)  # j < t
    # A token counts once however often it occurred: only its first occurrence among the targets is a candidate.
    first = keep & ~(same & before & keep[:, None, :]).any(dim=-1)  # (b, j)
    candidate = before & first[:, None, :] & ~same & keep[:, :, None]  # (b, t, j)
    # p_t(tokens[j]) from the candidates' logits and one logsumexp: no second (b, L, V) tensor on 150k vocabularies.
    logits = logits.float()
    picked = logits.gather(-1, tokens[:, None, :].expand(-1, n, -1))  # (b, t, j)
    probs = (picked - logits.logsumexp(dim=-1, keepdim=True)).exp()
    penalty = -torch.log1p(-probs.clamp(max=_MAX_PROB))
    return (penalty * candidate).sum() / keep.sum().clamp(min=1)
