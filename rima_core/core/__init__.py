"""The method and its data, with no tracking and no I/O beyond the data files: the optimal
transport (``ot``), the networks (``models``), metrics, augmentation, and the data layer
(source formats, the Arrow store, masks, the synthetic phantom and its Bayes oracle).

Layers, lowest first: ``config``/``atomic``/``progress``/``redact`` (shared utilities) <
``core`` < ``tracking`` < ``runs`` < ``ops`` < ``pipeline``; a module imports only from its own
layer or lower ones (tests/contracts/test_layers.py).
"""
