"""The private fine-tuning recipe: one ``finetune()`` behind every entry point (layer 7).

``ewtune-train`` (``trainers/glue.py``) and the TFX Trainer
(``ewtune_tf.tfx.trainer_module``) are thin adapters that build a
:class:`FinetuneConfig` and call :func:`finetune`; Python users call it
directly::

    from ewtune_tf.recipe import FinetuneConfig, finetune

    result = finetune(FinetuneConfig(glue_dir="../shared/data/glue", output_dir="runs/sst2"))
    result.report["epsilon"], result.dev_accuracy, result.export_path

Modules:
  settings      typed settings: check, help, TFX exposure, resume rule (no TF).
  config        ``FinetuneConfig``: every setting once, the main job's defaults,
                ``privacy_plan(N)`` (no TF).
  data          ``TextExamples`` and the GLUE loading.
  optimization  the optimizer from the plan, learning rate, EMA, head clip share.
  checkpoint    checkpoint/resume (sidecar, mismatch refusal, kill safety).
  compute       precision policy, XLA, static shapes (padded Poisson batches), replicas.
  monitoring    progress lines, TensorBoard scalars, the privacy plot.
  finetuning    ``finetune()`` and ``FinetuneResult``.

Names are resolved lazily, so importing the config does not import TensorFlow.
"""

from ewtune_tf.utils.lazy import lazy_getattr

_LAZY = {
    "BatchOverflowError": "ewtune_tf.recipe.compute",
    "ConfigError": "ewtune_tf.recipe.settings",
    "FinetuneConfig": "ewtune_tf.recipe.config",
    "FinetuneResult": "ewtune_tf.recipe.finetuning",
    "TextExamples": "ewtune_tf.recipe.data",
    "finetune": "ewtune_tf.recipe.finetuning",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
