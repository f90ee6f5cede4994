"""Training: the one engine for every method (``engine``: loaders, EMA teacher, AMP, DDP, validation,
checkpoints, resume). A pipeline room: it may import ``methods``, ``models``, ``data``, ``instances``,
``inference`` (validation predicts with the sliding window), ``metrics``, ``config`` and the top-level
utilities, never ``wsi`` or ``commands``."""
