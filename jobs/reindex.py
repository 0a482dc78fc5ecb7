"""`ray job submit --working-dir . -- python jobs/reindex.py --config <yaml>`; same as `mess-ray reindex`.

Embeds only segments added since the latest published index, drops removed ones, publishes a
new index version (nothing when nothing changed). Safe to run on a schedule and to re-run.
"""

from pathlib import Path

from _entry import run_verb

if __name__ == "__main__":
    run_verb(Path(__file__).stem)
