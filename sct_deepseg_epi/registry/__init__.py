"""The model registry: manifests (what a model is), the store (where it lives), downloads."""
