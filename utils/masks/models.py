"""The two models behind ``create_masked_dataset.py``: an OWLv2 box detector and a SAM box-prompt segmenter.

Both are loaded and validated *before* any image is read, so a wrong model name, a missing
checkpoint or a checkpoint of the wrong SAM size fails in seconds, not after an hour.

* :class:`Owlv2Detector` finds boxes with ``transformers``' ``Owlv2ForObjectDetection``, either
  class-agnostically from the objectness head (default) or from text queries ("a mug").
* :class:`SamSegmenter` turns the boxes of one image into masks with ``segment_anything``'s
  ``SamPredictor``: one image embedding per image, all boxes decoded in one batched call.

SAM model types are data (:data:`SAM_ARCHITECTURES`, a :class:`SamArchitecture` per type,
mirroring ``segment_anything.build_sam``); a custom or tiny SAM is described by a JSON file of
:class:`SamArchitecture` fields (``--sam_config``) and built by the same :func:`build_sam`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

from utils.errors import SoIRError
from utils.hub import check_model_available, hf_offline


class ModelLoadError(SoIRError):
    """A detector or segmenter could not be loaded; the message names the model and the fix."""


# ----------------------------------------------------------------------------------------------
# OWLv2 detection
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionOptions:
    """Which OWLv2 boxes become SAM prompts (all sizes in original-image pixels).

    The defaults are the original code's: class-agnostic NMS at IoU 0.4, no cap on the number of
    objects, no minimum box size (a cap drops objects on dense scenes: the paper's VoxDet has 14.7
    detected objects per image on average).
    """

    score_threshold: float = 0.2  # keep boxes with score > threshold (objectness or query score)
    nms_iou: float = 0.4  # suppress a box overlapping a higher-scored one by more (IoU)
    max_objects: int | None = None  # keep the top-scored boxes after NMS (None: all)
    min_box_size: float = 0.0  # drop boxes whose width or height (after clipping) is smaller

    def __post_init__(self) -> None:
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if self.min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {self.min_box_size}")


def filter_detections(
    boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int], options: DetectionOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, size-filter, NMS and cap the detections of one image.

    Args:
        boxes: [N, 4] ``x1, y1, x2, y2`` in original-image pixels (may reach into OWLv2's padding).
        scores: [N] scores in [0, 1], already above the score threshold.
        image_size: (H, W) of the original image.

    Returns:
        ``(boxes [K, 4], scores [K])``, sorted by decreasing score, ``scores[i]`` belonging to
        ``boxes[i]`` (every filter indexes both tensors with the same ``keep``).
    """
    boxes = clip_boxes_to_image(boxes, image_size)
    # A box that lies in the padding clips to zero width/height; SAM cannot segment it.
    keep = remove_small_boxes(boxes, options.min_box_size)
    keep = keep[((boxes[keep, 2] > boxes[keep, 0]) & (boxes[keep, 3] > boxes[keep, 1]))]
    boxes, scores = boxes[keep], scores[keep]
    keep = nms(boxes, scores, options.nms_iou)[: options.max_objects]  # nms sorts by score
    return boxes[keep], scores[keep]


