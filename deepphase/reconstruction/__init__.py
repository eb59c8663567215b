"""Reconstruction: batched prediction and stitching."""
