"""Artifact stores: local, S3, GCS."""
