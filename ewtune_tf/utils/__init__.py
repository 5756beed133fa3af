"""Small TensorFlow-free helpers shared across layers (layer 0, with accounting).

* ``checks``: value checks whose errors name the parameter and its allowed
  range (used by the privacy plan, the recipe's settings and the adapters).
* ``files``: atomic JSON writes (temp file + ``os.replace``), so a kill never
  leaves a half-written report, history or checkpoint sidecar.
* ``versions``: the installed versions of the packages a run depends on.
"""
