"""The hefeat command line: parse, call one public function, render a summary or --json.

One module per area registers its commands on the root group `main` (hefeat.cli.common).
"""

from hefeat.cli import demo_cmd, explore_cmds, finetune_cmds, learn_cmds, slides_cmds, store_cmds  # noqa: F401  (registers commands)
from hefeat.cli.common import main

__all__ = ["main"]
