"""The installed distribution owns only lite3r-prefixed import names (issue 15): nothing it installs claims
`kernels` (PyPI's Hub kernels loader, which transformers uses), `backbones`, `recon` or `cli`; lite3r finds its own
kernels (`lite3r_kernels`) even with a third-party `kernels` first on sys.path; `import lite3r` pulls nothing beyond
torch, jaxtyping and beartype (and what those import themselves).

The metadata checks read what pip recorded for the installed `lite3r` (RECORD-backed dist-info: top_level.txt, the
installed files, setuptools' editable finder MAPPING and any path a .pth adds), not the source tree's egg-info.
The subprocesses run outside the repo (cwd = a temp dir), so the repo's own folders are not importable by accident.
"""
import importlib.metadata as md
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"kernels", "backbones", "recon", "cli"}
OURS = {"lite3r", "lite3r_kernels", "lite3r_backbones", "lite3r_recon", "lite3r_cli"}


def _installed() -> list[md.Distribution]:
    """The pip-installed `lite3r` distributions (with a RECORD), or skip: the project is not installed here."""
    dists = [d for d in md.distributions(name="lite3r") if d.read_text("RECORD")]
    if not dists or importlib.util.find_spec("lite3r_kernels") is None:
        pytest.skip("the lite3r distribution is not installed (pip install -e .)")
    return dists


def _run(code: str, cwd: pathlib.Path, pythonpath: str | None = None, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env)
    if pythonpath is not None:
        full["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def _installed_top_names(dist: md.Distribution) -> set[str]:
    """Top-level import names of the files the distribution installed (a wheel's packages and modules)."""
    names = set()
    for f in dist.files or []:
        parts = pathlib.PurePosixPath(str(f)).parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".egg-info")):
            continue
        if parts[0].startswith("__editable__") or parts[0].endswith(".pth"):
            continue
        names.add(parts[0].removesuffix(".py") if len(parts) == 1 else parts[0])
    return names


def _editable_mappings(dist: md.Distribution) -> list[dict]:
    """MAPPING (import name -> folder) of each setuptools editable finder the distribution installed."""
    mappings = []
    for f in dist.files or []:
        name = pathlib.PurePosixPath(str(f)).name
        if name.startswith("__editable__") and name.endswith("_finder.py"):
            finder = importlib.import_module(name.removesuffix(".py"))
            mappings.append(dict(finder.MAPPING))
    return mappings


def _pth_paths(dist: md.Distribution) -> list[pathlib.Path]:
    """Directories the distribution's .pth files add to sys.path (lines that are not `import ...`)."""
    paths = []
    for f in dist.files or []:
        if str(f).endswith(".pth"):
            for line in pathlib.Path(dist.locate_file(f)).read_text().splitlines():
                if line.strip() and not line.startswith(("import ", "import\t", "#")):
                    paths.append(pathlib.Path(line.strip()).resolve())
    return paths


def test_distribution_owns_no_generic_import_name():
    for dist in _installed():
        top = set((dist.read_text("top_level.txt") or "").split())
        assert top and not top & FORBIDDEN, f"top_level.txt of {dist.locate_file('')}: {sorted(top)}"
        assert OURS <= top, sorted(OURS - top)
        installed = _installed_top_names(dist)
        assert not installed & FORBIDDEN, sorted(installed & FORBIDDEN)
        for mapping in _editable_mappings(dist):
            assert not set(mapping) & FORBIDDEN, mapping
            assert OURS <= set(mapping), mapping
        for path in _pth_paths(dist):  # a path .pth (editable "compat" mode) would expose the repo's folders
            exposed = {n for n in FORBIDDEN if (path / n / "__init__.py").exists() or (path / f"{n}.py").exists()}
            assert not exposed, f"{path} (added by a .pth of lite3r) makes {sorted(exposed)} importable"


def test_generic_names_do_not_resolve_into_the_repo(tmp_path):
    """Outside the repo, `kernels`, `backbones`, `recon` and `cli` are not found at all, or found in another
    distribution (PyPI's `kernels` may be installed), never in this project's folders; the lite3r_ names are, and
    lite3r_kernels.sla (a subpackage) is installed too."""
    _installed()
    r = _run(f"""
        import importlib.util, pathlib
        repo = pathlib.Path({str(REPO)!r}).resolve()
        ours = [repo / n for n in {sorted(FORBIDDEN)!r}]
        for name in {sorted(FORBIDDEN)!r}:
            spec = importlib.util.find_spec(name)  # None, or another distribution's (e.g. PyPI's kernels)
            where = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
            hits = [w for w in where if w and any(pathlib.Path(w).resolve().is_relative_to(f) for f in ours)]
            assert not hits, (name, hits)
        for name, folder in [("lite3r_kernels", "kernels"), ("lite3r_kernels.sla", "kernels/sla"),
                             ("lite3r_backbones", "backbones"), ("lite3r_recon", "recon"), ("lite3r_cli", "cli")]:
            spec = importlib.util.find_spec(name)
            where = [pathlib.Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
            assert where == [repo / folder], (name, spec)
        print("clean")
        """, tmp_path)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


