"""Tiny, randomly initialised models saved to disk, for tests and the offline demo.

    python scripts/make_tiny_models.py --out demo_data/tiny_models

Backbones (dinov2/, siglip/, clip/) are saved with an image-processor config and loaded through the
same ``from_pretrained`` path as real hub ids; owlv2/ is an Owlv2ForObjectDetection with a processor
whose CLIP tokenizer is built here (no hub access); sam/ holds a SAM built from segment-anything's
own modules, ``torch.save``'d like a released checkpoint, with its architecture as ``--sam_config``.
Random weights: numbers made with them mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `scripts` importable
    sys.path.insert(0, str(ROOT))
from utils.mask_models import SamArchitecture, build_sam  # noqa: E402

# Small but not degenerate: 3 blocks (so layer_index -1 and -2 both make sense), 2 heads,
# a 4x4 patch grid.
_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


def save_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Dinov2Model, patch 14, 56x56 input (4x4 patches + CLS), BitImageProcessor crop 56."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**_COMMON, image_size=56, patch_size=14))
    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(model, processor, folder)


def save_tiny_siglip(folder: str | Path, seed: int = 0) -> Path:
    """A whole SiglipModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches, no CLS), with the attention-pooling head."""
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=dict(**_COMMON, vocab_size=64),
                                     vision_config=dict(**_COMMON, image_size=64, patch_size=16)))
    processor = SiglipImageProcessor(size={"height": 64, "width": 64})
    return _save(model, processor, folder)


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A whole CLIPModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches + CLS), projection 24."""
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=dict(**_COMMON, vocab_size=64, projection_dim=24),
                                 vision_config=dict(**_COMMON, image_size=64, patch_size=16, projection_dim=24),
                                 projection_dim=24))
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return _save(model, processor, folder)


def _save(model: torch.nn.Module, processor, folder: str | Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TINY_BUILDERS = {"dinov2": save_tiny_dinov2, "siglip": save_tiny_siglip, "clip": save_tiny_clip}


TINY_SAM = SamArchitecture(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                           encoder_global_attn_indexes=(1,), image_size=64, patch_size=16, window_size=2,
                           prompt_embed_dim=32, mask_in_chans=4, decoder_mlp_dim=64, decoder_num_heads=2,
                           iou_head_hidden_dim=32)
_MERGES = [("m", "u"), ("mu", "g</w>"), ("t", "o"), ("to", "y</w>")]


def tiny_clip_tokenizer(model_max_length: int = 16) -> CLIPTokenizer:
    """CLIP BPE over bytes: "a mug" -> <start> a</w> mug</w> <end>; "!" (id 0) pads, as in CLIP."""
    symbols = list(bytes_to_unicode().values())  # "!" first, so the pad id is 0 like real CLIP
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols]
                                        + ["".join(m) for m in _MERGES])}
    # End-of-text must be the largest id: the OWL text model pools at input_ids.argmax(-1).
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), pad_token="!", model_max_length=model_max_length)


def save_tiny_owlv2(folder: str | Path, seed: int = 0) -> Path:
    """Owlv2ForObjectDetection (2 layers, width 32, 64x64 input) + Owlv2Processor in ``folder``."""
    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(common, vocab_size=vocab_size, max_position_embeddings=16,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0),
        vision_config=dict(common, image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config)
    redraw_owlv2_heads(model)
    model.save_pretrained(folder)
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=tokenizer)
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
                torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder; one sub-folder per model")
    args = parser.parse_args()
    for name, build in TINY_BUILDERS.items():
        print(f"{name}: {build(args.out / name)}")
    print(f"owlv2: {save_tiny_owlv2(args.out / 'owlv2')}")
    checkpoint, config = save_tiny_sam(args.out / "sam")
    print(f"sam: {checkpoint} (--sam_config {config})")


if __name__ == "__main__":
    main()
