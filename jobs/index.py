"""`ray job submit --working-dir . -- python jobs/index.py --config <yaml>`; same as `mess-ray index`."""

from _entry import run_verb

if __name__ == "__main__":
    run_verb("index")
