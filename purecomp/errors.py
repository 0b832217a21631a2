"""Exception types. Each names what was wrong and what was expected."""

from __future__ import annotations


class PurecompError(Exception):
    """Base class of every error purecomp raises on purpose."""


class ConfigError(PurecompError, ValueError):
    """A configuration value is wrong; ``path`` is its JSON path (e.g. ``compression[0].bits``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class NoEffectWarning(UserWarning):
    """A config key NNCF accepts that purecomp reads but cannot honour: it has no effect."""


def warn_no_effect(path: str, why: str) -> None:
    """Warn (``NoEffectWarning``) that the config key at JSON ``path`` has no effect, and why."""
    import warnings

    warnings.warn(f"{path}: accepted for NNCF compatibility but has no effect in purecomp: {why}",
                  NoEffectWarning, stacklevel=3)


class NothingToCompressWarning(UserWarning):
    """The config's methods found nothing to compress in the model (every state is empty): the
    compressed model computes what the model computes."""


class ScopeError(ConfigError):
    """An ``ignored_scopes`` / ``target_scopes`` entry matches no site of the model."""


class InputInfoError(ConfigError):
    """``input_info`` does not describe inputs the model accepts."""


class QuantizerRangeError(PurecompError, ValueError):
    """A quantizer cannot be built with the requested bits, range or axis."""


class UnknownOpError(PurecompError, KeyError):
    """An op or site name that the model graph does not contain."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StateError(PurecompError, ValueError):
    """A compression state does not fit the method, model or graph it is used with."""


class CalibrationError(PurecompError, ValueError):
    """Calibration data is missing, empty, or not in a form the model accepts."""


class NumericalError(PurecompError, FloatingPointError):
    """Training turned a compression parameter (a quantizer range, RB logits) or a weight into NaN
    or inf; the message names the tensor and the step."""


class OpsBuildError(PurecompError, RuntimeError):
    """The C++ ops could not be built while ``PURECOMP_OPS=cpp`` requires them."""


class SearchError(PurecompError, RuntimeError):
    """A step of a search failed (an AutoQ episode's evaluation). ``episode`` (-1: the INT8
    baseline) and ``policy`` name the failing step; ``report`` holds everything found before it."""

    def __init__(self, message: str, *, episode: int, policy: dict[str, int], report: object = None) -> None:
        self.episode = episode
        self.policy = policy
        self.report = report
        super().__init__(message)
