"""`ray job submit --working-dir . -- python jobs/render.py --config <yaml>`; same as `mess-ray render`."""

from _entry import run_verb

if __name__ == "__main__":
    run_verb("render")
