"""ewtune_tf.nlp (placeholder; filled in by its issue)."""
