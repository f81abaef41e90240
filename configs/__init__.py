"""Typed config schema (configs.schema) and YAML presets (configs/presets/*.yaml)."""
