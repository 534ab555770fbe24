"""The house rules (docs/ARCHITECTURE.md), checked on the import graph read from the source with `ast`
(imports inside functions count), on dvc.yaml, and with a real `dvc status` in a throw-away repository.

Layers point one way: contract <- common <- families <- pipeline (data, evaluation) <- runtime <- stages
<- cli. Families never import one another; stages never import one another; nothing imports upward.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from import_graph import closure, cycles, imports, module_files
from lightning_modules.registry import FAMILIES, family_class

REPO = Path(__file__).resolve().parents[1]
GRAPH = imports(REPO)
FILES = module_files(REPO)
FAMILY_PACKAGES = {f"lightning_modules.{f}" for f in FAMILIES}
DVC = Path(sys.executable).with_name("dvc")


def family_of(module: str):
    return next((p for p in FAMILY_PACKAGES if module == p or module.startswith(p + ".")), None)


def edges(source_prefix: str):
    for m, deps in GRAPH.items():
        if m == source_prefix or m.startswith(source_prefix + "."):
            for d in deps:
                yield m, d


def test_graph_sees_the_packages():
    assert {"lightning_modules.contract", "pipeline.cli", "pipeline.stages.train"} <= set(GRAPH)
    assert "lightning_modules.contract" in GRAPH["pipeline.stages.train"] | closure(GRAPH, "pipeline.stages.train")


def test_every_family_is_a_package_and_every_module_belongs_somewhere():
    for f in FAMILIES:
        assert (REPO / "lightning_modules" / f / "__init__.py").is_file(), f
    allowed = FAMILY_PACKAGES | {"lightning_modules", "lightning_modules.contract", "lightning_modules.registry",
                                 "lightning_modules.common"}
    stray = [m for m in GRAPH if m.startswith("lightning_modules")
             and not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not stray, f"lightning_modules holds only families and code shared by families: {stray}"


def test_lightning_modules_never_imports_pipeline():
    bad = [(m, d) for m, d in edges("lightning_modules") if d.startswith("pipeline")]
    assert not bad, bad


def test_families_do_not_import_one_another_and_shared_code_imports_no_family():
    bad = [(m, d) for m, d in edges("lightning_modules") if family_of(d) and family_of(d) != family_of(m)]
    assert not bad, bad
    assert not [d for _, d in edges("lightning_modules.contract")], "the contract imports nothing of the project"


def test_data_and_evaluation_know_families_only_through_the_contract():
    for layer in ("pipeline.data", "pipeline.evaluation"):
        bad = [(m, d) for m, d in edges(layer) if d.startswith("lightning_modules") and d != "lightning_modules.contract"]
        assert not bad, bad
        upward = [(m, d) for m, d in edges(layer)
                  if d.startswith(("pipeline.stages", "pipeline.cli", "pipeline.runtime", "pipeline.callbacks"))]
        assert not upward, upward
    assert not [(m, d) for m, d in edges("pipeline.data") if d.startswith(("pipeline.evaluation", "pipeline.config"))]


def test_stages_stand_side_by_side_and_only_the_cli_calls_them():
    stages = {m for m in GRAPH if m.startswith("pipeline.stages.")}
    assert {"pipeline.stages.fetch", "pipeline.stages.train", "pipeline.stages.report"} <= stages
    for m, deps in GRAPH.items():
        into = {d for d in deps if d in stages}
        if m != "pipeline.cli":
            assert not into, f"{m} imports the stage(s) {sorted(into)}"


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_family_name_in_pipeline_code():
    """The pipeline never branches on a family: no family name as a string constant (docstrings aside)."""
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
                words = {w.strip("()[]{}`'\":;!?.") for w in n.value.replace(",", " ").split()}
                assert not words & set(FAMILIES), f"{path.relative_to(REPO)}:{n.lineno}: {n.value!r}"


def test_pipeline_asks_families_nothing_undeclared():
    """No `getattr`/`hasattr` probes of a model or its class in pipeline code: every hook is on the contract."""
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr"):
                target = ast.unparse(n.args[0])
                assert target not in ("cls", "model", "pl_module", "self.model"), f"{path.name}:{n.lineno}: {ast.unparse(n)}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_builds_from_only_the_keys_you_change(family):
    info = {"shape": [1, 8, 8], "kind": "image", "levels": 17, "num_classes": 10}
    model = family_class(family)({"seed": 1}, info)
    assert model.config.seed == 1 and model.config == family_class(family).Config(seed=1)


# --- dvc.yaml: exact code dependencies -------------------------------------------------------------
def stage_code(stage_module: str, family: str | None = None) -> set:
    """Files a stage runs: its module's import closure, the config loader's (every command loads the
    config first), and the family package's. Import-free package markers run nothing and are left out."""
    mods = closure(GRAPH, stage_module) | closure(GRAPH, "pipeline.config")
    if family:
        mods |= closure(GRAPH, f"lightning_modules.{family}")
    files = {FILES[m].relative_to(REPO).as_posix() for m in mods}
    return {f for f in files if not (f.endswith("__init__.py") and not GRAPH[_module(f)])}


