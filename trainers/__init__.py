"""Command-line entry points: ``ewtune-train`` (``glue``) and the TFX pipeline (``tfx_pipeline``).

Layer 9, the top: thin adapters over ``ewtune_tf.recipe``; nothing imports them.
"""
