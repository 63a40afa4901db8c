"""The one fence around the framework-free libraries' internals: torch, transformers, PEFT, bitsandbytes.

Each private attribute, private function or undocumented contract of one of these libraries that the
project relies on is reached through one named function here, in the module of its library, with the
version it was read from; ``tests/core/test_compat.py`` fails loudly when one of them moves. Nowhere
else in the package touches another library's ``_private`` names (``tests/test_architecture.py``).
The front-door libraries (Lightning, jsonargparse, OmegaConf) have theirs in
:mod:`lightning_paged.compat`.
"""
