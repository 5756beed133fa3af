"""ewtune_tf.training (placeholder; filled in by its issue)."""
