"""What the user runs: cohort generation, the study launcher, tracking and reports."""
