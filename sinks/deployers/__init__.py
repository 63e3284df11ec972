"""Model deployers: MLflow alias (and later SageMaker and Vertex AI endpoints)."""
