"""ICD: online In-Context Distillation for small vision-language models.

Importing the package sets safe defaults for Prefect on an offline machine (no analytics,
a startup limit long enough for a fresh ephemeral server); explicit settings win.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # per-model "Loading weights" bars; icd shows its own
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
