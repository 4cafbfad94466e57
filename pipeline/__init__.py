"""posttrain's shared plumbing: configuration, lineage, outputs, models, the embedded suite, the entry point.

Importing this package switches off telemetry (see :mod:`pipeline.env`) before any library that phones
home is imported, and quiets import-time noise that does not concern this project.
"""

from pipeline.console import quiet_dependency_noise
from pipeline.env import disable_telemetry, quiet_import_noise

disable_telemetry()
quiet_import_noise()
quiet_dependency_noise()
