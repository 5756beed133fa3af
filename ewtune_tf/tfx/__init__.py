"""TFX integration: private Trainer module, PrivacyReport artifact, privacy gate.

Modules (import them directly; this package imports nothing heavy itself):
  config          Trainer ``custom_config`` parsing and validation (no TF).
  accounting      noise calibration and the certified privacy report (no TF).
  training        DP-SGD fine-tuning of a KerasHub BERT classifier.
  trainer_module  ``run_fn(fn_args)`` for ``tfx.components.Trainer``.
  artifacts       the ``PrivacyReport`` artifact type (needs tfx).
  gate            the budget decision behind PrivacyGate (no TF).
  components      ``PrivacyReportGen`` and ``PrivacyGate`` (needs tfx).

Needs the TFX environment (.venv-tfx: Python 3.10, tfx 1.16.0). The pipeline
that wires these together is ``trainers/tfx_pipeline.py``.
"""
