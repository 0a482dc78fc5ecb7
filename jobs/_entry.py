"""Shared launcher for jobs/*.py: puts the repo on sys.path and runs one CLI verb.

`ray job submit --working-dir . -- python jobs/<verb>.py --config <yaml>` ships the working
directory to the cluster, where the package may not be installed; `python jobs/<verb>.py`
runs the same code on an embedded local Ray.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def run_verb(verb: str) -> None:
    """Run the registered verb ``verb`` (:mod:`mess_ray.stages`; each jobs/<verb>.py passes its
    own file name) with this process's arguments."""
    from mess_ray.cli import main
    from mess_ray.stages import get_stage

    get_stage(verb)

    sys.exit(main([verb, *sys.argv[1:]]))