class Owlv2Preprocess:
    """One RGB image -> OWLv2 pixel values [3, S, S]: padded to a square (bottom/right), resized to S.

    Picklable and model-free, so DataLoader workers run it on the CPU. The bottom/right padding
    is why boxes come back scaled by max(H, W) (the image processor's post-processing does it).

    ``exact=False`` (default) first shrinks images larger than S with PIL's antialiased bilinear
    resize. The processor's own anti-aliasing is a 2-D Gaussian with sigma = (scale - 1) / 2 on
    the full-resolution padded image: for a 4000x3000 photo at S = 960 that took 8.3 s on one
    2-core CPU versus 0.26 s with the PIL pre-shrink, and the pixel values differed by 0.008 on
    average (normalised units, std 1.08). ``exact=True`` keeps the reference path.
    """

    def __init__(self, image_processor, exact: bool = False) -> None:
        self.image_processor = image_processor
        self.exact = exact
        size = image_processor.size
        self.side = max(size["height"], size["width"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not self.exact and max(image.size) > self.side:
            scale = self.side / max(image.size)
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
            )
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class Owlv2Detector:
    """OWLv2 boxes in original-image pixels, batched over images.

    Without ``queries`` the class-agnostic objectness head scores every predicted box (the
    image-guided detection path of OWLv2); with ``queries`` a box's score is its best
    text-query probability, as in ``Owlv2Processor.post_process_grounded_object_detection``.
    """

    def __init__(
        self,
        model,
        image_processor,
        options: DetectionOptions,
        queries: Sequence[str] = (),
        tokenizer=None,
        device: str | torch.device = "cpu",
        exact_resize: bool = False,
    ) -> None:
        self.model = model.eval().to(device)
        self.image_processor = image_processor
        self.preprocess = Owlv2Preprocess(image_processor, exact=exact_resize)
        self.options = options
        self.queries = tuple(queries)
        self.device = torch.device(device)
        self.text_inputs = None
        if self.queries:
            if tokenizer is None:
                raise ValueError("text queries need the OWLv2 tokenizer")
            # Same padding as Owlv2Processor: every query padded to the text model's length.
            self.text_inputs = tokenizer(list(self.queries), padding="max_length", truncation=True, return_tensors="pt")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        options: DetectionOptions,
        queries: Sequence[str] = (),
        device: str | torch.device = "cpu",
        exact_resize: bool = False,
    ) -> "Owlv2Detector":
        """Load model + image processor (+ tokenizer for queries) from a hub id or a local folder.

        Raises:
            ModelLoadError: unknown / unreachable model, not an OWLv2 checkpoint, or (with
                ``HF_HUB_OFFLINE=1``) not available locally. No download is tried offline.
        """
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Owlv2ForObjectDetection

        check_model_available(name_or_path, "OWLv2 model", key="--owlv2_model")
        offline = hf_offline()
        kwargs = {"local_files_only": True} if offline else {}
        try:
            config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            if offline:
                raise ModelLoadError(
                    f"OWLv2 model '{name_or_path}' is not available offline (HF_HUB_OFFLINE=1): it is "
                    "neither a local folder nor in the Hugging Face cache. Download it once with network "
                    f"access, or pass a local folder to --owlv2_model. ({type(err).__name__}: {err})"
                ) from err
            raise ModelLoadError(
                f"OWLv2 model '{name_or_path}' could not be loaded: {type(err).__name__}: {err}"
            ) from err
        if config.model_type != "owlv2":
            raise ModelLoadError(
                f"'{name_or_path}' is a '{config.model_type}' model, not OWLv2; use e.g. "
                "google/owlv2-base-patch16-ensemble"
            )
        try:
            model = Owlv2ForObjectDetection.from_pretrained(name_or_path, **kwargs)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs) if queries else None
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"OWLv2 model '{name_or_path}' could not be loaded "
                f"({'offline, ' if offline else ''}{type(err).__name__}: {err})"
            ) from err
        return cls(
            model,
            image_processor,
            options,
            queries=queries,
            tokenizer=tokenizer,
            device=device,
            exact_resize=exact_resize,
        )

    @torch.inference_mode()
    def detect(
        self, pixel_values: torch.Tensor, image_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Boxes of a batch.

        Args:
            pixel_values: [B, 3, S, S] from :attr:`preprocess`.
            image_sizes: B original (H, W) sizes.

        Returns:
            B pairs ``(boxes [K, 4] float32 x1 y1 x2 y2 pixels, scores [K])`` on the CPU,
            filtered by :func:`filter_detections`.
        """
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

        pixel_values = pixel_values.to(self.device)
        batch = pixel_values.shape[0]
        if self.queries:
            outputs = self.model(
                input_ids=self.text_inputs["input_ids"].repeat(batch, 1).to(self.device),
                attention_mask=self.text_inputs["attention_mask"].repeat(batch, 1).to(self.device),
                pixel_values=pixel_values,
            )
        else:
            # Class-agnostic: the objectness head, as Owlv2ForObjectDetection.image_guided_detection
            # uses it, with objectness as the single "class" so the processor's own post-processing
            # (cxcywh -> xyxy, scaled by the padded square side) applies unchanged.
            feature_map, _ = self.model.image_embedder(pixel_values=pixel_values)
            image_feats = feature_map.flatten(1, 2)  # [B, patches, D]
            outputs = Owlv2ObjectDetectionOutput(
                logits=self.model.objectness_predictor(image_feats)[..., None],
                pred_boxes=self.model.box_predictor(image_feats, feature_map),
            )
        results = self.image_processor.post_process_object_detection(
            outputs, threshold=self.options.score_threshold, target_sizes=[tuple(s) for s in image_sizes]
        )
        return [
            tuple(t.float().cpu() for t in filter_detections(r["boxes"], r["scores"], tuple(size), self.options))
            for r, size in zip(results, image_sizes)
        ]


# ----------------------------------------------------------------------------------------------
# SAM segmentation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamArchitecture:
    """Hyper-parameters of a SAM model; defaults are those of ``segment_anything._build_sam``."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @classmethod
    def from_json(cls, path: str | Path) -> "SamArchitecture":
        """Read a ``--sam_config`` file: a JSON object of field names (unknown names are an error)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"SAM config '{path}' could not be read: {type(err).__name__}: {err}") from err
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - names:
            unknown = sorted(set(values) - names) if isinstance(values, dict) else values
            raise ModelLoadError(
                f"SAM config '{path}': expected a JSON object with keys from {sorted(names)}; unknown: {unknown}"
            )
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as err:
            raise ModelLoadError(f"SAM config '{path}': {err}") from err


# The three released SAM sizes, as in segment_anything.build_sam.
SAM_ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
}


def build_sam(arch: SamArchitecture) -> Sam:
    """An untrained ``Sam`` of the given architecture (the same modules as segment_anything)."""
    embedding_size = arch.image_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def sam_state_dict_shapes(arch: SamArchitecture) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of a SAM, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_sam(arch).state_dict().items()}


def infer_sam_model_type(checkpoint: str | Path) -> str | None:
    """``vit_h`` / ``vit_l`` / ``vit_b`` when the file name says so (``sam_vit_h_4b8939.pth``), else None."""
    name = Path(checkpoint).name.lower()
    found = [t for t in SAM_ARCHITECTURES if t in name]
    return found[0] if len(found) == 1 else None


def read_sam_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's {name: tensor}; raises ModelLoadError if it is missing or not a state dict."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelLoadError(
            f"SAM checkpoint '{checkpoint}' does not exist (the released checkpoints are "
            "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth)"
        )
    try:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling fails in many ways; all mean "not a usable checkpoint"
        raise ModelLoadError(
            f"SAM checkpoint '{checkpoint}' could not be read as a PyTorch file: {type(err).__name__}: {err}"
        ) from err
    if (
        not isinstance(state_dict, Mapping)
        or not state_dict
        or not all(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        keys = list(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ModelLoadError(
            f"SAM checkpoint '{checkpoint}' is not a SAM state dict ({{parameter name: tensor}}); found {keys}"
        )
    return dict(state_dict)


def check_sam_state_dict(
    state_dict: Mapping[str, torch.Tensor], arch: SamArchitecture, model_type: str, checkpoint: str | Path
) -> None:
    """Raise ModelLoadError listing missing, unexpected and wrongly shaped keys, with a hint."""
    expected = sam_state_dict_shapes(arch)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found == expected:
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in sorted(set(found) & set(expected))
        if found[k] != expected[k]
    ]
    matches = [name for name, other in SAM_ARCHITECTURES.items() if sam_state_dict_shapes(other) == found]
    hint = f" The checkpoint matches SAM type '{matches[0]}': pass --sam_model_type {matches[0]}." if matches else ""

    def listed(keys: list[str]) -> str:
        return f"{len(keys)}" + (f" (e.g. {keys[:3]})" if keys else "")

    raise ModelLoadError(
        f"SAM checkpoint '{checkpoint}' does not fit SAM type '{model_type}': missing keys {listed(missing)}, "
        f"unexpected keys {listed(unexpected)}, shape mismatches {listed(wrong_shape)}.{hint}"
    )


def load_sam(
    checkpoint: str | Path,
    model_type: str | None = None,
    sam_config: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Sam, str]:
    """Build SAM and load ``checkpoint`` into it, validating first.

    The architecture comes from ``sam_config`` (JSON of :class:`SamArchitecture` fields), else
    ``model_type`` (a key of :data:`SAM_ARCHITECTURES`), else the checkpoint's file name.

    Returns:
        ``(sam in eval mode on device, model type name)``; the name is ``"custom:<config>"`` for
        a ``sam_config``.
    """
    if sam_config is not None:
        arch, model_type = SamArchitecture.from_json(sam_config), f"custom:{Path(sam_config).name}"
    else:
        model_type = model_type or infer_sam_model_type(checkpoint)
        if model_type is None:
            raise ModelLoadError(
                f"cannot tell the SAM type from the file name '{Path(checkpoint).name}'; "
                f"pass --sam_model_type ({' | '.join(SAM_ARCHITECTURES)})"
            )
        if model_type not in SAM_ARCHITECTURES:
            raise ModelLoadError(
                f"unknown SAM type '{model_type}'; known: {list(SAM_ARCHITECTURES)} "
                "(or describe the model with --sam_config)"
            )
        arch = SAM_ARCHITECTURES[model_type]
    state_dict = read_sam_state_dict(checkpoint)
    check_sam_state_dict(state_dict, arch, model_type, checkpoint)
    sam = build_sam(arch)
    sam.load_state_dict(state_dict)  # strict; keys and shapes were checked above
    return sam.to(device).eval(), model_type


class SamSegmenter:
    """Box prompts -> masks for one image at a time (one image embedding, one decoder call)."""

    def __init__(self, sam: Sam, pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95) -> None:
        self.predictor = SamPredictor(sam)
        # SAM's own defaults for its automatic mask generator (used by automatic()).
        self.automatic_options = dict(pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh)

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    def embed(self, image: np.ndarray) -> None:
        """Compute the image embedding of ``image`` ([H, W, 3] uint8 RGB); SAM resizes to its input."""
        self.predictor.set_image(image, image_format="RGB")

    @torch.inference_mode()
    def decode(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of the embedded image for ``boxes`` [K, 4] (x1 y1 x2 y2, original pixels).

        Returns:
            ``(masks [K, H, W] bool, predicted IoU [K])`` on the CPU; one mask per box
            (``multimask_output=False``: SAM's single best mask for an unambiguous box prompt).
        """
        if len(boxes) == 0:
            height, width = self.predictor.original_size
            return torch.zeros((0, height, width), dtype=torch.bool), torch.zeros(0)
        boxes = self.predictor.transform.apply_boxes_torch(
            boxes.to(self.device, torch.float32), self.predictor.original_size
        )
        masks, iou, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=boxes, multimask_output=False
        )
        return masks[:, 0].cpu(), iou[:, 0].cpu()

    @torch.inference_mode()
    def automatic(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's own automatic mask generator on ``image`` [H, W, 3] uint8 (a grid of point prompts),
        the original code's fallback for images where the detector finds nothing.

        Returns:
            ``(masks [K, H, W] bool, boxes [K, 4] x1 y1 x2 y2 pixels, predicted IoU [K])`` on the CPU,
            by decreasing predicted IoU.
        """
        found = sorted(
            SamAutomaticMaskGenerator(self.predictor.model, **self.automatic_options).generate(image),
            key=lambda m: -m["predicted_iou"],
        )
        height, width = image.shape[:2]
        if not found:
            return torch.zeros((0, height, width), dtype=torch.bool), torch.zeros(0, 4), torch.zeros(0)
        masks = torch.from_numpy(np.stack([m["segmentation"] for m in found]))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (m["bbox"] for m in found)], dtype=torch.float32)
        return masks, boxes, torch.tensor([m["predicted_iou"] for m in found], dtype=torch.float32)
