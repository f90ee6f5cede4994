"""Running a trained model: the ``Predictor`` rebuilt from a checkpoint file (``predictor``), Gaussian-blended
sliding-window prediction on arrays of any size (``window``), and evaluation of a predictor on labeled items
(``evaluation``). A pipeline room: it may import ``models``, ``instances``, ``data``, ``metrics``, ``config`` and
the top-level utilities, never ``training``, ``methods``, ``wsi`` or ``commands``."""
