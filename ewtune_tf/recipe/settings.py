"""Typed settings: each knob of the recipe declared once, with its check and help.

A :class:`Setting` rides on a dataclass field's metadata. From it come the
Python validation of ``FinetuneConfig``, the ``ewtune-train`` flags (type,
default, help) and the TFX ``custom_config`` keys, so a new setting is one
field. Errors are :class:`ConfigError`, whose message names the setting the
way the caller's user spells it (``--batch_size``,
``custom_config['batch_size']`` or ``batch_size``). No TensorFlow import.
"""

import dataclasses
import re
import sys
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from ewtune_tf.utils import checks

Naming = Callable[[str], str]
_MARK = "\x00"  # Stands for a setting's name inside a message until it is rendered.


def plain_name(field: str) -> str:
    return field


def escape(text: str) -> str:
    """``text`` as a literal inside a ConfigError template."""
    return str(text).replace("{", "{{").replace("}", "}}")


class ConfigError(ValueError):
    """A setting is out of range or inconsistent with the data (exit status 2 in the CLI).

    ``render(naming)`` writes the message with each setting named by
    ``naming`` (``str(e)`` uses the plain field names).
    """

    def __init__(self, template: str, *fields: str, naming: Naming = plain_name):
        self.template = template
        self.fields = fields
        super().__init__(self.render(naming))

    def named(self, naming: Naming) -> "ConfigError":
        """The same error, its ``str`` naming settings with ``naming``."""
        return ConfigError(self.template, *self.fields, naming=naming)

    def render(self, naming: Naming = plain_name) -> str:
        return self.template.format(**{f: naming(f) for f in self.fields})

    @classmethod
    def about(cls, field: str, message: str) -> "ConfigError":
        """Wraps a message that names ``field`` as ``{field}``; other braces are kept literally."""
        return cls(escape(message).replace(_MARK + field + _MARK, "{" + field + "}"), field)

    @classmethod
    def from_library(cls, message: str, fields: Sequence[str]) -> Optional["ConfigError"]:
        """A library ValueError that starts with a setting's name
        (``"sequence_length must be ..."``) as a ConfigError; None otherwise."""
        match = re.match(r"[A-Za-z_0-9]+", message)
        field = match.group(0) if match and match.group(0) in fields else None
        return None if field is None else cls("{" + field + "}" + escape(message[len(field) :]), field)

    @classmethod
    def checking(cls, field: str, check: Callable[[str], Any]) -> Any:
        """Runs ``check(name)`` and turns its ValueError (which names ``name``) into a ConfigError."""
        try:
            return check(_MARK + field + _MARK)
        except ConfigError:
            raise
        except ValueError as e:
            raise cls.about(field, str(e)) from None


# ------------------------------------------------------------------- checks
@dataclasses.dataclass(frozen=True)
class Real:
    low: float = float("-inf")
    high: float = float("inf")
    low_open: bool = True
    high_open: bool = True
    optional: bool = False
    parse = float

    def validate(self, name: str, value: Any) -> Optional[float]:
        return checks.check_real(
            name, value, self.low, self.high, low_open=self.low_open, high_open=self.high_open, optional=self.optional
        )

    def describe(self) -> str:
        text = checks.describe_real(self.low, self.high, low_open=self.low_open, high_open=self.high_open)
        return text + (" or unset" if self.optional else "")


