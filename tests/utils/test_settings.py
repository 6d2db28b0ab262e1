"""The settings groups of utils/config.py: one place per setting, the key sets derived from it."""

from __future__ import annotations

import dataclasses

from utils.config import (
    MI_ONLY_KEYS,
    MODEL_KEYS,
    NEEDS_MI_KEYS,
    QUERY_KEYS,
    REPORTED_MI_KEYS,
    RUN_KEYS,
    SETTINGS_GROUPS,
    UNREAD_ORIGINAL_KEYS,
    SoIRConfig,
)

# The six sets as they were kept by hand before the roles became field metadata (utils/config.py's
# RUN_KEYS, QUERY_KEYS and UNREAD_ORIGINAL_KEYS, extractors' _MI_ONLY_KEYS / _NEEDS_MI, the report's
# MI_SETTINGS, own queries' MODEL_KEYS), copied here once to prove the derived sets equal them.
HAND_RUN_KEYS = {
    "B_model",
    "T2I",
    "add_string",
    "anns_file",
    "bad_images",
    "box_masks",
    "captions_file",
    "dataset",
    "debug",
    "device",
    "ds_inds_file",
    "dumb_crop",
    "duplicates",
    "experiment",
    "export_dir",
    "export_dtype",
    "features_dir",
    "format",
    "full_mask",
    "galleries_dir",
    "gallery",
    "gallery_chunk_size",
    "index",
    "index_blocks",
    "index_train_rows",
    "k_search",
    "lancedb_dir",
    "lora_adapt",
    "lora_alpha",
    "lora_rank",
    "map_at",
    "masks_from",
    "max_ds_index",
    "max_k_search",
    "model_name",
    "no_center_crop",
    "no_faiss",
    "no_gallery_crop",
    "no_resize",
    "num_workers",
    "only_create",
    "only_gallery",
    "precision_at",
    "queries_dir",
    "query_bbox",
    "query_captions_file",
    "query_exact_max_rows",
    "query_image",
    "query_mask",
    "query_text",
    "query_vectors",
    "read_dataset",
    "recall_at",
    "report",
    "report_k",
    "report_maps",
    "report_thumb_size",
    "rerank",
    "rerank_alpha",
    "rerank_k",
    "run_name",
    "run_type",
    "save_gallery_embeddings",
    "save_knns",
    "search",
    "search_block_mb",
    "search_candidates",
    "search_nprobe",
    "set",
    "single_from_sc",
    "stage",
    "subset",
    "tag",
    "text_prompt",
    "vec_dim",
    "verbose",
    "weights",
    "worker",
    "workers",
}
HAND_QUERY_KEYS = {
    "crop",
    "mask_input",
    "no_positive",
    "no_query_crop",
    "queries_dir",
    "query_captions_file",
    "query_extractor",
    "query_extractor_args",
    "query_masks",
    "query_mi",
}
HAND_UNREAD_ORIGINAL_KEYS = {
    "dumb_crop": False,
    "no_center_crop": False,
    "no_gallery_crop": False,
    "no_resize": False,
    "gallery": None,
    "read_dataset": True,
    "save_gallery_embeddings": False,
}
HAND_MI_ONLY_KEYS = {
    "alpha_sum",
    "alpha_sum_full",
    "avg_multiple_vecs",
    "descriptor",
    "full_mask",
    "legrad_norm",
    "mao_overlap",
    "mask_input",
    "mi_alpha",
    "mi_beta",
    "mi_cuda_graph",
    "mi_impl",
    "mi_init",
    "mi_iterations",
    "mi_layer_index",
    "mi_lr",
    "mi_precision",
    "mi_resample",
    "mi_sum",
    "mi_sum_loss",
    "object_desc",
    "smart_crop",
    "smart_crop_pad",
    "smart_crop_source",
}
HAND_NEEDS_MI = {
    "alpha_sum_full",
    "avg_multiple_vecs",
    "descriptor",
    "full_mask",
    "mask_input",
    "mi_init",
    "mi_sum",
    "object_desc",
    "smart_crop",
}
HAND_MI_SETTINGS = {
    "descriptor",
    "mao_overlap",
    "mi_alpha",
    "mi_beta",
    "mi_lr",
    "mi_iterations",
    "mi_layer_index",
    "mi_sum",
    "avg_multiple_vecs",
    "smart_crop",
    "smart_crop_pad",
    "mask_input",
    "missing_masks",
}
HAND_MODEL_KEYS = {"model_name", "B_model", "lora_adapt", "lora_rank", "lora_alpha", "weights"}


def test_derived_key_sets_equal_the_hand_kept_ones():
    assert RUN_KEYS == HAND_RUN_KEYS
    assert QUERY_KEYS == HAND_QUERY_KEYS
    assert UNREAD_ORIGINAL_KEYS == HAND_UNREAD_ORIGINAL_KEYS
    assert MI_ONLY_KEYS == HAND_MI_ONLY_KEYS and NEEDS_MI_KEYS == HAND_NEEDS_MI
    assert set(REPORTED_MI_KEYS) == HAND_MI_SETTINGS and len(REPORTED_MI_KEYS) == len(HAND_MI_SETTINGS)
    assert MODEL_KEYS == HAND_MODEL_KEYS


def test_every_key_sits_in_exactly_one_group():
    names = [f.name for group in SETTINGS_GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)) == len(dataclasses.fields(SoIRConfig)) == 122
    assert names == [f.name for f in dataclasses.fields(SoIRConfig)]  # the schema's order is the groups'
