"""juturna-operator: runs Juturna pipelines as the Kubernetes custom resource ``Pipeline``."""

__version__ = "0.1.0"
