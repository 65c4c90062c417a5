"""graphopt's passes, one module per family; importing this package registers them all."""

from graphopt.passes.cleanup import Dce, LiftConstants

PRESETS: dict[str, str] = {}
"""Named pipelines (``cleanup``, ...), expanded where their name appears in pipeline text."""

DEFAULT_PIPELINE = "lift-constants,dce"
"""What ``graphopt optimize`` runs when no ``-p`` is given."""

__all__ = ["PRESETS", "Dce", "LiftConstants"]
