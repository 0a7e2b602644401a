"""The package's modules import one another one way only, at any level (also inside
functions): a cycle means some shared part belongs a floor lower."""

import ast
import os


from helpers import ROOT

PACKAGE = os.path.join(ROOT, "swinv2_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, name: str, modules: set[str]) -> set[str]:
  """The package modules that `name` imports, anywhere in its file."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the module pkg.mod when there is one.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    found.update(t for t in targets if t in modules and t != name)
  return found


def import_graph() -> dict[str, set[str]]:
  files = {}
  for directory, _, names in os.walk(PACKAGE):
    for n in names:
      if n.endswith(".py"):
        path = os.path.join(directory, n)
        files[_module_name(path)] = path
  return {name: _imports(path, name, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert "swinv2_jax.trainer" in graph["swinv2_jax.train"]  # the graph sees real imports
  assert "swinv2_jax.loading" in graph["swinv2_jax.train"]
  assert "swinv2_jax.weights" in graph["swinv2_jax.loading"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_inside_a_function(tmp_path):
  """The check itself: a function-level import back into a module is a cycle."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from pkg import a\n")
  modules = {"pkg", "pkg.a", "pkg.b"}
  graph = {name: _imports(str(pkg / f"{name.split('.')[-1]}.py"), name, modules)
           for name in ("pkg.a", "pkg.b")}
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
