"""What a lesson's grading edition of the package puts where a reference answer was.

While a lesson is graded, its kernel sees a copy of ``nfcourse`` without the reference
implementations of that lesson's exercises (see ``nfcourse/grade/edition.py``, which is not
part of the edition). Reaching one of them raises :class:`ExerciseRemoved`, an
``ImportError``, so that ``from nfcourse.flows import AffineCoupling`` fails with a message
naming the exercise instead of Python's generic one. On a student's own machine the full
package is installed and nothing here is ever raised.

Example:
    >>> err = ExerciseRemoved("nfcourse.flows.AffineCoupling", "03_coupling_layers", "coupling")
    >>> "Write your own" in str(err) and isinstance(err, ImportError)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ExerciseRemoved", "Absent", "Placeholder", "module_getattr", "removed",
           "removed_member"]


class ExerciseRemoved(ImportError):
    """A reference answer that is not in the package while this lesson is graded."""

    def __init__(self, what: str, lesson: str, exercise: str):
        self.what, self.lesson, self.exercise = what, lesson, exercise
        number = lesson.split("_", 1)[0]
        super().__init__(
            f"{what} is not available while lesson {number} is graded: it is the answer to "
            f"the exercise '{exercise}'. Write your own.",
            name=what.rsplit(".", 1)[0],
        )

    def __reduce__(self):  # ImportError's own pickling would lose the three fields
        return (type(self), (self.what, self.lesson, self.exercise))


class Absent:
    """Stands for a removed class in ``isinstance``/``issubclass`` tests of package code
    that the edition keeps: nothing is an instance of it, so those tests read False (the
    code then falls back on what it does for a student's own layer)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        raise TypeError("Absent stands for a removed reference and cannot be subclassed")


class Placeholder:
    """Stands for a removed name in a table built when a module is imported (a dict of
    layer kinds, say): calling it, reading an attribute of it or subclassing it raises
    :class:`ExerciseRemoved`."""

    def __init__(self, what: str, lesson: str, exercise: str):
        object.__setattr__(self, "_nfc_args", (what, lesson, exercise))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ExerciseRemoved(*object.__getattribute__(self, "_nfc_args"))

    def __getattr__(self, name: str) -> Any:
        raise ExerciseRemoved(*object.__getattribute__(self, "_nfc_args"))

    def __mro_entries__(self, bases: tuple) -> tuple:
        raise ExerciseRemoved(*object.__getattribute__(self, "_nfc_args"))

    def __repr__(self) -> str:
        return f"<removed {object.__getattribute__(self, '_nfc_args')[0]}>"


def removed(what: str, lesson: str, exercise: str) -> Any:
    """Raise :class:`ExerciseRemoved`; the edition puts a call of this where package code
    used a removed name, so the code fails only when it is run, naming the exercise."""
    raise ExerciseRemoved(what, lesson, exercise)


class removed_member:  # noqa: N801 (a descriptor, used like a method definition)
    """A class attribute that raises :class:`ExerciseRemoved` when read, from the class or
    from an instance (a removed method such as ``FlowModel.bits_per_dim``)."""

    def __init__(self, what: str, lesson: str, exercise: str):
        self.args = (what, lesson, exercise)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        raise ExerciseRemoved(*self.args)


def module_getattr(module: str, names: dict[str, tuple[str, str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562): a removed name raises :class:`ExerciseRemoved`,
    any other missing one Python's usual ``AttributeError``.

    ``names`` maps a name to ``(what, lesson, exercise)``.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            raise ExerciseRemoved(*names[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
