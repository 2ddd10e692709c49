"""The shape of runner/: families behind one protocol, no import cycles, the bot's imports torch-free."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "runner").rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every runner module ``path`` imports anywhere in it (in functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from . import flux`` imports the module runner.families.flux.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_sees_the_imports_it_should():
    modules = _modules()
    graph = {n: _imports(p, n, set(modules)) for n, p in modules.items()}
    # Relative, nested (inside methods) and package-level imports are all edges.
    assert "runner.families.registry" in graph["runner.train.loop"]
    assert "runner.families.flux" in graph["runner.families.registry"]
    assert "runner.families.noise_prediction" in graph["runner.families.sdxl"]
    assert "runner.families.ldm" in graph["runner.families.stable_diffusion"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_runner_has_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(p, n, set(modules)) for n, p in modules.items()}
    assert _cycles(graph) == []


def test_packages_depend_one_way():
    """spec < families < formats < train, gen, data < the entry points: no package reaches up."""
    layer = {"spec": 0, "outcome": 0, "families": 1, "formats": 2, "data": 3, "gen": 3, "train": 4}
    modules = _modules()
    for name, path in modules.items():
        own = name.split(".")[1] if name.count(".") else ""
        if own not in layer:
            continue  # the entry points (worker, cli, selftest) may use anything
        for target in _imports(path, name, set(modules)):
            other = target.split(".")[1]
            assert other in layer and layer[other] <= layer[own], f"{name} imports {target}"


def test_no_family_branches_outside_the_family_modules():
    branch = re.compile(r"family\s*(==|!=|\bin\b)\s*[\"'(\[]|[\"'](sd15|sdxl|flux|zimage)[\"']\s*(==|!=)")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in ("runner", "bot")
        for path in (ROOT / folder).rglob("*.py")
        if "families" not in path.relative_to(ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert offenders == []


def test_the_web_pages_and_the_shared_bot_modules_never_import_discord():
    """bot/web and the modules both front ends share work without discord.py (a web-only bot could run)."""
    shared = [
        *(ROOT / "bot" / "web").rglob("*.py"),
        ROOT / "bot" / "library.py",
        ROOT / "bot" / "admin_ops.py",
    ]
    offenders = []
    for path in shared:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}"
                for n in names
                if n.split(".")[0] == "discord" or n.lstrip(".").startswith("discord") or "bot.discord" in n
            ]
    assert offenders == []


def test_families_and_the_bot_load_without_torch(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    (folder / "unet" / "config.json").write_text('{"cross_attention_dim": 2048, "in_channels": 4}')
    code = (
        "import sys; import runner.families.registry as r, bot.jobs, bot.discord.app, bot.web\n"
        "[f.preset('character') for f in r.FAMILIES.values()]\n"
        f"assert [r.base_family(b).name for b in ('tiny:sdxl', {str(folder)!r})] == ['sdxl', 'sdxl']\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_family_implements_the_whole_protocol():
    from runner.families.protocol import Family
    from runner.families.registry import FAMILIES

    wanted = {n for n in dir(Family) if not n.startswith("_")} | set(Family.__annotations__)
    for fam in FAMILIES.values():
        missing = sorted(n for n in wanted if not hasattr(fam, n))
        assert missing == [], f"{fam.name} lacks {missing}"
