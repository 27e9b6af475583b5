"""Job-queue integration: job scripts, submission, job states, clusters."""
