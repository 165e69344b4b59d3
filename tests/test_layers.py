"""Layers import only downward (read from the source with ast, function-level imports included): the library
never imports a command module, the data layer never imports dit, and inference never imports training."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("dit.cli", "dit.sample", "dit.encode", "dit.demo", "dit.plan", "dit.slurm", "dit.check", "dit.merge",
            "dit.lora_export", "dit.diffusers_export")
LIBRARY = ("dit/models", "dit/diffusion", "dit/training", "dit/distributed", "data_pipelines", "dit/config.py",
           "dit/pipeline.py", "dit/export.py", "dit/fileio.py", "dit/weights.py")
INFERENCE = ("dit/pipeline.py", "dit/export.py", "dit/sample.py", "dit/weights.py", "dit/merge.py",
             "dit/lora_export.py", "dit/diffusers_export.py")


def modules(*places: str) -> list[Path]:
    out = []
    for place in places:
        path = ROOT / place
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth; ``from a import b`` counts as a and a.b."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                package = path.relative_to(ROOT).parent.parts
                base = ".".join((*package[:len(package) - node.level + 1], *([base] if base else [])))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def offences(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{line} imports {m}" for f in files for line, m in imports(f)
            if within(m, forbidden)]


@pytest.mark.parametrize("files, forbidden, rule", [
    (modules(*LIBRARY), COMMANDS, "the library imports a command module"),
    (modules("data_pipelines"), ("dit",), "the data layer imports dit"),
    (modules(*INFERENCE), ("dit.training",), "inference imports training"),
], ids=["library-commands", "data-dit", "inference-training"])
def test_imports_only_go_downward(files: list[Path], forbidden: tuple[str, ...], rule: str) -> None:
    assert files
    bad = offences(files, forbidden)
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_the_reader_sees_function_level_and_from_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def g():\n    from dit import sample\n    import dit.cli as c\n")
    assert {"dit.sample", "dit.cli"} <= {m for _, m in imports(probe)}
    assert within("dit.cli.x", COMMANDS) and not within("dit.clix", COMMANDS)
