"""Experiments on the public API of :mod:`recurrent`: ``get_config()`` and ``make_train(config) -> train(key)``."""
