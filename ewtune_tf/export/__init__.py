"""ewtune_tf.export (placeholder; filled in by its issue)."""
