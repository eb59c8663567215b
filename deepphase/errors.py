"""Errors raised for bad input.

Every user-facing mistake raises a subclass of :class:`DeepPhaseError` whose message names the
argument, what was found and what was expected. The CLI prints that one line and exits with 2.
"""


class DeepPhaseError(Exception):
    """Base class for every error caused by the user's input."""


class InputFileError(DeepPhaseError):
    """A file is missing, unreadable, or not in a format we read."""


class ShapeError(DeepPhaseError):
    """An array has the wrong shape, dtype or number of elements."""


class ValueRangeError(DeepPhaseError):
    """An array holds NaN, Inf, negative or otherwise impossible values."""


class PatternValueError(ValueRangeError):
    """A diffraction pattern holds NaN, Inf or negative values (a frame named)."""


class ModelMismatchError(DeepPhaseError):
    """A model was made for another grid, probe sampling or geometry than the data."""


class OutputExistsError(DeepPhaseError):
    """An output would overwrite something the user wrote; refused unless asked."""


class DeepPhaseNote(UserWarning):
    """Something in the data or the options the user should check; the result was made (a rotation the data
    contradict, a probe that differs from the model's, counts given as amplitudes)."""
