"""Model registries: MLflow (and later SageMaker, Vertex AI)."""
