"""The notebooks run top to bottom at tiny sizes (JAXEDIT_NOTEBOOK_TINY=1): the quickstart
trains SFT then GRPO on a tiny shapes dataset, and the export notebook exports that GRPO
editor (LoRA merged) and a planner, and checks PyTorch against jaxedit inside."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(name: str, cwd: str) -> nbformat.NotebookNode:
  notebook = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": cwd}}).execute()
  return notebook


def outputs(notebook, kind: str) -> list:
  return [o for cell in notebook.cells if cell.cell_type == "code"
          for o in cell.get("outputs", []) if o.get("output_type") == kind or
          kind in o.get("data", {})]


def test_quickstart_then_export(tiny_planner_dir, tmp_path, monkeypatch):
  work = str(tmp_path / "quickstart")
  monkeypatch.setenv("JAXEDIT_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("JAXEDIT_REPO", REPO)
  monkeypatch.setenv("JAXEDIT_NOTEBOOK_WORKDIR", work)
  quick = execute("quickstart.ipynb", str(tmp_path))
  assert len(outputs(quick, "image/png")) == 3  # contact sheet, SFT samples, edits
  assert os.path.exists(os.path.join(work, "grpo", "metrics.jsonl"))

  monkeypatch.setenv("JAXEDIT_NOTEBOOK_WORKDIR", str(tmp_path / "export"))
  monkeypatch.setenv("JAXEDIT_EDITOR_DIR", os.path.join(work, "grpo"))
  monkeypatch.setenv("JAXEDIT_PLANNER_DIR", tiny_planner_dir)
  exported = execute("export_to_pytorch.ipynb", str(tmp_path))
  text = "".join(o.get("text", "") for o in outputs(exported, "stream"))
  assert "FluxTransformer2DModel" in text and "Qwen2ForCausalLM" in text
  assert "PyTorch vs JAX edit: max difference" in text
  assert os.path.exists(tmp_path / "export" / "planner_transformers" / "model.safetensors")
