"""TensorBoard scalars, with or without the ``tensorboard`` package installed."""


def write_scalar(tag: str, value: float, step: int) -> None:
    """Writes one scalar to the default summary writer.

    Uses ``tf.summary.scalar`` when the ``tensorboard`` package is installed,
    else the core ``tf.summary.write`` op with the scalars-plugin metadata,
    which is the same event.
    """
    import tensorflow as tf

    try:
        tf.summary.scalar(tag, value, step=step)
    except Exception:  # TBNotInstalledError
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)
