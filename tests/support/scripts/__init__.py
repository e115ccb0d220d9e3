"""Entry points that tests launch (``python`` or ``torchrun``); each puts ``tests/`` on ``sys.path`` for ``support``."""
