"""The layout: commands at the top level import the library (llamatiny/ and model.py), never each other;
the imports between the project's modules have no cycle; and importing the model or a command loads no
compiler machinery (torch._dynamo costs a second or more of every start-up)."""
import ast
import subprocess
import sys

from conftest import ROOT

COMMANDS = {"tinystories", "train", "sample", "eval", "export", "plot", "demo"}


def project_imports() -> dict[str, set[str]]:
    """{module: the project's modules it imports, anywhere in it (inside functions too)}, from the source."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    files |= {f"llamatiny.{p.stem}": p for p in (ROOT / "llamatiny").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from llamatiny import runs` names a module; `from model import ModelArgs` does not
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = found & files.keys()
    return graph


def test_no_command_imports_another():
    graph = project_imports()
    assert COMMANDS <= graph.keys() and "model" in graph and len(graph) > 20
    for name, imported in graph.items():
        assert not imported & COMMANDS, f"{name} imports the command(s) {sorted(imported & COMMANDS)}"
    assert graph["model"] == set()  # the network depends on nothing of ours


def test_the_imports_have_no_cycle():
    graph = project_imports()
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            path.append(name)
            for imported in sorted(graph[name]):
                visit(imported)
            path.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


def test_importing_the_model_and_the_commands_loads_no_compiler():
    code = ("import sys\n"
            "import model\n"
            "assert 'torch._dynamo' not in sys.modules, 'import model'\n"
            "assert not any(m.startswith('llamatiny') for m in sys.modules), 'model.py imports the library'\n"
            "import train, sample, eval, export, tinystories, plot\n"
            "assert 'torch._dynamo' not in sys.modules, 'a command'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
