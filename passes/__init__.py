"""graphopt's passes, one module per family; importing this package registers them all.

Each module registers its passes with ``@register`` and may define ``PRESETS`` (named pipelines);
they are imported here in name order, so a new family needs no edit of this file.
"""

from __future__ import annotations

import importlib
import pkgutil

PRESETS: dict[str, str] = {}
"""Named pipelines (``cleanup``, ...), expanded where their name appears in pipeline text."""

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        PRESETS.update(getattr(_module, "PRESETS", {}))

DEFAULT_PIPELINE = "cleanup" if "cleanup" in PRESETS else "lift-constants,dce"
"""What ``graphopt optimize`` runs when no ``-p`` is given."""