@dataclasses.dataclass(frozen=True)
class Int:
    low: Optional[int] = None
    high: Optional[int] = None
    optional: bool = False
    parse = int

    def validate(self, name: str, value: Any) -> Optional[int]:
        return checks.check_int(name, value, self.low, self.high, optional=self.optional)

    def describe(self) -> str:
        return checks.describe_int(self.low, self.high) + (" or unset" if self.optional else "")


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of ``choices``: a tuple, or a callable giving them (a registry that
    imports TensorFlow: then only the type is checked until ``deep=True``)."""

    choices: Union[Tuple[str, ...], Callable[[], Sequence[str]]]
    parse = str

    def options(self) -> Optional[Tuple[str, ...]]:
        return tuple(self.choices) if not callable(self.choices) else None

    def validate(self, name: str, value: Any, deep: bool = False) -> str:
        options = self.options()
        if options is None and deep:
            options = tuple(self.choices())
        if options is None:
            return checks.check_text(name, value)
        return checks.check_choice(name, value, options)

    def describe(self) -> str:
        options = self.options()
        return "a registered name" if options is None else checks.describe_choice(options)


@dataclasses.dataclass(frozen=True)
class Text:
    optional: bool = False
    parse = str

    def validate(self, name: str, value: Any) -> Optional[str]:
        return checks.check_text(name, value, optional=self.optional)

    def describe(self) -> str:
        return "a non-empty string" + (" or unset" if self.optional else "")


@dataclasses.dataclass(frozen=True)
class Flag:
    parse = bool

    def validate(self, name: str, value: Any) -> bool:
        return checks.check_bool(name, value)

    def describe(self) -> str:
        return "True or False"


Check = Union[Real, Int, Choice, Text, Flag]


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one field of a config is checked, documented and exposed.

    Attributes:
      check: the allowed values.
      help: what it does, with units (the CLI help and the docs).
      tfx: also a TFX ``custom_config`` key (False: the Trainer decides it,
        e.g. output directories).
      resume: must equal the checkpoint's to resume it (it changes what the
        checkpoint holds or how the model trains); privacy-relevant settings
        are compared through the privacy plan instead.
    """

    check: Check
    help: str
    tfx: bool = True
    resume: bool = False


def setting(default: Any, check: Check, help: str, *, tfx: bool = True, resume: bool = False):
    """A dataclass field carrying its :class:`Setting`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(check, help, tfx=tfx, resume=resume)})


def settings_of(config_class) -> Tuple[Tuple[dataclasses.Field, Setting], ...]:
    return tuple((f, f.metadata["setting"]) for f in dataclasses.fields(config_class) if "setting" in f.metadata)


def validate_fields(config, deep: bool = False) -> dict:
    """Checked values of every setting of ``config`` (ConfigError on the first bad one)."""
    out = {}
    for field, s in settings_of(type(config)):
        value = getattr(config, field.name)
        if isinstance(s.check, Choice):
            out[field.name] = ConfigError.checking(field.name, lambda n, c=s.check, v=value: c.validate(n, v, deep))
        else:
            out[field.name] = ConfigError.checking(field.name, lambda n, c=s.check, v=value: c.validate(n, v))
    return out


def flag_name(field: str) -> str:
    """How the command line spells a setting."""
    return "--" + field


def add_arguments(parser, config_class, only: Optional[Sequence[str]] = None) -> None:
    """One ``--<field>`` flag per setting of ``config_class`` (or of those named
    in ``only``): type, default and help (with the allowed values) from the
    setting; booleans are switches."""
    for field, s in settings_of(config_class):
        if only is not None and field.name not in only:
            continue
        default = field.default
        if isinstance(s.check, Flag):
            parser.add_argument(flag_name(field.name), action="store_true", help=s.help)
            continue
        shown = "unset" if default is None else default
        parser.add_argument(
            flag_name(field.name),
            type=s.check.parse,
            default=default,
            help=f"{s.help} Allowed: {s.check.describe()}. Default: {shown}.",
        )


def cli_error(parser, error: Exception) -> int:
    """Prints ``error`` as argparse does (``<prog>: error: ...`` on stderr) and
    returns the command's exit status: 2 for a bad setting (a ConfigError,
    after the usage line, naming the flag), 1 for anything else (missing data,
    a model that cannot be loaded)."""
    if isinstance(error, ConfigError):
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error.render(flag_name)}", file=sys.stderr)
        return 2
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 1


def config_from_arguments(config_class, namespace):
    """The config of parsed flags (ConfigError naming the flag)."""
    values = {field.name: getattr(namespace, field.name) for field, _ in settings_of(config_class)}
    try:
        return config_class(**values)
    except ConfigError as e:
        raise e.named(flag_name) from None
