"""juturna-operator: runs Juturna pipelines as the Kubernetes custom resource ``Pipeline``."""

from importlib.metadata import version

# One version, pyproject.toml's: the wheel, the image and the chart (make package) carry it.
__version__ = version("juturna-operator")
