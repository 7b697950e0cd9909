"""Distillation methods, one file each, selected by name in the config (`kd.method`); `registry.py` finds them, types
their `kd.<name>:` settings and builds them (see its docstring for adding one)."""
