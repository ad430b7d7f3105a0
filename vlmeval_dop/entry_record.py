"""What made an entry's results: a record next to them, so results made with other settings are never reused.

VLMEvalKit keys predictions by the model name only (`<work_dir>/<model>/...`, reused by `--reuse`). For the
paper's entries the name fixes the settings (the repository's eval_configs/), but a user's method (`--plugins`)
or an edited config can change what a name runs while the old predictions stay on disk, and a resumed run or
`reproduce/aggregate.py` would then mix or report results of the old settings under the new name.

run.py writes `<work_dir>/<entry>/dop_entry.json` before it runs an entry: the entry's resolved settings (model
checkpoint and wrapper arguments, policy, reducer and baseline with their arguments, operation mask) and, for every
method that does not ship with vlmeval-dop, a digest of the source file that defines it. A record that differs
stops run.py with the differences and the fix; reproduce/run.py plans such cells as blocked with the same reason,
and `reproduce/aggregate.py --compare` does not report them. Results made before records existed are adopted (the
record is written) rather than refused.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, file_sha256, read_json

RECORD_FILE = "dop_entry.json"


def _plain(value: Any) -> Any:
    """JSON-stable form of config values (tuples/sets -> sorted or ordered lists, objects -> str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _method_source(name: str | None) -> dict[str, str] | None:
    """{module, sha256 of its file} of a method registered outside vlmeval-dop (None for built-in methods)."""
    if name is None:
        return None
    from .methods import registered

    info = registered().get(name)
    if info is None or info.source == "builtin":
        return None
    try:
        path = inspect.getsourcefile(info.cls)
    except TypeError:
        path = None
    digest = file_sha256(path) if path and Path(path).is_file() else "unknown"
    return {"module": info.cls.__module__, "class": info.cls.__qualname__, "sha256": digest}


def entry_settings(name: str) -> dict[str, Any]:
    """Everything of entry `name` that decides its predictions (see the module docstring)."""
    from .registry import runnable_entry

    entry = runnable_entry(name)
    policy = entry.policy
    mask = entry.op_mask
    settings = {
        "entry": entry.name,
        "model": {"key": entry.model.name, "wrapper": entry.model.wrapper, "hf_id": entry.model.hf_id,
                  "tiny": entry.model.tiny, "args": _plain(entry.model.args)},
        "args": _plain(entry.args),
        "policy": None if policy is None else [policy.d_A, policy.d_P, policy.n_v, policy.d_A_sys, policy.d_P_sys],
        "reducer": entry.reducer,
        "reducer_args": _plain(entry.reducer_args),
        "baseline": entry.baseline,
        "baseline_args": _plain(entry.baseline_args),
        "op_mask": None if mask is None else {"attn": sorted(mask.attn), "mlp": sorted(mask.mlp)},
    }
    sources = {k: s for k, s in (("reducer", _method_source(entry.reducer)),
                                 ("baseline", _method_source(entry.baseline))) if s}
    if sources:
        settings["method_sources"] = sources
    return settings


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def record_mismatch(work_dir: str | Path, name: str) -> str | None:
    """Why `<work_dir>/<name>`'s results were made with other settings than entry `name` has now, else None."""
    path = Path(work_dir) / name / RECORD_FILE
    if not path.exists():
        return None
    old = read_json(path, f"delete it only together with the results in {path.parent}")
    diff = _differences(old if isinstance(old, dict) else {}, entry_settings(name))
    if not diff:
        return None
    return (f"the results in {path.parent} were made by {name!r} with other settings ({'; '.join(diff)}); "
            f"give another --work-dir, or remove {path.parent} to redo them")


def write_record(work_dir: str | Path, name: str) -> Path:
    """Write (atomically) the record of entry `name` under `<work_dir>/<name>/`."""
    path = Path(work_dir) / name / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(entry_settings(name), indent=1, sort_keys=True) + "\n")
