"""Graph drawing: DOT text always, images through Graphviz, a clear error without it."""

from __future__ import annotations

import shutil
from operator import add

import pytest

import hpc
from runtime import visualize as viz


def inc(x):
    return x + 1


def test_dot_text_has_one_box_per_result_and_one_circle_per_task():
    text = viz.to_dot({"x": 1, "y": (inc, "x"), "z": (add, "y", "x")})
    assert text.startswith("digraph {")
    assert text.count("shape=box") == 3
    assert text.count("shape=circle") == 2
    assert 'label="inc"' in text and 'label="add"' in text


def test_visualize_several_objects_draws_one_combined_graph(tmp_path):
    shared = hpc.delayed(inc, pure=True)(1)
    a = hpc.delayed(add)(shared, 1)
    b = hpc.delayed(add)(shared, 2)
    path = hpc.visualize(a, b, filename=str(tmp_path / "graph"))
    text = (tmp_path / "graph.dot").read_text()
    assert path == str(tmp_path / "graph.dot")
    assert text.count('label="inc", shape=circle') == 1  # the shared node appears once
    assert text.count('label="add", shape=circle') == 2


def test_visualize_returns_dot_text_without_a_filename():
    assert hpc.delayed(inc)(1).visualize(filename=None).startswith("digraph")


def test_image_without_graphviz_names_the_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)
    with pytest.raises(viz.GraphvizNotFoundError, match="graphviz") as info:
        hpc.visualize(hpc.delayed(inc)(1), filename=str(tmp_path / "g.svg"))
    assert "g.dot" in str(info.value)
    assert (tmp_path / "g.dot").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_svg_is_rendered_when_graphviz_is_installed(tmp_path):
    path = hpc.visualize(hpc.delayed(inc)(1), filename=str(tmp_path / "g.svg"))
    assert path.endswith("g.svg")
    assert "<svg" in (tmp_path / "g.svg").read_text()
