"""The package's layers point one way (design.md): a module imports only from its own layer or the
ones below, and never another module's private (`_name`) members. Read from the source, nothing run."""
import ast
import os

PACKAGE = "diffrestorer_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), PACKAGE)
# Bottom to top; a module's layer is that of its top-level package or module under diffrestorer_jax.
LAYERS = [
    {"xla_cpu", "atomic", "checksums", "paths", "config_base", "models", "data", "diffusion"},
    {"convert", "metrics"},
    {"parallel"},
    {"export"},
    {"infer", "train"},
    {"tools", "app"},
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules():
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def is_module(dotted: str) -> bool:
    base = os.path.join(os.path.dirname(ROOT), *dotted.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def layer(dotted: str) -> int:
    parts = dotted.split(".")
    return LEVEL[parts[1]] if len(parts) > 1 else -1  # the package itself: below everything


def imports(path):
    """(line, imported module, names taken from it, local aliases of package modules)."""
    tree = ast.parse(open(path).read(), path)
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE):
                    found.append((node.lineno, a.name, []))
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            names = [a.name for a in node.names]
            found.append((node.lineno, node.module, names))
            for a in node.names:
                if is_module(f"{node.module}.{a.name}"):
                    found.append((node.lineno, f"{node.module}.{a.name}", []))
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return tree, found, aliases


def test_every_module_has_a_layer():
    unknown = {name.split(".")[1] for name, _ in modules() if "." in name} - set(LEVEL)
    assert not unknown, f"add {sorted(unknown)} to LAYERS (and to design.md's map)"


def violations(name, path):
    """Upward imports and private names used by one module, as readable lines."""
    tree, found, aliases = imports(path)
    own = layer(name)
    out = [f"{name} line {line}: imports {mod} (layer {layer(mod)} above {own})" for line, mod, _ in found
           if mod != PACKAGE and layer(mod) > own]
    out += [f"{name} line {line}: from {mod} import {n} (private)" for line, mod, names in found for n in names
            if n.startswith("_") and not n.startswith("__")]
    out += [f"{name} line {node.lineno}: {node.value.id}.{node.attr} (private)" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    return out


def test_imports_point_down_and_stay_public():
    found = [v for name, path in sorted(modules()) if name != PACKAGE for v in violations(name, path)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_violation(tmp_path):
    """The walker itself: an upward import and a private name in a sample file are both found."""
    sample = tmp_path / "m.py"
    sample.write_text("from diffrestorer_jax.tools import aot\nfrom diffrestorer_jax.infer.pipeline import _x\n"
                      "from diffrestorer_jax.infer import pipeline\npipeline._decode\n")
    found = violations("diffrestorer_jax.infer.files", str(sample))
    text = "\n".join(found)
    assert "imports diffrestorer_jax.tools.aot (layer 5 above 4)" in text, text
    assert "import _x (private)" in text and "pipeline._decode (private)" in text, text
    assert "infer.pipeline (layer" not in text, text  # the same layer is allowed
