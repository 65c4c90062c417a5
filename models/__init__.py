"""Reference models for graphopt: small, trained, exported ONNX graphs with held-back test data.

Each model has a build script (``python -m models.<name>``), and ``python -m models.build all``
rebuilds every one; ``python -m models.build verify`` re-measures the committed files.
See ``models/README.md``.
"""
