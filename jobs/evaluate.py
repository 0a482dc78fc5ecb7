"""`ray job submit --working-dir . -- python jobs/evaluate.py --config <yaml>`; same as `mess-ray evaluate`."""

from _entry import run_verb

if __name__ == "__main__":
    run_verb("evaluate")
