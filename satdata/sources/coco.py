"""Placeholder until this source lands."""
