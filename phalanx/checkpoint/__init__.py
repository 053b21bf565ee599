"""Snapshots, on-disk format, atomic commit, resharding load, CheckFree (the checkpoint issue)."""
