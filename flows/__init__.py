"""Prefect flows that drive the DVC pipeline: one variant, sweeps of variants as DVC experiments, scheduled serving."""
