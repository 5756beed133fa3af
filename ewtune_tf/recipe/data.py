"""The recipe's data: labelled text, from GLUE or from the caller.

``finetune(config, train, dev)`` takes its data as :class:`TextExamples`
(or anything :func:`as_examples` converts: a ``GlueSplit``, or a
``(texts, labels)`` pair); given none, it loads the GLUE task of the config.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ewtune_tf.nlp import glue as glue_lib


@dataclasses.dataclass(frozen=True)
class TextExamples:
    """Labelled text in memory.

    Attributes:
      texts: one array of strings per text input (two for sentence pairs),
        each of length ``len(labels)``.
      labels: int class ids in ``[0, num_classes)``.
      text_keys: names of the text inputs (the serving signature's inputs).
      label_names: class names (their index is the label), or None.
      source: where the data came from (for the report).
    """

    texts: Tuple[np.ndarray, ...]
    labels: np.ndarray
    text_keys: Tuple[str, ...] = ("sentence",)
    label_names: Optional[Tuple[str, ...]] = None
    source: str = "memory"

    def __post_init__(self):
        texts = tuple(np.asarray(t, dtype=object).reshape(-1) for t in self.texts)
        labels = np.asarray(self.labels).astype(np.int64).reshape(-1)
        if not texts or len(texts) != len(self.text_keys):
            raise ValueError(f"texts: one array per text key {self.text_keys}; got {len(texts)}.")
        if any(len(t) != len(labels) for t in texts):
            raise ValueError(
                f"texts and labels must have one row per example; got {[len(t) for t in texts]} texts "
                f"for {len(labels)} labels."
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: Optional[int]) -> "TextExamples":
        """The first ``n`` examples (all if ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(self, texts=tuple(t[:n] for t in self.texts), labels=self.labels[:n])


Data = Union[TextExamples, "glue_lib.GlueSplit", Tuple[Any, Any]]


def as_examples(data: Data, text_keys: Sequence[str] = ("sentence",)) -> TextExamples:
    """A ``TextExamples`` from a ``GlueSplit``, a ``TextExamples`` or ``(texts, labels)``
    (``texts``: one array of strings, or a tuple of two for pairs)."""
    if isinstance(data, TextExamples):
        return data
    if isinstance(data, glue_lib.GlueSplit):
        task = data.task
        return TextExamples(data.texts, data.labels, task.text_keys, task.label_names, data.source)
    if isinstance(data, tuple) and len(data) == 2:
        texts, labels = data
        texts = texts if isinstance(texts, tuple) else (texts,)  # a tuple: one array per text input
        return TextExamples(texts, labels, tuple(text_keys)[: len(texts)])
    raise ValueError(f"data must be TextExamples, a GlueSplit or a (texts, labels) pair; got {type(data).__name__}.")


def load_task_data(config) -> Tuple[TextExamples, Dict[str, TextExamples]]:
    """The GLUE task of ``config``: its train split and its dev split(s), main one first."""
    task = glue_lib.get_task(config.task)
    load = lambda split, k: as_examples(glue_lib.load_glue(task.name, split, glue_dir=config.glue_dir, max_examples=k))
    train = load("train", config.max_train_examples)
    return train, {s: load(s, config.max_eval_examples) for s in task.dev_splits}


def resolve_data(config, train: Optional[Data], dev) -> Tuple[TextExamples, Dict[str, TextExamples]]:
    """The run's (train, {dev split: examples}): the given data (cut to
    ``max_*_examples``), or the config's GLUE task."""
    if train is None:
        if dev is not None:
            raise ValueError("dev: give train data too, or neither (then the GLUE task of the config is loaded).")
        return load_task_data(config)
    keys = glue_lib.get_task(config.task).text_keys
    train = as_examples(train, keys).take(config.max_train_examples)
    if dev is None:
        devs = {}
    elif isinstance(dev, Mapping):
        devs = {str(k): as_examples(v, keys) for k, v in dev.items()}
    else:
        devs = {"dev": as_examples(dev, keys)}
    return train, {k: v.take(config.max_eval_examples) for k, v in devs.items()}
