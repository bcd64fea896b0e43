"""Data modules: on-the-fly procedural images and webdataset shards. Batches are dicts:
``pixels`` (B, 3, H, W) in [-1, 1] and/or ``latents`` (B, C, h, w) already scaled for the teacher,
optional ``caption`` (list[str])."""
