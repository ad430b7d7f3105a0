"""A user's own baselines, from one file outside the package (issue #17), exactly as docs/adding_a_baseline.md
shows them: the guide's code block is written to a temporary folder, registered with `load_plugins` /
`--plugins`, and then listed, budget-solved, seeded, FLOP-counted and run through run.py on DOP_Demo.

References are independent of the registry: budgets by brute force over every token count with flops.py
(models.yaml's table for n_e where the model has one), the per-layer counts of the l2norm example written
out here, FlopCounterMode on the tiny model (eager attention: sdpa counts 0 FLOPs on CPU), and FastV's keep at
28 % on LLaVA-1.5-7B (29, README) for the same schedule shape.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_plugin_e2e import N_DEMO, _outputs, built  # noqa: F401  (the run.py fixture)
from vlmeval_dop import methods, plugins
from vlmeval_dop.cli import main as cli_main
from vlmeval_dop.flops import full_flops, policy_tflops, schedule_flops
from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.registry import EntryError, entry_tflops, get_entry, runnable_entry

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "adding_a_baseline.md"
MODULE = "my_baselines"


def guide_module_source() -> str:
    """The guide's one-file example (the python block after its `my_baselines.py` marker)."""
    text = GUIDE.read_text(encoding="utf-8")
    marker = text.index("<!-- my_baselines.py")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def _git_status() -> str | None:
    try:
        return subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=REPO, capture_output=True,
                              text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The guide's file written outside the repository and importable by name; the method registry, module
    table and sys.path are restored afterwards (other test modules see the built-ins only)."""
    folder = tmp_path_factory.mktemp("user_code")
    path = folder / f"{MODULE}.py"
    path.write_text(guide_module_source(), encoding="utf-8")
    registry_before = dict(methods._REGISTRY)
    status_before = _git_status()
    sys.path.insert(0, str(folder))
    yield path
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)
    for key in [k for k, v in plugins._LOADED.items() if v == MODULE]:
        del plugins._LOADED[key]
    methods._REGISTRY.clear()
    methods._REGISTRY.update(registry_before)
    assert _git_status() == status_before, "the user's methods must not need any change to the repository"


@pytest.fixture()
def loaded(user_module):
    assert plugins.load_plugins([MODULE]) == [MODULE]
    return sys.modules[MODULE]


def _tiny_shape():
    """(ArchSpec, text tokens) of tiny_llava15 read independently: its config and entries.yaml."""
    from transformers import AutoConfig

    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.tiny import tiny_path

    spec = ArchSpec.from_config(AutoConfig.from_pretrained(tiny_path("llava15"), local_files_only=True), visual_tokens=64)
    text = yaml.safe_load((REPO / "eval_configs" / "entries.yaml").read_text())["models"]["tiny_llava15"]["text_tokens"]
    return spec, text


def _l2norm_counts(L, n_vis, text, k, keep):
    return [(text + (n_vis if i < k else min(keep, n_vis)),) * 2 for i in range(L)]


def test_registration_and_idempotent_loading(loaded, user_module):
    from vlmeval_dop.baselines import BASELINES, DECODER_PRUNERS
    from vlmeval_dop.reducers import REDUCERS

    rand, l2 = methods.method_info("rand"), methods.method_info("l2norm")
    assert (rand.kind, rand.takes_seed, rand.cls) == ("vision", True, loaded.RandomReducer)
    assert (l2.kind, l2.budget_knob, l2.knob_range, dict(l2.args), l2.takes_seed) == ("decoder", "keep", (0, "n_visual"),
                                                                                       {"k": 2}, False)
    assert rand.source == f"plugin {MODULE}" and methods.method_info("fastv").source == "builtin"
    assert REDUCERS["rand"] is loaded.RandomReducer and DECODER_PRUNERS["l2norm"] is loaded.L2NormPruner
    assert "l2norm" in BASELINES and methods.seeded_methods() == ["rand"]
    # idempotent: by name, by path (the same file), and via `--plugins a,b` strings
    module = sys.modules[MODULE]
    assert plugins.load_plugins(f"{MODULE},{user_module}") == [MODULE, MODULE] and sys.modules[MODULE] is module


def test_plugin_errors_name_the_module(tmp_path):
    with pytest.raises(plugins.PluginError, match="plugin module 'no_such_user_module' not found"):
        plugins.load_plugins(["no_such_user_module"])
    bad = tmp_path / "broken_user_methods.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(plugins.PluginError, match=r"broken_user_methods.py' failed to import: RuntimeError: boom"):
        plugins.load_plugins([str(bad)])
    assert "broken_user_methods" not in sys.modules


def test_registration_is_checked_loudly():
    class NoCost:  # decoder side without a layer_tokens cost model
        name, layers = "nocost", (1,)

        def __init__(self, keep: int = 1):
            self.keep = keep

        def select(self, ctx):
            return None

    before = dict(methods._REGISTRY)
    try:
        with pytest.raises(methods.RegistrationError, match="needs a cost model to solve it against"):
            methods.register_method("nocost", kind="decoder", budget_knob="keep")(NoCost)
        with pytest.raises(methods.RegistrationError, match="starting and ending with a letter"):
            methods.register_method("norm2", kind="vision")(NoCost)
        with pytest.raises(methods.RegistrationError, match="reserved"):
            methods.register_method("dopx", kind="vision")(NoCost)
        with pytest.raises(methods.RegistrationError, match="is taken by vlmeval_dop.baselines.fastv.FastV"):
            methods.register_method("fastv", kind="decoder")(NoCost)
        with pytest.raises(methods.RegistrationError, match="entry argument 'seed' is not an argument"):
            methods.register_method("nocost", kind="decoder", entry_args={"seed": int})(NoCost)
        methods.register_method("nocost", kind="decoder")(NoCost)  # allowed, but flagged: no budget solver
        assert "no budget solver" in methods.method_info("nocost").budget_problem()
        with pytest.raises(EntryError, match="no budget solver: .*explicit arguments"):
            get_entry("tiny_llava15_nocost90")
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(before)


def test_entries_and_solved_budgets(loaded):
    """Tiny model: n_e solved (no budget table); LLaVA-1.5-7B: n_e from models.yaml. Decoder side: the largest
    keep within n_e tokens everywhere, by brute force. Every TFLOPs ratio <= its label."""
    from vlmeval_dop.models_config import load_models

    spec, text = _tiny_shape()
    L, N = spec.num_layers, spec.visual_tokens
    n_e = max(n for n in range(N + 1) if policy_tflops(spec, DOPPolicy(L, L, n), text)["ratio"] <= 0.9)
    rand = get_entry("tiny_llava15_rand90")
    assert (rand.policy, rand.reducer, rand.method, rand.budget, rand.seed) == (DOPPolicy(L, L, n_e), "rand", "rand", 0.9, None)
    target = schedule_flops(spec, [(text + n_e,) * 2] * L)
    keep = max(k for k in range(N + 1) if schedule_flops(spec, _l2norm_counts(L, N, text, 2, k)) <= target)
    l2 = get_entry("tiny_llava15_l2norm90")
    assert (l2.baseline, l2.baseline_args, l2.runnable) == ("l2norm", {"k": 2, "keep": keep}, True)
    ratio = schedule_flops(spec, _l2norm_counts(L, N, text, 2, keep)) / full_flops(spec, text)
    assert entry_tflops(l2)["ratio"] == pytest.approx(ratio) and ratio <= 0.9
    assert entry_tflops(rand)["ratio"] <= 0.9

    pm = load_models()["llava15_7b"]
    assert get_entry("llava15_7b_rand28").policy == DOPPolicy(32, 32, pm.budgets[0.28])
    e = get_entry("llava15_7b_l2norm28")
    assert e.baseline_args == {"k": 2, "keep": 29} == get_entry("llava15_7b_fastv28").baseline_args  # same schedule shape
    assert entry_tflops(e)["ratio"] <= 0.28


def test_infeasible_budgets_are_refused_with_numbers(loaded):
    with pytest.raises(EntryError, match=r"below tiny_llava15's floor: without any visual token it runs 51\.0 %"):
        get_entry("tiny_llava15_rand50")
    with pytest.raises(EntryError, match=r"l2norm\{'k': 2\} cannot meet .* \(at keep=0: 23\.6 % .* allows 23\.0 %"):
        get_entry("llava15_7b_l2norm23")
    with pytest.raises(EntryError, match="needs a TFLOPs budget label"):
        get_entry("tiny_llava15_l2norm")


def test_seeds(loaded):
    """`.sN` sets the reducer's seed (Entry.seed, constructor argument); the kept set is a deterministic
    function of the seed; methods without a seed argument refuse `.sN` and name those that have one."""
    from vlmeval_dop.reducers import ImageSpan, ReductionContext, check_selection, get_reducer

    e = get_entry("tiny_llava15_rand90.s3")
    assert (e.seed, e.reducer_args, e.policy) == (3, {"seed": 3}, get_entry("tiny_llava15_rand90").policy)
    spans = [ImageSpan(0, 0, torch.arange(64)), ImageSpan(1, 0, torch.arange(64))]
    ctx = ReductionContext("llava", None, torch.zeros(2, 1), torch.zeros(2, 64, 1), None, spans)

    def kept(seed):
        reducer = get_reducer("rand", seed=seed)
        out = reducer.select(ctx, 16)
        check_selection(reducer, ctx, 16, out)
        return [k.tolist() for k in out]

    assert kept(3) == kept(3) and kept(3) != kept(4)
    g = torch.Generator().manual_seed(3)  # by hand: the first 16 of a seeded permutation, sorted
    assert kept(3)[0] == sorted(torch.randperm(64, generator=g)[:16].tolist())
    for name in ("tiny_llava15_l2norm90.s3", "llava15_7b_fastv28.s3", "tiny_llava15_dop.s3"):
        with pytest.raises(EntryError, match="takes no seed; methods with a `seed` entry argument: rand"):
            get_entry(name)


def test_list_all_gives_each_missing_cell_its_reason(loaded, capsys, monkeypatch):
    assert cli_main(["list", "--all", "--model", "tiny_llava15", "--budget", "0.9", "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("tiny_llava15_")}
    assert "runnable (on demand)" in rows["tiny_llava15_rand90"] and "(4,4," in rows["tiny_llava15_rand90"]
    assert "l2norm(k=2,keep=" in rows["tiny_llava15_l2norm90"]
    assert re.search(r"tiny_llava15_rand50: .*below tiny_llava15's floor.*51\.0 %", out)
    assert re.search(r"tiny_llava15_l2norm50: .*below tiny_llava15's floor", out)

    monkeypatch.delitem(methods._REGISTRY, "trim")  # an unregistered component
    assert cli_main(["list", "--all", "--model", "llava15_7b", "--json"]) == 0
    missing = {r["entry"]: r["unavailable_reason"] for r in json.loads(capsys.readouterr().out) if not r["runnable"]}
    assert re.search(r"cannot meet .* 23\.6 % .* 23\.0 %", missing["llava15_7b_l2norm23"])
    assert "fastv" in missing["llava15_7b_fastv23"] and "23.6 %" in missing["llava15_7b_fastv23"]
    assert "reducer 'trim' is not registered" in missing["llava15_7b_trim28"]
    if not Path(get_entry("llava15_7b_fitprune28").required_file).exists():
        assert "vlmeval-dop fitprune --model llava15_7b" in missing["llava15_7b_fitprune28"]
    assert "llava15_7b_rand28" not in missing and "llava15_7b_l2norm28" not in missing


def test_paper_entries_unchanged_with_user_methods(loaded):
    """The paper's exact entry set (test_plugin_registry) holds with user methods registered."""
    from test_plugin_registry import test_entry_set_is_exactly_generated_plus_explicit, test_every_paper_baseline_is_within_its_budget

    test_entry_set_is_exactly_generated_plus_explicit()
    test_every_paper_baseline_is_within_its_budget()


