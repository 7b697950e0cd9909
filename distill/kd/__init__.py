"""Distillation methods, one file each; selected by name in the config (`kd.method`)."""
