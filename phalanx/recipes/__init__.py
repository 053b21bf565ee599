"""Hydra config tree (YAML only); this file makes it a package Hydra can find."""
