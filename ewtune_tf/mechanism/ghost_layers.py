"""Ghost-clipping rules: the registry, the recorder rules write to, and the
capture of a forward pass.

A *ghost rule* knows how one layer class uses its weights. While
:func:`capture_layers` is active, every layer of the model that has a rule and
owns at least one of the clipped variables runs the rule instead of its own
``call`` (on the instance only, for calls made by the capturing thread). The
rule recomputes the layer's output through a :class:`Recorder`, which

1. reads weights through a raw ``ReadVariableOp`` (so the gradient tape does
   *not* mark them as accessed; any other read of the same variable shows up
   in ``tape.watched_variables()`` and sends that variable to the exact
   jacobian fallback of :mod:`ewtune_tf.mechanism.ghost`), and
2. records *taps* (:mod:`ewtune_tf.mechanism.ghost_taps`): watched outputs
   plus what is needed to form per-record gradients from their gradients.

Registering a rule for your own layer::

    from ewtune_tf.mechanism.ghost_layers import register_ghost_rule

    @register_ghost_rule(MyScale)            # y = x * w, w of shape [d]
    def _my_scale(layer, rec, x):
        if x.shape.rank != 3:
            return NotImplemented            # this call runs MyScale.call
        return rec.einsum("btd,d->btd", x, layer.w)

A rule is called as ``rule(layer, rec, *args, **kwargs)`` with the layer's
call arguments and returns the layer's output, or ``NotImplemented`` (before
reading any weight through ``rec``) to run the layer's own ``call`` for this
configuration. A rule registered for class C serves C and the subclasses of C
that do not override ``call``. A rule must compute exactly what the layer
computes and must not couple examples (no batch statistics). Layers without
a rule keep the exact fallback: correct, but as slow as per-example
jacobians for their variables.

The built-in rules live in :mod:`ewtune_tf.mechanism.ghost_rules` (one module
per layer family) and register on import.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import tensorflow as tf
from tensorflow.python.ops import gen_resource_variable_ops

from ewtune_tf.mechanism.ghost_taps import EinsumTap, GatherTap, ReduceTap, Tap

GhostRule = Callable[..., Any]

__all__ = [
    "GhostRule",
    "Recorder",
    "as_tf_variable",
    "capture_layers",
    "ghost_rule_for",
    "register_ghost_rule",
    "registered_layers",
]


# --------------------------------------------------------------------------
# The recorder (what a rule writes to)
# --------------------------------------------------------------------------


def as_tf_variable(v):
    """The ``tf.Variable`` behind a Keras 3 variable (or ``v`` itself)."""
    if isinstance(v, tf.Variable):
        return v
    for attr in ("_value", "value"):
        inner = getattr(v, attr, None)
        if isinstance(inner, tf.Variable):
            return inner
    raise TypeError(f"Cannot find the tf.Variable behind {v!r}.")


class Recorder:
    """Collects the taps of one forward pass under ``tape``.

    Rules use :meth:`read` for every weight they touch and the tap helpers
    (:meth:`einsum`, :meth:`gather`, :meth:`reduce`), which tap a weight only
    when it is one of the clipped variables.
    """

    def __init__(self, tape: tf.GradientTape, tf_variables: Sequence):
        self.tape = tape
        self.taps: List[Tap] = []
        self._index: Dict[int, int] = {id(v): i for i, v in enumerate(tf_variables)}

    def index_of(self, keras_var) -> Optional[int]:
        """Position of ``keras_var`` among the clipped variables, or None."""
        if keras_var is None:
            return None
        return self._index.get(id(as_tf_variable(keras_var)))

    def wants_any(self, *keras_vars) -> bool:
        return any(self.index_of(v) is not None for v in keras_vars)

    def read(self, keras_var, dtype=None) -> tf.Tensor:
        """Reads a variable without registering an access on any tape."""
        v = as_tf_variable(keras_var)
        value = gen_resource_variable_ops.read_variable_op(v.handle, v.dtype)
        if dtype is not None and value.dtype != dtype:
            value = tf.cast(value, dtype)
        # Watched so that gradients w.r.t. this use of the weight can be taken
        # (two-pass mode, jacobian fallback); in graph mode the unused weight
        # gradients of the norm pass are pruned.
        self.tape.watch(value)
        return value

    def _tap(self, tap: Tap) -> tf.Tensor:
        self.tape.watch(tap.output)
        self.taps.append(tap)
        return tap.output

    def einsum(self, equation: str, x: tf.Tensor, keras_var, *, scale: Optional[float] = None) -> tf.Tensor:
        """``einsum(equation, x * scale, weight)``, tapped if the weight is clipped.

        ``equation``: explicit (no ellipsis), first input letter the batch
        axis, not used by the kernel; every kernel letter in the input or the
        output (see ``ghost_rules.dense.einsum_supported``).
        """
        if scale is not None:
            x = x * tf.cast(scale, x.dtype)
        w = self.read(keras_var, x.dtype)
        z = tf.einsum(equation, x, w)
        idx = self.index_of(keras_var)
        if idx is None:
            return z
        return self._tap(EinsumTap(var_index=idx, output=z, weight_read=w, equation=equation, inputs=x))

    def gather(self, keras_var, ids: tf.Tensor, dtype=None) -> tf.Tensor:
        """``take(table, ids, axis=0)`` cast to ``dtype``, tapped if clipped."""
        table = self.read(keras_var)
        z = tf.gather(table, ids)
        if dtype is not None:
            z = tf.cast(z, dtype)
        idx = self.index_of(keras_var)
        if idx is None:
            return z
        return self._tap(GatherTap(var_index=idx, output=z, weight_read=table, ids=ids, num_rows=int(table.shape[0])))

    def merge(self, total: tf.Tensor, parts: Sequence[tf.Tensor]) -> tf.Tensor:
        """Declares ``total = sum(parts) + (terms independent of parts)``.

        Taps watching one of ``parts`` then watch ``total`` instead: its
        gradient is theirs, and the norm pass keeps one output gradient for
        all of them (e.g. a kernel, its LoRA term and its bias) instead of one
        each. Returns ``total``.
        """
        ids = {id(p) for p in parts if p.shape == total.shape}
        moved = False
        for tap in self.taps:
            if id(tap.output) in ids:
                tap.output, moved = total, True
        if moved:
            self.tape.watch(total)
        return total

    def reduce(
        self,
        keras_var,
        weight: tf.Tensor,
        output: tf.Tensor,
        per_example: Callable[[tf.Tensor], tf.Tensor],
        expand: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
    ) -> tf.Tensor:
        """Taps ``output`` (computed from ``weight = rec.read(keras_var)``) with
        an explicit per-example gradient (see :class:`ReduceTap`); returns the
        tensor to use downstream."""
        idx = self.index_of(keras_var)
        if idx is None:
            return output
        tap = ReduceTap(
            var_index=idx,
            output=output,
            weight_read=weight,
            per_example=per_example,
            expand=expand or (lambda s, shape=tuple(weight.shape): tf.reshape(s, shape)),
        )
        return self._tap(tap)


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

# Layer class (or "module:QualName", resolved once that module is imported)
# -> rule. Insertion order is kept so registered_layers() is stable.
_RULES: Dict[Union[type, str], GhostRule] = {}


def register_ghost_rule(layer_class: Union[type, str], rule: Optional[GhostRule] = None):
    """Registers ``rule`` as the ghost rule of ``layer_class`` (see the module
    docstring); with ``rule`` omitted, returns a decorator.

    Args:
      layer_class: a Keras layer class, or ``"module.path:ClassName"`` for a
        class whose module should not be imported just to register it (the
        rule applies once that module has been imported by the model's code).
      rule: ``rule(layer, rec, *args, **kwargs)`` -> output or
        ``NotImplemented``. Replaces an earlier rule for the same class.
    """
    if not (isinstance(layer_class, type) or (isinstance(layer_class, str) and ":" in layer_class)):
        raise ValueError(f"layer_class must be a layer class or 'module:ClassName'; got {layer_class!r}.")
    if rule is None:
        return lambda fn: register_ghost_rule(layer_class, fn)
    if not callable(rule):
        raise ValueError(f"rule for {layer_class!r} must be callable; got {rule!r}.")
    _RULES[layer_class] = rule
    return rule


def _resolve(key: Union[type, str]) -> Optional[type]:
    if isinstance(key, type):
        return key
    module_name, qualname = key.split(":", 1)
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _rules_by_class() -> Dict[type, GhostRule]:
    out: Dict[type, GhostRule] = {}
    for key, rule in _RULES.items():
        cls = _resolve(key)
        if cls is not None:
            out[cls] = rule
    return out


def ghost_rule_for(layer) -> Optional[GhostRule]:
    """The rule serving ``layer``: the one registered for the nearest class of
    its MRO, provided ``layer``'s class does not override that class's
    ``call``; None otherwise (the layer keeps the exact fallback)."""
    rules = _rules_by_class()
    for cls in type(layer).__mro__:
        rule = rules.get(cls)
        if rule is not None:
            return rule if type(layer).call is cls.call else None
    return None


def registered_layers() -> Tuple[str, ...]:
    """Names of the layer classes with a ghost rule (lazy ones as given)."""
    return tuple(key.__name__ if isinstance(key, type) else key for key in _RULES)


# --------------------------------------------------------------------------
# Capture: patched calls, shared between threads
# --------------------------------------------------------------------------


def _all_layers(model) -> list:
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=True, recursive=True))
    return [model]


# Patches are shared between threads: tf.distribute.MirroredStrategy traces
# one replica function per device in parallel threads on the *same* layer
# objects. A layer is patched once (reference counted, under a lock) with a
# dispatcher that uses the calling thread's active Recorder, and the
# original ``call`` when that thread has none.
_LOCK = threading.Lock()
_PATCHED: Dict[int, list] = {}  # id(layer) -> [layer, had_instance_call, original, count]
_TLS = threading.local()


def _dispatcher(layer, rule: GhostRule, original):
    def call(*args, **kwargs):
        rec = getattr(_TLS, "recorder", None)
        if rec is None or not rec.wants_any(*layer.trainable_weights):
            return original(*args, **kwargs)
        before = len(rec.taps)
        out = rule(layer, rec, *args, **kwargs)
        if out is NotImplemented:
            if len(rec.taps) != before:
                raise RuntimeError(
                    f"ghost rule {getattr(rule, '__name__', rule)!r} for layer {layer.name!r} returned "
                    "NotImplemented after recording taps; decline before reading any weight."
                )
            return original(*args, **kwargs)
        return out

    return call


@contextlib.contextmanager
def capture_layers(model, rec: Recorder) -> Iterator[None]:
    """Routes the layers of ``model`` that have a rule and own a clipped
    variable through their rule, for calls made by this thread."""
    installed = []
    previous = getattr(_TLS, "recorder", None)
    _TLS.recorder = rec
    try:
        with _LOCK:
            for layer in _all_layers(model):
                rule = ghost_rule_for(layer)
                if rule is None or not rec.wants_any(*layer.trainable_weights):
                    continue
                entry = _PATCHED.get(id(layer))
                if entry is None:
                    had = "call" in layer.__dict__
                    original = layer.call
                    object.__setattr__(layer, "call", _dispatcher(layer, rule, original))
                    entry = _PATCHED[id(layer)] = [layer, had, original, 0]
                entry[3] += 1
                installed.append(id(layer))
        yield
    finally:
        _TLS.recorder = previous
        with _LOCK:
            for key in reversed(installed):
                _unpatch(key)


def _unpatch(key: int) -> None:
    entry = _PATCHED[key]
    entry[3] -= 1
    if entry[3] == 0:
        layer, had, original, _ = entry
        if had:
            object.__setattr__(layer, "call", original)
        else:
            object.__delattr__(layer, "call")
        del _PATCHED[key]
