"""Nucleus instances: the learned instance representations (targets, and the maps decoded from a network's
logits: ``representations``), probability maps to instance labels (``postprocess``), outlines of label maps
(``outlines``), and measurements, polygons and the files they are written to (``export``). It sits just above
``metrics`` (threshold tuning scores AJI) and the top-level utilities, and imports nothing else of the package:
``data``, ``models`` and ``methods`` build on it. Only ``representations`` imports torch; this file imports
nothing, so the slide post-processing workers that use ``postprocess`` and ``export`` stay torch-free."""
