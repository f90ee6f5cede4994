"""Whole-slide images: slide readers and pyramid levels (``readers``), the tile grid (``grid``), a batch of slides
(``batch``), the post-processing worker (``worker``) and its shared-memory hand-off (``handoff``), the resume
journal (``journal``), the streamed prediction pipeline (``pipeline``), tissue-tile sampling (``sampling``), a
slide's stain estimate (``stain``), and for cohorts: one slide as a job (``job``), shares for job arrays
(``shards``), Dask tasks (``cluster``) and the cohort table (``cohort``).
A pipeline room: it may import ``inference``, ``instances``, ``metrics`` and the top-level utilities, never
``training`` or ``commands``. ``readers``, ``grid``, ``worker`` and ``handoff`` import no torch, so
post-processing workers start fast; this file imports nothing for the same reason."""
