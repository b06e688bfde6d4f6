"""``RRGProcessor``: tokenizer + image transform for the LLaVA-style report generator.

It is a transformers ``ProcessorMixin`` because TRL's GRPO/RLOO trainers treat a ``ProcessorMixin``
processing class as the sign of a vision-language model: they then render conversational prompts
with ``processor.apply_chat_template`` (image blocks filled from the dataset's ``images`` column), call
``processor(images=..., text=..., padding=True, return_tensors="pt")`` for the training forward and
suppress ``model.config.image_token_id`` during generation.

Prompt format (the same for SFT, our RL loops, TRL and plain ``generate``): plain, one ``<image>``
placeholder per view, then the instruction text, then a newline; or, with ``chat_prompts`` (instruct LLMs, see
:mod:`rlhf_rrg.models.chat_prompt`), that text without the newline as a user turn of the LLM's chat template
followed by its generation prompt. The report follows and ends with eos. Each placeholder is expanded into
``num_image_tokens`` copies, one per projected patch feature.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from rlhf_rrg.models.chat_prompt import PLAIN_CHAT_TEMPLATE, chat_prompt_template, own_chat_template
from rlhf_rrg.models.tokenizer import IMAGE_TOKEN

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

ImageInput = Image.Image | torch.Tensor


class RRGProcessor(ProcessorMixin):
    """Turns (images, prompt text, report text) into LLaVA inputs for SFT, generation and TRL.

    Args:
        tokenizer: the LLM's tokenizer; must already contain ``image_token`` (see ``add_image_token``).
        image_size: side of the square image the vision encoder takes.
        num_image_tokens: projected features per image, i.e. placeholders each ``image_token`` expands to.
        image_mean: per-channel mean used to normalise PIL images.
        image_std: per-channel std used to normalise PIL images.
        image_token: the placeholder string.
        chat_template: Jinja template for ``apply_chat_template``; defaults to the plain prompt format, or with
            ``chat_prompts`` to the tokenizer's own template.
        chat_prompts: prompts are a user turn of the LLM's chat template (see :meth:`set_chat_prompts`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int = 224,
        num_image_tokens: int = 196,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        image_token: str = IMAGE_TOKEN,
        chat_template: str | None = None,
        chat_prompts: bool = False,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 channels and std > 0, got {image_mean}, {image_std}")
        if image_token not in tokenizer.get_vocab():
            raise ValueError(f"image_token {image_token!r} is not in the tokenizer; call add_image_token first")
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(tokenizer, chat_template=chat_template or PLAIN_CHAT_TEMPLATE)
        self.chat_prompts = False
        if chat_prompts:
            self.set_chat_prompts(True, chat_template)

    def set_chat_prompts(self, enabled: bool, template: str | None = None) -> None:
        """Switches the prompt format: a user turn of ``template`` (default: the tokenizer's own chat template) with
        the generation prompt after it, or the plain format. Saved with the processor.

        Raises:
            ValueError: ``enabled`` without a chat template.
        """
        if enabled:
            template = template or own_chat_template(self.tokenizer)
            if template is None:
                raise ValueError("chat prompts need a chat template, and the tokenizer has none")
            self.chat_template = chat_prompt_template(template)
        elif self.chat_prompts:
            self.chat_template = PLAIN_CHAT_TEMPLATE
        self.chat_prompts = enabled

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """``ProcessorMixin.apply_chat_template`` with ``image_token`` available to the template."""
        kwargs.setdefault("image_token", self.image_token)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def format_prompt(self, text: str, num_images: int = 1) -> str:
        """The prompt string: ``num_images`` placeholders (unless ``text`` already places them) and text, followed by
        a newline, or with ``chat_prompts`` as a user turn of the chat template with its generation prompt.

        Raises:
            ValueError: if ``text`` contains placeholders but not exactly ``num_images`` of them.
        """
        placed = text.count(self.image_token)
        if placed and placed != num_images:
            raise ValueError(f"prompt places {placed} {self.image_token} tokens but {num_images} images were given")
        content = text if placed else self.image_token * num_images + text
        if not self.chat_prompts:
            return content + "\n"
        # The processor's own rendering: TRL's conversational prompts come out token for token the same.
        return self.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)

    def preprocess_image(self, image: ImageInput) -> torch.Tensor:
        """One image as the encoder's input, shape ``(3, image_size, image_size)``.

        A tensor is taken as already transformed by the dataset (same size and normalisation) and only
        checked; a PIL image (any mode, e.g. 8/16-bit grayscale X-rays) is converted to RGB, resized
        bicubically, scaled to [0, 1] and normalised with ``image_mean``/``image_std``.

        Raises:
            ValueError: for a tensor of the wrong shape; TypeError for any other input type.
        """
        size = self.image_size
        if isinstance(image, torch.Tensor):
            if image.shape != (3, size, size) or not image.is_floating_point():
                raise ValueError(
                    f"image tensor must be float of shape (3, {size}, {size}), got {tuple(image.shape)} {image.dtype}"
                )
            return image
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images or (3, H, W) tensors, got {type(image).__name__}")
        if image.mode in ("I", "I;16", "F"):
            # 16-bit DICOM-derived PNGs: rescale by their own range, not by 255.
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
            pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-6)
            rgb = pixels.expand(3, -1, -1)
        else:
            rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        rgb = F.interpolate(rgb[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (rgb - mean) / std

    def _flatten_images(self, images: Any) -> list[ImageInput]:
        if isinstance(images, (Image.Image, torch.Tensor)):
            if isinstance(images, torch.Tensor) and images.dim() == 4:
                return list(images)
            return [images]
        flat: list[ImageInput] = []
        for item in images:
            if item is not None:
                flat.extend(self._flatten_images(item))
        return flat

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenises ``text`` with every ``image_token`` expanded, and transforms ``images``.

        Args:
            images: one image, a list, or a per-sample nested list (PIL or ``(3, H, W)`` tensors), or a
                ``(N, 3, H, W)`` tensor; flattened in order, one per placeholder.
            text: one string or a batch of strings in the plain prompt format.
            padding: passed to the tokenizer (its ``padding_side`` applies).
            return_tensors: ``"pt"`` for padded tensors, None for lists of ids.
            **kwargs: other tokenizer arguments (``add_special_tokens``, ``padding_side``, ...); special tokens are
                added by default only to plain prompts (a chat template writes its own).

        Returns:
            ``input_ids``, ``attention_mask`` and, when images are given, ``pixel_values`` as a float tensor
            ``(N, 3, image_size, image_size)`` (always a tensor, as TRL's generation path requires).

        Raises:
            ValueError: if the number of placeholders differs from the number of images.
        """
        if text is None:
            raise ValueError("RRGProcessor needs text: the prompt with one image placeholder per image")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = [] if images is None else self._flatten_images(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(flat_images):
            raise ValueError(f"found {n_placeholders} {self.image_token} placeholders but {len(flat_images)} images")
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        kwargs.setdefault("add_special_tokens", not self.chat_prompts)
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs)
        data = dict(encoded)
        if flat_images:
            data["pixel_values"] = torch.stack([self.preprocess_image(image) for image in flat_images])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _prompt_ids(self, prompts: Sequence[str], num_images: int) -> list[list[int]]:
        texts = [self.format_prompt(p, num_images) for p in prompts]
        expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
        return self.tokenizer(expanded, add_special_tokens=not self.chat_prompts)["input_ids"]

    def _pixel_batch(self, pixel_values: torch.Tensor | Sequence[ImageInput], batch_size: int) -> torch.Tensor:
        """(B, 3, H, W), (B, V, 3, H, W) or B images -> (B * V, 3, H, W)."""
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.dim() == 4:
                pixel_values = pixel_values[:, None]
            if pixel_values.dim() != 5 or pixel_values.size(0) != batch_size:
                raise ValueError(
                    f"pixel_values must be (B, 3, H, W) or (B, V, 3, H, W) with B={batch_size}, "
                    f"got {tuple(pixel_values.shape)}"
                )
            return torch.stack([self.preprocess_image(img) for img in pixel_values.flatten(0, 1)])
        if len(pixel_values) != batch_size:
            raise ValueError(f"got {len(pixel_values)} images for {batch_size} prompts")
        return torch.stack([self.preprocess_image(img) for img in pixel_values])

    @staticmethod
    def _views(pixel_values: torch.Tensor | Sequence[ImageInput]) -> int:
        return pixel_values.size(1) if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5 else 1

    def build_sft_batch(
        self,
        prompts: Sequence[str],
        reports: Sequence[str],
        pixel_values: torch.Tensor | Sequence[ImageInput],
        max_report_tokens: int | None = None,
        return_offsets: bool = False,
    ) -> dict[str, Any]:
        """Teacher-forcing batch: prompt tokens and image placeholders are masked out of the labels.

        Each row is the :meth:`format_prompt` prompt (plain: ``[bos] <image>*num_image_tokens*V prompt "\\n"``;
        chat: up to the assistant turn's start), then ``report [eos]``, right-padded; labels equal input_ids on the
        report and eos and are ``-100`` elsewhere (the model shifts them).

        Args:
            prompts: B instruction texts (may contain retrieved context; placeholders are prepended).
            reports: B target reports.
            pixel_values: ``(B, 3, H, W)`` / ``(B, V, 3, H, W)`` tensors or B PIL images.
            max_report_tokens: truncate each report to this many tokens before eos.
            return_offsets: also return ``report_offsets``: per row, the ``(start, end)`` character span in its
                report of each kept report token (they start at the row's first label); needs a fast tokenizer.

        Returns:
            ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels`` (B, L), ``pixel_values`` (B*V, 3, S, S).
        """
        if len(prompts) != len(reports):
            raise ValueError(f"got {len(prompts)} prompts but {len(reports)} reports")
        pixels = self._pixel_batch(pixel_values, len(prompts))
        prompt_ids = self._prompt_ids(prompts, self._views(pixel_values))
        encoded = self.tokenizer(list(reports), add_special_tokens=False, return_offsets_mapping=return_offsets)
        report_ids = encoded["input_ids"]
        eos = self.tokenizer.eos_token_id
        rows = []
        for p_ids, r_ids in zip(prompt_ids, report_ids, strict=True):
            target = list(r_ids[:max_report_tokens] if max_report_tokens is not None else r_ids) + [eos]
            rows.append((p_ids + target, [IGNORE_INDEX] * len(p_ids) + target))
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixels}
        if return_offsets:
            batch["report_offsets"] = [list(o[:max_report_tokens] if max_report_tokens is not None else o)
                                       for o in encoded["offset_mapping"]]
        return batch

    def build_generation_batch(
        self, prompts: Sequence[str], pixel_values: torch.Tensor | Sequence[ImageInput]
    ) -> dict[str, torch.Tensor]:
        """Left-padded prompts for ``generate``: new tokens then follow every row's last prompt token.

        Args:
            prompts: B instruction texts.
            pixel_values: ``(B, 3, H, W)`` / ``(B, V, 3, H, W)`` tensors or B PIL images.

        Returns:
            ``input_ids`` (B, P), ``attention_mask`` (B, P), ``pixel_values`` (B*V, 3, S, S).
        """
        pixels = self._pixel_batch(pixel_values, len(prompts))
        prompt_ids = self._prompt_ids(prompts, self._views(pixel_values))
        length = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), length), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}
