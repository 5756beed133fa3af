"""The ``PrivacyReport`` artifact type, recorded in ML Metadata.

Its properties are typed MLMD properties (queryable without opening files);
the artifact's URI holds the full ``privacy_report.json`` written by the
Trainer. ``certified_epsilon`` is the number to gate on: an upper bound from
the certified accountant. ``estimated_epsilon`` is an approximation, kept for
comparison, and is -1.0 where no estimate was available.
"""

from tfx.types.artifact import Artifact, Property, PropertyType

REPORT_FILE = "privacy_report.json"


class PrivacyReport(Artifact):
    """Differential-privacy guarantee of one trained model."""

    TYPE_NAME = "EWTunePrivacyReport"
    PROPERTIES = {
        "certified_epsilon": Property(type=PropertyType.FLOAT),
        "estimated_epsilon": Property(type=PropertyType.FLOAT),
        "target_epsilon": Property(type=PropertyType.FLOAT),
        "delta": Property(type=PropertyType.FLOAT),
        "noise_multiplier": Property(type=PropertyType.FLOAT),
        "sampling_probability": Property(type=PropertyType.FLOAT),
        "steps": Property(type=PropertyType.INT),
        "sampling_method": Property(type=PropertyType.STRING),
        "accountant": Property(type=PropertyType.STRING),
        "l2_norm_clip": Property(type=PropertyType.FLOAT),
        "dataset_size": Property(type=PropertyType.INT),
    }
