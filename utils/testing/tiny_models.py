"""Tiny, randomly initialised models saved to disk, for tests and the offline demo
(``python scripts/make_tiny_models.py --out demo_data/tiny_models`` saves them all).

Backbones (dinov2/, dinov2reg/, dinov3/, siglip/, siglip2/, clip/) are saved with an image-processor
config and loaded through the same ``from_pretrained`` path as real hub ids; siglip/ and clip/ are whole
SiglipModel / CLIPModel checkpoints with a tiny tokenizer built here (text queries: extractors/text.py);
owlv2/ is an Owlv2ForObjectDetection with a processor
whose CLIP tokenizer is built here (no hub access); sam/ holds a SAM built from segment-anything's
own modules, ``torch.save``'d like a released checkpoint, with its architecture as ``--sam_config``.
Random weights: numbers made with them mean nothing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import string
from pathlib import Path

import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTImageProcessor,
    DINOv3ViTModel,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from utils.masks.models import SamArchitecture, build_sam

# Small but not degenerate: 3 blocks (so layer_index -1 and -2 both make sense), 2 heads,
# a 4x4 patch grid.
_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
# Text towers of the tiny SigLIP / CLIP: their tokenizers below fit in this many ids.
TINY_TEXT_VOCAB = 64


def save_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Dinov2Model, patch 14, 56x56 input (4x4 patches + CLS), BitImageProcessor crop 56."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**_COMMON, image_size=56, patch_size=14))
    processor = BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return _save(model, processor, folder)


def save_tiny_dinov2reg(folder: str | Path, seed: int = 0, gated: bool = False) -> Path:
    """Dinov2WithRegistersModel, patch 14, 56x56 input (4x4 patches + CLS + 2 registers), BitImageProcessor
    crop 56 (as facebook/dinov2-with-registers-base); ``gated``: the SwiGLU MLP of the giant model."""
    torch.manual_seed(seed)
    model = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(**_COMMON, image_size=56, patch_size=14, num_register_tokens=2, use_swiglu_ffn=gated)
    )
    processor = BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return _save(model, processor, folder)


def save_tiny_dinov3(folder: str | Path, seed: int = 0, gated: bool = False) -> Path:
    """DINOv3ViTModel (RoPE, layer scale), patch 16, 64x64 input (4x4 patches + CLS + 2 registers),
    DINOv3ViTImageProcessor 64x64; ``gated``: the gated MLP of ViT-S+/H+/7B (``use_gated_mlp``)."""
    torch.manual_seed(seed)
    model = DINOv3ViTModel(
        DINOv3ViTConfig(**_COMMON, image_size=64, patch_size=16, num_register_tokens=2, use_gated_mlp=gated)
    )
    processor = DINOv3ViTImageProcessor(size={"height": 64, "width": 64})
    return _save(model, processor, folder)


def save_tiny_siglip(folder: str | Path, seed: int = 0, patch_size: int = 16, image_size: int = 64) -> Path:
    """A whole SiglipModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches, no CLS), with the attention-pooling head; and a 64-piece sentencepiece
    tokenizer (:func:`tiny_siglip_tokenizer`). ``patch_size`` / ``image_size``: another vision geometry
    (patch 14 at 56 px: the checkpoints whose LeGrad maps the original code upsampled by 16 anyway)."""
    tokenizer = tiny_siglip_tokenizer(folder)
    ids = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = SiglipModel(
        SiglipConfig(
            text_config=dict(**_COMMON, **ids, vocab_size=TINY_TEXT_VOCAB),
            vision_config=dict(**_COMMON, image_size=image_size, patch_size=patch_size),
        )
    )
    processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    folder = _save(model, processor, folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_siglip2(folder: str | Path, seed: int = 0) -> Path:
    """A whole Siglip2Model (NaFlex: patch sequences, each image its own grid) whose vision tower is patch
    16 with a 4x4 position grid, and a Siglip2ImageProcessor that keeps the aspect ratio within 16 patches."""
    torch.manual_seed(seed)
    model = Siglip2Model(
        Siglip2Config(
            text_config=dict(**_COMMON, vocab_size=64), vision_config=dict(**_COMMON, num_patches=16, patch_size=16)
        )
    )
    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=16)
    return _save(model, processor, folder)


def save_tiny_siglip2_fixres(folder: str | Path, seed: int = 0) -> Path:
    """A fixed-resolution SigLIP2 checkpoint as google/siglip2-base-patch16-224 ships it: model_type
    "siglip" (a SiglipModel, Gemma-sized vocabulary in the real one) and a SiglipImageProcessor with
    bilinear resampling; it loads through the siglip family (64x64 input, 4x4 patches)."""
    torch.manual_seed(seed)
    model = SiglipModel(
        SiglipConfig(
            text_config=dict(**_COMMON, vocab_size=256), vision_config=dict(**_COMMON, image_size=64, patch_size=16)
        )
    )
    processor = SiglipImageProcessor(size={"height": 64, "width": 64}, resample=2)
    return _save(model, processor, folder)


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A whole CLIPModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches + CLS), projection 24; and a letters-only CLIP tokenizer
    (:func:`tiny_clip_tokenizer` with ``symbols=string.ascii_lowercase``)."""
    tokenizer = tiny_clip_tokenizer(77, symbols=string.ascii_lowercase)
    # The text model pools at the first <|endoftext|> (eos_token_id); ids as the tokenizer's.
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(**_COMMON, **ids, vocab_size=TINY_TEXT_VOCAB, projection_dim=24),
            vision_config=dict(**_COMMON, image_size=64, patch_size=16, projection_dim=24),
            projection_dim=24,
        )
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    folder = _save(model, processor, folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save(model: torch.nn.Module, processor, folder: str | Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_dinov2_swiglu(folder: str | Path, seed: int = 0) -> Path:
    """:func:`save_tiny_dinov2` with the SwiGLU MLP of dinov2-giant (``use_swiglu_ffn``)."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**_COMMON, image_size=56, patch_size=14, use_swiglu_ffn=True))
    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    return _save(model, processor, folder)


# One tiny model per backbone family (the demo and the end-to-end tests run each) ...
TINY_BUILDERS = {
    "dinov2": save_tiny_dinov2,
    "dinov2reg": save_tiny_dinov2reg,
    "dinov3": save_tiny_dinov3,
    "siglip": save_tiny_siglip,
    "siglip2": save_tiny_siglip2,
    "clip": save_tiny_clip,
}
# ... and configurations of those families that the MI engine must handle too: gated MLPs, and the
# fixed-resolution SigLIP2 checkpoints, which are SigLIP models (model_type "siglip").
TINY_VARIANTS = {
    "dinov2_swiglu": save_tiny_dinov2_swiglu,
    "dinov2reg_gated": lambda folder, seed=0: save_tiny_dinov2reg(folder, seed, gated=True),
    "dinov3_gated": lambda folder, seed=0: save_tiny_dinov3(folder, seed, gated=True),
    "siglip2_fixres": save_tiny_siglip2_fixres,
}


TINY_SAM = SamArchitecture(
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    image_size=64,
    patch_size=16,
    window_size=2,
    prompt_embed_dim=32,
    mask_in_chans=4,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)
_MERGES = [("m", "u"), ("mu", "g</w>"), ("t", "o"), ("to", "y</w>")]


def tiny_clip_tokenizer(model_max_length: int = 16, symbols: str | None = None) -> CLIPTokenizer:
    """CLIP BPE: "a mug" -> <start> a</w> mug</w> <end>.

    ``symbols`` None: over all bytes, "!" (id 0) pads, as in CLIP (518 ids). A string (e.g. the
    lowercase letters): over those characters only, <|endoftext|> pads and stands for any other
    character, as real CLIP's unknown token does (2 * len(symbols) + 6 ids: small enough for a tiny
    text tower). <|endoftext|> is always the largest id: the OWL text model pools at
    ``input_ids.argmax(-1)``.
    """
    base = list(bytes_to_unicode().values()) if symbols is None else list(symbols)  # "!" first for bytes
    vocab = {s: i for i, s in enumerate(base + [s + "</w>" for s in base] + ["".join(m) for m in _MERGES])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    pad = "!" if symbols is None else "<|endoftext|>"
    return CLIPTokenizer(
        vocab=vocab, merges=list(_MERGES), pad_token=pad, unk_token="<|endoftext|>", model_max_length=model_max_length
    )


def tiny_siglip_tokenizer(folder: str | Path) -> SiglipTokenizer:
    """A SigLIP sentencepiece tokenizer of ``TINY_TEXT_VOCAB`` pieces (<pad>, </s>, <unk>, the letters,
    the digits and a few BPE merges), trained here on a fixed word list: deterministic, offline.
    Its model is written to ``folder/spiece.model`` (SiglipTokenizer reads it from a file)."""
    import sentencepiece  # SigLIP's tokenizer needs it (and protobuf) anyway

    words = "a photo of the mug toy cup box shoe lamp ball red blue green object star dots".split()
    corpus = [" ".join(words), string.ascii_lowercase, string.digits]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=TINY_TEXT_VOCAB,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(folder) / "spiece.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    # 64 tokens: SiglipTextConfig's max_position_embeddings, the length SigLIP pads every text to.
    return SiglipTokenizer(vocab_file=str(path), model_max_length=64)


def save_tiny_owlv2(folder: str | Path, seed: int = 0) -> Path:
    """Owlv2ForObjectDetection (2 layers, width 32, 64x64 input) + Owlv2Processor in ``folder``."""
    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(
            common,
            vocab_size=vocab_size,
            max_position_embeddings=16,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=0,
        ),
        vision_config=dict(common, image_size=64, patch_size=16),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    redraw_owlv2_heads(model)
    model.save_pretrained(folder)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    processor.save_pretrained(folder)
    return folder


@torch.no_grad()
def redraw_owlv2_heads(model: Owlv2ForObjectDetection) -> None:
    """Give the box/objectness/class heads the output scale of a trained detector.

    Owlv2's init draws these Linear weights with std 1, so at width 32 the logits are ~+-80:
    every sigmoid saturates (scores exactly 0 or 1, boxes of width 0) and no box survives.
    Redrawn at std 1/sqrt(fan_in), boxes stay near their grid cell (patch-sized) and scores
    spread over (0, 1), which is what the detection code must handle.
    """
    for head in (model.box_head, model.objectness_head, model.class_head):
        for layer in head.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                torch.nn.init.zeros_(layer.bias)
    model.box_head.dense2.weight.mul_(0.3)  # small offsets from the patch-cell prior
    model.objectness_head.dense2.weight.mul_(3.0)  # objectness spread over ~(0.05, 0.95)


def save_tiny_sam(folder: str | Path, seed: int = 0, arch: SamArchitecture = TINY_SAM) -> tuple[Path, Path]:
    """Random SAM of ``arch``: returns ``(checkpoint .pth, architecture .json)`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    checkpoint, config = folder / "sam_tiny.pth", folder / "sam_tiny.json"
    torch.save(build_sam(arch).state_dict(), checkpoint)
    config.write_text(json.dumps(dataclasses.asdict(arch)))
    return checkpoint, config