def test_l2norm_flops_match_flop_counter(loaded):
    """The example's `layer_tokens` is what the model computes: FlopCounterMode over the decoder layers, with
    eager attention (FlopCounterMode counts sdpa attention as 0 FLOPs on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.baselines import get_decoder_pruner
    from vlmeval_dop.executor import apply_dop
    from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

    model, processor = load_tiny("llava15", attn_implementation="eager")
    inputs = tiny_inputs("llava15", processor, ["What is shown in the picture?"], [tiny_image(0)])
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n = inputs["input_ids"].shape[1]
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    counter = FlopCounterMode(display=False)
    pruner = get_decoder_pruner("l2norm", k=2, keep=10)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=pruner) as handle, torch.no_grad(), counter:
        model(**inputs, use_cache=False)
    measured = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if name.split(".")[-2:-1] == ["layers"] and "language_model" in name)
    assert handle.last_layer_tokens == _l2norm_counts(L, n_vis, n - n_vis, 2, 10)
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    analytic = schedule_flops(spec, loaded.L2NormPruner.layer_tokens(L, n_vis, n - n_vis, k=2, keep=10))
    assert abs(measured - analytic) <= 0.01 * analytic


def test_run_py_with_plugins_end_to_end(user_module, built, tmp_path, capsys):
    """`python run.py --plugins <file> --model tiny_llava15_rand90.s3 tiny_llava15_l2norm90 --data DOP_Demo`."""
    rand, l2 = "tiny_llava15_rand90.s3", "tiny_llava15_l2norm90"
    models = built("--plugins", str(user_module), "--model", rand, l2, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    text = get_entry("tiny_llava15").model.text_tokens
    n_e = runnable_entry(rand).policy.n_v
    keep = runnable_entry(l2).baseline_args["keep"]
    for entry in (rand, l2):
        pred, acc = _outputs(tmp_path, entry)
        assert pred.exists() and acc.exists()
        (m,) = models[entry]
        assert m.samples == N_DEMO == m.pruned_samples and m.last_visual_tokens == 64
    m = models[rand][0]
    assert m.reducer_args == {"seed": 3} and m.pruning_description() == f"DOP {DOPPolicy(4, 4, n_e)} with rand seed=3"
    with m._pruning() as handle:  # the wrapper builds the reducer with the entry's seed
        assert handle.reducer.seed == 3
    a0 = m.last_layer_tokens[0][0]
    assert m.last_layer_tokens == [(a0, a0)] * 4 and a0 - n_e == models[l2][0].last_layer_tokens[2][0] - keep
    m = models[l2][0]
    assert m.pruning_description() == f"l2norm k=2 keep={keep} (decoder-side)"
    t = m.last_layer_tokens[2][0] - keep  # the prompt's text tokens (the demo's prompts differ in length)
    assert m.last_layer_tokens == [(t + 64, t + 64)] * 2 + [(t + keep, t + keep)] * 2 and t <= text + 5

    # what made the results is recorded next to them (vlmeval_dop/entry_record.py): the plugin file's digest too
    record = json.loads((tmp_path / rand / "dop_entry.json").read_text())
    assert record["reducer_args"] == {"seed": 3} and record["policy"][:3] == [4, 4, n_e]
    assert record["method_sources"]["reducer"]["sha256"] == hashlib.sha256(user_module.read_bytes()).hexdigest()
    # the user edits the method: its old results are neither resumed nor reported under the same name
    source = user_module.read_text(encoding="utf-8")
    try:
        user_module.write_text(source + "\n# edited\n", encoding="utf-8")
        with pytest.raises(SystemExit) as exc:
            built("--plugins", str(user_module), "--model", rand, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"the results in {tmp_path / rand} were made by {rand!r} with other settings" in err
        assert "method_sources.reducer.sha256" in err
        from reproduce import run as rrun

        cell = rrun._cell("row", rand, "DOP_Demo", "DOP_Demo", "", tmp_path)
        assert cell.status == "blocked" and "other settings" in cell.reason
        # the digest is of the whole file: l2norm, defined there too, is stale as well (conservative)
        assert rrun._cell("row", l2, "DOP_Demo", "DOP_Demo", "", tmp_path).status == "blocked"
    finally:
        user_module.write_text(source, encoding="utf-8")
    assert rrun._cell("row", l2, "DOP_Demo", "DOP_Demo", "", tmp_path).status == "done"  # the same file again


def test_run_py_refuses_a_broken_plugin(run_py, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_py.main(["--plugins", "no_such_user_module", "--model", "tiny_llava15", "--data", "DOP_Demo",
                     "--work-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "plugin module 'no_such_user_module' not found" in capsys.readouterr().err


def test_entry_point_group(tmp_path, monkeypatch):
    """Installed packages register through the `vlmeval_dop.methods` entry-point group."""
    from importlib import metadata

    (tmp_path / "ep_user_methods.py").write_text(
        "from vlmeval_dop.methods import register_method\n"
        "from vlmeval_dop.reducers.uniform import UniformReducer\n"
        "@register_method('epuniform', kind='vision')\n"
        "class EPUniform(UniformReducer):\n    name = 'epuniform'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint(name="mine", value="ep_user_methods", group=methods.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == methods.ENTRY_POINT_GROUP else [])
    before = dict(methods._REGISTRY)
    try:
        assert plugins.load_entry_points() == ["ep_user_methods"]
        assert methods.method_info("epuniform").source == "entry point mine = ep_user_methods"
        assert get_entry("tiny_llava15_epuniform90").reducer == "epuniform"
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(before)
        sys.modules.pop("ep_user_methods", None)
        plugins._LOADED.pop("entry point mine = ep_user_methods", None)
