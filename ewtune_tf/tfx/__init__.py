"""TFX integration: the private Trainer, the PrivacyReport artifact, the privacy gate (layer 8).

Modules (import them directly; this package imports nothing heavy itself):
  config          ``custom_config`` -> ``ewtune_tf.recipe.FinetuneConfig`` (no TF).
  trainer_module  ``run_fn(fn_args)`` for ``tfx.components.Trainer``: runs
                  ``ewtune_tf.recipe.finetune`` on the Examples.
  artifacts       the ``PrivacyReport`` artifact type (needs tfx).
  gate            the budget decision behind PrivacyGate (no TF).
  components      ``PrivacyReportGen`` and ``PrivacyGate`` (needs tfx).

The privacy report is the ``ewtune_tf.privacy`` schema, the same as
``ewtune-train``'s. Needs the TFX environment (.venv-tfx: Python 3.10, tfx
1.16.0). The pipeline that wires these together is ``trainers/tfx_pipeline.py``.
"""
