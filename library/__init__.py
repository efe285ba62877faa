"""Shared LECO trainer library used by ``train_leco.py`` and ``sdxl_train_leco.py``."""
