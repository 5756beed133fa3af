"""ewtune_tf.data (placeholder; filled in by its issue)."""
