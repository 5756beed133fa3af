"""ewtune_tf.tfx (placeholder; filled in by its issue)."""
