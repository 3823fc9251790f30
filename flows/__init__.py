"""Prefect flows: they order and fan out the stages; all the work is in `polyalign.stages`."""
