"""The DP mechanism: per-example clipping and Gaussian noise (TensorFlow).

Layer 2: may import ``ewtune_tf.accounting``, ``ewtune_tf.privacy`` and
``ewtune_tf.utils``, nothing above them.

Modules (import them directly; this package imports nothing eagerly, so that
``ewtune_tf.mechanism.ghost`` can register itself without import cycles):

* ``records``: what a record is (an example, or a keyed microbatch group)
  and its sensitivity; the accounted noise multiplier.
* ``per_example``: vectorized per-record gradients.
* ``clipping``: the clipping-implementation registry (``ClippedGradients``,
  ``clipped_gradient_sum``, ``register_clipping_impl``, group-wise clipping
  with ``ClipGroups``) with "vectorized"
  and "microbatch"; "ghost" lives in ``ghost``.
* ``ghost``: ghost clipping ("ghost", "ghost_two_pass", ``ghost_norms``);
  ``ghost_layers``: the ghost-rule registry (``register_ghost_rule``), the
  ``Recorder`` rules write to, and the capture of a forward pass;
  ``ghost_taps``: the per-example norm and clipped-sum math of each kind of
  weight use; ``ghost_rules``: the built-in rules, one module per layer family.
* ``noise``: Gaussian noise on the clipped sum through TF Privacy's DPQuery
  (fixed and adaptive clipping), secure per-replica random streams.
* ``tf_privacy``: the one place that imports TensorFlow Privacy.
"""
