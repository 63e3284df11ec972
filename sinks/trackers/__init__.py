"""Experiment trackers: jsonl (local), MLflow, TensorBoard, W&B."""
