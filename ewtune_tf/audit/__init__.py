"""ewtune_tf.audit (placeholder; filled in by its issue)."""
