"""The fence around the front-door libraries' internals: Lightning, jsonargparse, OmegaConf.

Like :mod:`lightning_paged.core.compat` for torch, transformers, PEFT and bitsandbytes: each private
attribute, private override or undocumented contract the front doors rely on is one named function
or one declared member here, in the module of its library, with the version it was read from
(``READ_FROM``) and the source file; ``tests/compat/test_compat.py`` fails loudly when one moves and
``tests/test_architecture.py`` allows ``._private`` access on foreign objects only in the fences.
It sits beside the front doors, not in one of them: ``lightning/``, ``fabric/`` and ``commands/``
all use the Lightning fence, and front doors do not import each other; ``core/`` never imports it.
"""
