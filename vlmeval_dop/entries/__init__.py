"""Evaluation entries, in parts; `vlmeval_dop.registry` is the public facade over them.

- names.py:    the naming rule `{model}_{method}{budget}[.s{seed}]` (one place; reproduce/tables.py uses it)
- entry.py:    the Entry and ModelSpec records and what makes an entry runnable
- config.py:   reading and validating eval_configs/ (entries.yaml, baselines.yaml, searched/*.yaml)
- budgets.py:  budget solving (n_e for a TFLOPs label, a decoder-side method's free knob) and an entry's
               analytic per-layer tokens / TFLOPs
- generate.py: making entries: the paper's, the explicit ones, installed searches, and any registered
               method at any model and budget (on demand), with the reason when one cannot exist
"""
