"""The commands behind ``cdcl`` (``cdcl.cli`` parses, these run): one module per subcommand, each a thin ``run``
(or, in ``data``, one function per action) that reads its ``argparse.Namespace``, calls the stages below and
reports. The top layer: a command may import any other room (``wsi``, ``training``, ``inference``,
``instances``, ``data``, ``models``, ``methods``) and the top-level utilities; nothing imports a command but
the CLI (by name, when the subcommand runs)."""
