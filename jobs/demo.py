"""`ray job submit --working-dir . -- python jobs/demo.py --config <yaml>`; same as `mess-ray demo`."""

from _entry import run_verb

if __name__ == "__main__":
    run_verb("demo")