def _module(file: str) -> str:
    return ".".join(Path(file).with_suffix("").parts).removesuffix(".__init__")


def declared_code(deps: list) -> tuple:
    """(files, folders) among a stage's deps that are project code."""
    code = [d for d in deps if d.split("/")[0] in ("pipeline", "lightning_modules")]
    return {d for d in code if d.endswith(".py")}, {d for d in code if not d.endswith(".py")}


def covered(file: str, files: set, folders: set) -> bool:
    return file in files or any(file.startswith(folder + "/") for folder in folders)


STAGE_MODULES = {"fetch": "pipeline.stages.fetch", "featnet": "pipeline.stages.featnet", "train": "pipeline.stages.train",
                 "evaluate": "pipeline.stages.evaluate", "report": "pipeline.stages.report"}


@pytest.mark.parametrize("stage", list(STAGE_MODULES))
def test_dvc_yaml_code_dependencies_are_exact(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    per_family = "foreach" in spec
    for family in (FAMILIES if per_family else [None]):
        raw = spec["do"]["deps"] if per_family else spec["deps"]
        deps = [d.replace("${item}", family) if family else d for d in raw]
        files, folders = declared_code(deps)
        runs = stage_code(STAGE_MODULES[stage], family)
        missing = sorted(f for f in runs if not covered(f, files, folders))
        assert not missing, f"{stage} ({family}) runs code dvc.yaml does not list: {missing}"
        # nothing listed that the stage does not run: a folder is exact when the stage runs all of its
        # code; the family's own folder and the code shared by families are listed whole on purpose
        whole = {f"lightning_modules/{family}", "lightning_modules/common"} if family else set()
        extra = sorted(f for f in files if f not in runs)
        for folder in folders - whole:
            extra += sorted(p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*.py")
                            if p.relative_to(REPO).as_posix() not in runs and GRAPH[_module(p.relative_to(REPO).as_posix())])
        assert not extra, f"{stage} ({family}) lists code it does not run: {extra}"


# --- a real `dvc status` after editing one family file -------------------------------------------------
OUTPUTS = ["data/prepared/x", "data/featnet/x", "reports/featnet.json", "reports/index.html", "reports/metrics.json",
           "reports/plots/x.json", "reports/roc/x.json"] + [p for f in FAMILIES for p in (f"data/models/{f}/x", f"reports/families/{f}.json",
                                                                     f"reports/samples/{f}.png")]


def run(args, cwd):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """The project's code, dvc.yaml and params.yaml in a fresh git + DVC repository, with placeholder
    outputs committed to dvc.lock (`dvc commit`), so `dvc status` starts clean without running anything."""
    root = tmp_path_factory.mktemp("dvcproj")
    for name in ("pipeline", "lightning_modules"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "data/user/README.md"):  # data/user: the fetch stage's user files
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    for out in OUTPUTS:
        (root / out).parent.mkdir(parents=True, exist_ok=True)
        (root / out).write_text(out)
    run(["git", "init", "-q"], root)
    run([str(DVC), "init", "-q"], root)
    run([str(DVC), "config", "core.analytics", "false"], root)
    run([str(DVC), "commit", "-f", "-q"], root)
    assert status(root) == set()
    return root


def status(root) -> set:
    return set(json.loads(run([str(DVC), "status", "--json"], root) or "{}"))


@pytest.mark.parametrize("edited, expected", [
    ("lightning_modules/gan/nets.py", {"train@gan", "evaluate@gan"}),
    ("lightning_modules/common/gaussian.py", {f"{s}@{f}" for s in ("train", "evaluate") for f in FAMILIES}),
    ("pipeline/evaluation/comparison.py", {"report"}),
    ("pipeline/data/toy2d.py", {"fetch", "featnet", "report"} | {f"{s}@{f}" for s in ("train", "evaluate") for f in FAMILIES}),
])
def test_editing_one_file_changes_only_the_stages_that_run_it(dvc_project, edited, expected):
    path = dvc_project / edited
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        assert status(dvc_project) == expected
    finally:
        path.write_text(original)
    assert status(dvc_project) == set()


def test_a_users_file_in_data_user_reruns_only_the_fetch(dvc_project):
    """`data.dataset=csv:data/user/<file>`: a file added to (or changed in) data/user re-runs the fetch (what
    follows re-runs when the prepared data change); with the folder as it was, nothing is stale."""
    added = dvc_project / "data" / "user" / "mine.csv"
    added.write_text("a,b\n1,2\n")
    try:
        assert status(dvc_project) == {"fetch"}
    finally:
        added.unlink()
    assert status(dvc_project) == set()


def test_an_eval_param_for_the_grid_does_not_retrain_the_featnet(dvc_project):
    params = dvc_project / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["eval"]["grid_size"] += 1
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        assert status(dvc_project) == {f"evaluate@{f}" for f in FAMILIES}
    finally:
        params.write_text(original)
