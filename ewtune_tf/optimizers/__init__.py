"""ewtune_tf.optimizers (placeholder; filled in by its issue)."""
