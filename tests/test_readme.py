"""The README's Python examples run: they import from the public face (``ipb_ray.api``)
only, and each block runs as written (on the session's tiny catalog, with a batch size
that fits it) and gives what its comments say."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block(word: str) -> str:
    found = [b for b in _blocks() if word in b]
    assert len(found) == 1, f"one README example should use {word}, found {len(found)}"
    return found[0]


def test_every_readme_example_imports_only_the_public_api():
    import ipb_ray.api as api

    blocks = _blocks()
    assert len(blocks) >= 3
    for code in blocks:
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ipb_ray"):
                assert node.module == "ipb_ray.api", f"README imports from {node.module}: use ipb_ray.api"
                missing = [a.name for a in node.names if a.name not in api.__all__]
                assert not missing, f"README imports {missing}, which ipb_ray.api does not export"


def test_the_readme_model_example_runs_and_gives_the_shapes_it_states():
    import torch

    code = _block("create_model")
    listed = ast.literal_eval(re.search(r"list_models\(\)\s+# (\[.*?\])", code).group(1))
    scope = {"x224": torch.rand(2, 1, 224, 224), "x112": torch.rand(2, 1, 112, 112)}
    exec(compile(code, "README.md (models)", "exec"), scope)
    from ipb_ray.api import list_models

    shipped = [m for m in list_models() if not m.startswith("test_")]  # other tests register their own
    assert shipped == listed  # the comment lists the registry as shipped
    assert tuple(scope["logits"].shape) == (2, 4) and tuple(scope["feats"].shape) == (2, 1024)


@pytest.mark.ray
def test_the_readme_stream_examples_run_on_a_catalog(tmp_path, tiny_catalog):
    """The catalog stream and the crop-cache stream, as the README writes them (its
    my.yaml: the tiny catalog at 224 + 112 px; batches of 4, not 32, for a catalog this
    small)."""
    (tmp_path / "my.yaml").write_text(f"extends: demo\ndata: {{catalog: {tiny_catalog}, global_patch: 224, "
                                      "local_patch: 112}\n")
    first, second = _block("patch_dataset"), _block("crop_cache")
    scope: dict = {}
    code = first.replace('load_config("my.yaml")', f'load_config("{tmp_path / "my.yaml"}")')
    exec(compile(code.replace(", spec, 32)", ", spec, 4)"), "README.md (streams)", "exec"), scope)
    batch = scope["batch"]  # the loop ran at least once
    assert tuple(batch["x224"].shape) == (4, 1, 224, 224) and tuple(batch["x112"].shape) == (4, 1, 112, 112)
    assert set(batch["label"].tolist()) <= set(range(len(scope["names"])))
    scope.pop("batch")
    exec(compile(second.replace("batch_size=32", "batch_size=4"), "README.md (crop cache)", "exec"), scope)
    assert tuple(scope["batch"]["x224"].shape) == (4, 1, 224, 224)
