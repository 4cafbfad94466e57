"""posttrain's shared plumbing: configuration, lineage, outputs, models, the embedded suite, the entry point.

Importing this package switches off telemetry (see :mod:`pipeline.env`) before any library that phones
home is imported.
"""

from pipeline.env import disable_telemetry

disable_telemetry()
