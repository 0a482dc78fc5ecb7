"""`ray job submit --working-dir . -- python jobs/quickstart.py --config <yaml>`; same as `mess-ray quickstart`."""

from pathlib import Path

from _entry import run_verb

if __name__ == "__main__":
    run_verb(Path(__file__).stem)
