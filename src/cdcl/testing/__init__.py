"""Reference implementations and stand-ins shared by the tests and the benchmarks: the naive contrastive loss
(``contrastive``), the nucleus exports as first written (``exports``), pyramidal test slides and a stand-in
predictor (``slides``). Nothing in the package uses them. Top layer, beside the commands: it may import any room,
and only tests and benchmarks import it."""