def test_own_kernels_beside_a_third_party_kernels_first_on_path(tmp_path):
    """A stub `kernels` package (standing in for PyPI's) first on sys.path: lite3r._kernels() is lite3r_kernels,
    lite3r's SLA dispatch runs lite3r's kernels (Triton interpreter on CPU), never the stub's; the stub imports
    beside it and was never called."""
    _installed()
    stub = tmp_path / "site" / "kernels"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(textwrap.dedent("""
        CALLS = []
        AVAILABLE = True

        def supports(t):
            CALLS.append("supports")
            return True

        def sla_branches(*args, **kwargs):
            CALLS.append("sla_branches")
            raise RuntimeError("the third-party kernels.sla_branches was called")

        sla_block_map = fp8_quantize = fp8_fake_quant = sla_branches
        """))
    r = _run(f"""
        import sys
        import torch
        import lite3r
        mod = lite3r._kernels()
        assert mod.__name__ == "lite3r_kernels" and mod is sys.modules["lite3r_kernels"], mod
        assert "kernels" not in sys.modules, "lite3r imported a top-level `kernels`"
        q, k, v = (torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
        assert lite3r._backend(q, "sla_branches") is mod
        out = lite3r.sla_attention(q, k, v, topk=0.5, block_q=16, block_k=16, proj_l=torch.nn.Linear(16, 16))
        assert out.shape == q.shape and torch.isfinite(out).all()
        import kernels
        assert kernels.__file__ == {str(stub / "__init__.py")!r}, kernels.__file__
        assert kernels is not mod and kernels.CALLS == [], kernels.CALLS
        assert lite3r._kernels() is mod
        print("own kernels")
        """, tmp_path, pythonpath=str(tmp_path / "site"), LITE3R_BACKEND="triton", TRITON_INTERPRET="1")
    assert r.returncode == 0 and "own kernels" in r.stdout, r.stdout + r.stderr


def _allowed_distributions(roots=("torch", "jaxtyping", "beartype")) -> set[str]:
    """The roots and everything they require (not extras), as normalised distribution names."""
    norm = lambda s: s.lower().replace("_", "-")  # noqa: E731
    seen, todo = set(), [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            dep = req.split(";")[0].strip()
            for sep in "<>=!~[ (":
                dep = dep.split(sep)[0]
            todo.append(norm(dep))
    return seen


def test_import_lite3r_pulls_only_torch_jaxtyping_beartype(tmp_path):
    """What `import lite3r` adds to sys.modules after torch, jaxtyping and beartype are imported: the standard
    library, lite3r itself, and modules of those three distributions or their requirements; never triton, typer or
    any kernels package (they load on first dispatch, if at all). Complements test_core_swap's laziness tests."""
    r = _run("""
        import sys
        import torch, jaxtyping, beartype
        before = set(sys.modules)
        import lite3r
        print(" ".join(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
        """, tmp_path, pythonpath=str(REPO))
    assert r.returncode == 0, r.stderr
    new = set(r.stdout.split())
    assert "lite3r" in new
    assert not new & {"triton", "typer", "kernels", *(OURS - {"lite3r"})}, sorted(new)
    allowed = _allowed_distributions()
    owners = md.packages_distributions()
    stdlib = {m for m in new if m in sys.stdlib_module_names or m.startswith("_sysconfigdata")}
    foreign = {m: owners.get(m) for m in new - {"lite3r"} - stdlib
               if not {d.lower().replace("_", "-") for d in owners.get(m, [])} & allowed}
    assert not foreign, f"import lite3r pulled {foreign} (module -> distribution), beyond torch/jaxtyping/beartype"


def test_beside_the_real_pypi_kernels_package(tmp_path):
    """PyPI's `kernels` (the Hub kernels loader transformers uses; a dev dependency so this runs in CI) installed in
    the same environment: both import, outside the repo, and lite3r still dispatches to its own lite3r_kernels."""
    from importlib import metadata

    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed (pip install -e '.[dev]' installs it)")
    code = ("import kernels, lite3r, lite3r_kernels\n"
            "assert hasattr(kernels, 'get_kernel'), kernels.__file__\n"
            "assert lite3r._kernels() is lite3r_kernels\n"
            "print('both', kernels.__name__, lite3r._kernels().__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "both kernels lite3r_kernels" in proc.stdout, proc.stderr
