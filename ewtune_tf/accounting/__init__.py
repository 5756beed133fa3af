"""ewtune_tf.accounting (placeholder; filled in by its issue)."""
