"""Stage 2 image/report alignment loss: CLIP's symmetric InfoNCE (the two-tower model it trains is
:class:`rlhf_rrg.models.image_text_aligner.ImageTextAligner`).

The loss follows open_clip's ``ClipLoss`` with ``local_loss=True, gather_with_grad=True``: every
process scores its own images and reports against the embeddings of *all* processes, gathered with
``torch.distributed.nn.functional.all_gather`` so gradients flow back to the process that owns each
embedding. Averaging those per-process losses (which DDP's gradient averaging does) gives exactly the
loss and gradients of one process holding the concatenated global batch; the tests check this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from rlhf_rrg.distributed import clamp_parameter_


@dataclass
class ContrastiveConfig:
    """Temperature and batching of the InfoNCE loss."""

    init_temperature: float = field(default=0.07, metadata={"help": "Initial softmax temperature (CLIP: 0.07)."})
    learnable_temperature: bool = field(default=True, metadata={"help": "Learn the temperature (as log logit scale)."})
    max_logit_scale: float = field(default=100.0, metadata={"help": "Upper clamp of 1/temperature (CLIP: 100)."})
    gather_across_processes: bool = field(
        default=True,
        metadata={"help": "Contrast against the embeddings of every process (needs equal local batches)."},
    )
    label_targets: float = field(default=0.0, metadata={
        "help": "Share of each row's target spread over the batch's studies with the same CheXpert findings (itself "
                "included); 0 is CLIP's one-hot InfoNCE. Real reports repeat: half of IU X-ray's are normal, and "
                "one-hot targets push apart studies a reader cannot tell apart."})

    def __post_init__(self) -> None:
        if not self.init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {self.init_temperature}")
        if not self.max_logit_scale > 1:
            raise ValueError(f"max_logit_scale must be > 1, got {self.max_logit_scale}")
        if not 0.0 <= self.label_targets <= 1.0:
            raise ValueError(f"label_targets must be in [0, 1], got {self.label_targets}")
        if 1.0 / self.init_temperature > self.max_logit_scale:
            raise ValueError(
                f"init_temperature {self.init_temperature} gives a logit scale above max_logit_scale "
                f"{self.max_logit_scale}"
            )


def label_aware_targets(labels: torch.Tensor, all_labels: torch.Tensor, offset: int, share: float) -> torch.Tensor:
    """Soft InfoNCE targets: ``1 - share`` on the matched column, ``share`` spread evenly over the columns whose
    finding set equals the row's (the matched one included).

    Args:
        labels: ``(b, k)`` 0/1 findings of this process's rows.
        all_labels: ``(B, k)`` 0/1 findings of every column (all processes, rank order).
        offset: global column of local row 0.
        share: weight of the same-findings part, in [0, 1].

    Returns:
        ``(b, B)`` rows summing to 1.
    """
    same = (labels[:, None, :] == all_labels[None, :, :]).all(-1).to(labels.dtype)
    onehot = torch.zeros_like(same)
    onehot[torch.arange(labels.shape[0]), torch.arange(labels.shape[0]) + offset] = 1.0
    return (1.0 - share) * onehot + share * same / same.sum(1, keepdim=True)


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenates ``x`` from all processes in rank order; returns it and this process's rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x), dim=0), dist.get_rank()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE with a learnable, log-parameterised and clamped logit scale.

    Args:
        init_temperature: Initial temperature; the parameter stores ``log(1 / init_temperature)``.
        learnable_temperature: Whether the logit scale receives gradients.
        max_logit_scale: The scale used in the loss is clamped to ``[1, max_logit_scale]``.
        gather_across_processes: Gather embeddings from every process when ``torch.distributed`` is
            initialised (a no-op otherwise). All processes must pass the same local batch size.
        label_targets: Share of the target on same-findings studies (:func:`label_aware_targets`); 0 is CLIP.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        gather_across_processes: bool = True,
        label_targets: float = 0.0,
    ) -> None:
        super().__init__()
        self.label_targets = label_targets
        # Shape (1,), not 0-dim: DeepSpeed cannot broadcast or partition a 0-dim parameter (ZeRO fails at
        # ``accelerator.prepare`` with "self.dim() cannot be 0 to view Float as Byte"). State dicts written with the
        # 0-dim parameter (earlier exports and checkpoints) still load: see ``_load_from_state_dict``.
        self.logit_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / init_temperature)]), requires_grad=learnable_temperature
        )
        self.max_log_scale = math.log(max_logit_scale)
        self.gather_across_processes = gather_across_processes

    def scale(self) -> torch.Tensor:
        """The clamped logit scale ``exp(logit_scale)``, a scalar tensor."""
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp().squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A 0-dim logit scale (state dicts written before it became shape (1,)) loads as shape (1,).
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def clamp_(self) -> None:
        """Clamps the stored parameter into range; call after each optimizer step, as open_clip does.

        Without it a parameter pushed past the clamp would sit where the clamp zeroes its gradient. Under DeepSpeed
        ZeRO the optimizer's master copy is clamped too (:func:`rlhf_rrg.distributed.clamp_parameter_`).
        """
        clamp_parameter_(self.logit_scale, 0.0, self.max_log_scale)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Computes the loss for matched pairs ``(image_emb[i], text_emb[i])``.

        Args:
            image_emb: ``(b, d)`` L2-normalised image embeddings of this process.
            text_emb: ``(b, d)`` L2-normalised report embeddings of this process.
            labels: ``(b, k)`` 0/1 findings of the pairs; required when ``label_targets > 0``.

        Returns:
            Scalar loss: the mean of image->text and text->image cross-entropies over the local rows.
        """
        if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
            raise ValueError(
                f"expected two (b, d) tensors of equal shape, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if self.gather_across_processes:
            all_images, rank = _gather_with_grad(image_emb)
            all_texts, _ = _gather_with_grad(text_emb)
        else:
            all_images, all_texts, rank = image_emb, text_emb, 0
        scale = self.scale()
        logits_per_image = scale * image_emb @ all_texts.T
        logits_per_text = scale * text_emb @ all_images.T
        # Local row i matches global column rank * b + i.
        offset = rank * image_emb.shape[0]
        if self.label_targets > 0:
            if labels is None:
                raise ValueError("label_targets > 0 needs the findings of every pair (labels)")
            labels = labels.to(image_emb.dtype)  # gloo gathers no bool tensors
            all_labels = _gather_with_grad(labels)[0] if self.gather_across_processes else labels
            targets = label_aware_targets(labels, all_labels, offset, self.label_targets).to(logits_per_image.dtype)
        else:
            targets = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
        return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets))
