"""``cdcl train``: train (or resume) one run from a config file and ``--set`` overrides; prints its summary."""

from __future__ import annotations

import argparse
import json
import os

from cdcl.config import load_config
from cdcl.training.engine import train


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    summary = train(config, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
