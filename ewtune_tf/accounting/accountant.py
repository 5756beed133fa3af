"""EdgeworthAccountant: a dp_accounting PrivacyAccountant.

Supported events (add-or-remove adjacency):
  * GaussianDpEvent                     -> q = 1
  * PoissonSampledDpEvent(GaussianDpEvent)
  * SelfComposedDpEvent, ComposedDpEvent of the above, NoOpDpEvent.
A zero noise multiplier is recorded as non-private (epsilon = inf). Everything
else is refused by `supports()` / `compose()` (UnsupportedEventError).

Composition is heterogeneous: each distinct (q, sigma) accumulates a count, and
the analytic accountant sums per-step CGFs / cumulants over the components.
Certification composes exactly the same components in a PLD accountant.
"""

import collections
import math
from typing import Optional

import dp_accounting
from dp_accounting import dp_event, privacy_accountant

from ewtune_tf.accounting import _validation as v
from ewtune_tf.accounting import api

NeighboringRelation = privacy_accountant.NeighboringRelation
_Details = privacy_accountant.PrivacyAccountant.CompositionErrorDetails


# Provenance of the two answers that need no accountant: no event composed
# yet (epsilon = delta = 0), and a NonPrivateDpEvent (epsilon = inf, delta = 1).
_EMPTY = dict(certified=True, method="empty", estimate=0.0, estimate_method="empty")
_NON_PRIVATE = dict(certified=True, method="non_private", estimate_method="non_private", flags=("non_private_event",))


class EdgeworthAccountant(dp_accounting.PrivacyAccountant):
    """Edgeworth / saddlepoint accountant for Poisson-subsampled Gaussians.

    Args:
      method: "tilted" (default, saddlepoint) or "edgeworth".
      order: expansion order, 1, 2 or 3.
      certify: if True (default), reported epsilons/deltas are proven upper
        bounds (max of estimate and dp_accounting's pessimistic PLD bound).
      neighboring_relation: only ADD_OR_REMOVE_ONE is supported.
      pld_value_discretization_interval: fixed PLD interval for certification
        (None: chosen adaptively so the PLD slack is <= 0.5 %).
    """

    def __init__(
        self,
        method: str = "tilted",
        order: int = 2,
        certify: bool = True,
        neighboring_relation: NeighboringRelation = (NeighboringRelation.ADD_OR_REMOVE_ONE),
        pld_value_discretization_interval: Optional[float] = None,
    ):
        if neighboring_relation != NeighboringRelation.ADD_OR_REMOVE_ONE:
            raise ValueError(
                "neighboring_relation must be ADD_OR_REMOVE_ONE (the relation under "
                f"which Poisson sampling is analysed); got {neighboring_relation}."
            )
        super().__init__(neighboring_relation)
        self._method = v.check_method(method)
        self._order = v.check_order(order)
        self._certify = bool(certify)
        if pld_value_discretization_interval is not None:
            v.check_positive_real(pld_value_discretization_interval, "pld_value_discretization_interval")
        self._pld_interval = pld_value_discretization_interval
        self._counts = collections.OrderedDict()  # (q, sigma) -> count
        self._non_private = False

    @property
    def components(self):
        """Tuple of (sampling_probability, noise_multiplier, count)."""
        return tuple((q, s, c) for (q, s), c in self._counts.items())

    def _maybe_compose(self, event: dp_event.DpEvent, count: int, do_compose: bool) -> Optional[_Details]:
        if isinstance(event, dp_event.NoOpDpEvent):
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, event.count * count, do_compose)
        if isinstance(event, dp_event.ComposedDpEvent):
            for e in event.events:
                err = self._maybe_compose(e, count, False)
                if err is not None:
                    return err
            if do_compose:
                for e in event.events:
                    self._maybe_compose(e, count, True)
            return None
        if isinstance(event, dp_event.GaussianDpEvent):
            return self._add(1.0, event.noise_multiplier, count, event, do_compose)
        if isinstance(event, dp_event.PoissonSampledDpEvent):
            if not isinstance(event.event, dp_event.GaussianDpEvent):
                return _Details(event, f"PoissonSampledDpEvent must wrap a GaussianDpEvent; found {event.event}.")
            q = event.sampling_probability
            if not 0.0 <= q <= 1.0:
                return _Details(event, f"sampling_probability must be in [0, 1]; got {q}.")
            if q == 0.0:
                return None  # Never sampled: no privacy cost.
            return self._add(q, event.event.noise_multiplier, count, event, do_compose)
        return _Details(
            event,
            "Unsupported event for EdgeworthAccountant (supports "
            "Gaussian, PoissonSampled(Gaussian), SelfComposed, Composed, "
            "NoOp).",
        )

    def _add(self, q, sigma, count, event, do_compose) -> Optional[_Details]:
        if not (isinstance(sigma, (int, float)) and sigma >= 0 and math.isfinite(sigma)):
            return _Details(event, f"noise_multiplier must be >= 0; got {sigma}.")
        if do_compose and count > 0:
            if sigma == 0:
                self._non_private = True
            else:
                key = (float(q), float(sigma))
                self._counts[key] = self._counts.get(key, 0) + int(count)
        return None

    def get_epsilon_result(self, target_delta: float) -> api.EpsilonResult:
        delta = v.check_delta(target_delta, "target_delta")
        if self._non_private:
            return api.EpsilonResult(math.inf, delta, estimate=math.inf, **_NON_PRIVATE)
        if not self._counts:
            return api.EpsilonResult(0.0, delta, **_EMPTY)
        return api.epsilon_for_components(
            self.components, delta, self._method, self._order, self._certify, self._pld_interval
        )

    def get_delta_result(self, target_epsilon: float) -> api.DeltaResult:
        eps = v.check_epsilon(target_epsilon, "target_epsilon")
        if self._non_private:
            return api.DeltaResult(1.0, eps, estimate=1.0, **_NON_PRIVATE)
        if not self._counts:
            return api.DeltaResult(0.0, eps, **_EMPTY)
        return api.delta_for_components(
            self.components, eps, self._method, self._order, self._certify, self._pld_interval
        )

    def get_epsilon(self, target_delta: float) -> float:
        return self.get_epsilon_result(target_delta).epsilon

    def get_delta(self, target_epsilon: float) -> float:
        return self.get_delta_result(target_epsilon).delta
