"""The notebooks run top to bottom against a tiny sweep made here, and show what the library computes.

They run in kernels of this interpreter (ipykernel's own kernel spec, whatever kernels the user has
installed), pointed at the sweep through ``SOFTMOE_RUN_DIR`` and ``SOFTMOE_SWEEP_DIR``.
"""

import asyncio
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from omegaconf import OmegaConf

import softmoe
from conftest import CONF_DIR
from softmoe.harness.data import build_loader
from softmoe.harness.loop import train
from softmoe.harness.runs import load_run, read_events

NOTEBOOKS = Path(CONF_DIR).parent / "notebooks"
EXPERTS = (4, 8)
# vit_micro cut to 2 blocks: one Soft MoE layer (block 1) on a 4x4 patch grid; 3 steps of 64 digits
TINY = [
    "model.depth=2", "trainer.max_steps=3", "trainer.log_every=1", "trainer.batch_size=64", "trainer.eval_batches=1",
    "logger=none", "trainer.progress_bar=false",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, compose_run):
    """A 2-job sweep over ``moe.num_experts``, laid out as Hydra's multirun writes it: ``<job>/.hydra/config.yaml``
    (the composed config) and ``overrides.yaml`` next to the run's checkpoints and ``metrics.jsonl``."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    for job, experts in enumerate(EXPERTS):
        overrides = [f"moe.num_experts={experts}", *TINY]
        cfg = compose_run(*overrides)
        run_dir = sweep_dir / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        train(cfg, run_dir)
    return sweep_dir


# Run in the kernel right after the notebook's `%matplotlib inline` cell: every figure the notebook shows is also
# shown as text, "figure check: ok" or its problems (IPython calls each registered formatter on a displayed figure).
FIGURE_CHECK = """
import matplotlib.figure
from matplotlib.backends.backend_agg import FigureCanvasAgg


def _figure_problems(fig):
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)  # a Figure() has none yet
    canvas.draw()  # the layout, as the PNG shows it
    renderer = canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    problems = []
    for ax in fig.axes:
        if not ax.axison or hasattr(ax, "_colorbar"):  # a picture, or a colorbar (labelled by its own label)
            continue
        title = ax.get_title() or "an untitled panel"
        problems += [f"{title}: no {axis} label" for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel()))
                     if not label]
        bars = [patch.get_window_extent(renderer) for container in ax.containers for patch in container.patches
                if patch.get_height() > 0]
        if any(legend.get_window_extent(renderer).overlaps(bar) for legend in legends for bar in bars):
            problems.append(f"{title}: a legend covers a bar")
        if any(word in (ax.get_ylabel() + title).lower() for word in ("entropy", "_max", "largest weight")):
            low, high = ax.get_ylim()  # bounded in [0, 1]: drawn whole, not zoomed into the third decimal
            if low > 0 or high < 1:
                problems.append(f"{title}: y from {low:.3f} to {high:.3f}")
    return problems


def _figure_check(fig, printer, cycle):
    printer.text("figure check: " + ("; ".join(_figure_problems(fig)) or "ok"))


get_ipython().display_formatter.formatters["text/plain"].for_type(matplotlib.figure.Figure, _figure_check)
"""


async def execute(name, env):
    """The notebook ``notebooks/<name>`` after running every cell in a fresh kernel with the variables ``env``
    added to its environment (and :data:`FIGURE_CHECK` after its ``%matplotlib inline``); raises on the first
    failing cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    inline = next(i for i, cell in enumerate(notebook.cells) if "%matplotlib inline" in cell.source)
    notebook.cells.insert(inline + 1, nbformat.v4.new_code_cell(FIGURE_CHECK))
    # ipykernel's built-in spec for this interpreter, not a "python3" kernel installed for another one
    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    await client.async_execute(env={**os.environ, **env})
    return notebook


@pytest.fixture(scope="module")
def executed(sweep):
    """Both notebooks, run at the same time (importing torch and timm in each kernel takes most of their time):
    routing_analysis on the sweep's first run, sweep_analysis on the sweep. A notebook that failed is its error."""
    env = {"SOFTMOE_RUN_DIR": str(sweep / "0"), "SOFTMOE_SWEEP_DIR": str(sweep)}
    names = ["routing_analysis.ipynb", "sweep_analysis.ipynb"]

    async def execute_all():
        return await asyncio.gather(*(execute(name, env) for name in names), return_exceptions=True)

    return dict(zip(names, asyncio.run(execute_all())))


def outputs(notebook):
    """(everything the cells printed, the number of figures they showed) of an executed notebook."""
    if isinstance(notebook, BaseException):
        raise notebook
    text, figures = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream" and output.name == "stdout":
                text.append(output.text)
            figures += "image/png" in output.get("data", {})
    return "".join(text), figures


@pytest.mark.slow
def test_every_figure_has_labelled_axes_no_legend_over_a_bar_and_bounded_statistics_unzoomed(executed):
    for name, notebook in executed.items():
        if isinstance(notebook, BaseException):
            raise notebook
        checks = [output.data["text/plain"] for cell in notebook.cells for output in cell.get("outputs", [])
                  if "image/png" in output.get("data", {})]
        assert checks and set(checks) == {"figure check: ok"}, f"{name}: {checks}"


@pytest.mark.slow
def test_routing_analysis_shows_the_libraries_statistics_of_the_run(sweep, executed):
    text, figures = outputs(executed["routing_analysis.ipynb"])
    # dispatch maps (one MoE block), utilisation, entropy, cumulative dispatch, Φ similarity
    assert figures == 5
    assert "MoE in blocks [1]: n=4 experts x p=1 slots" in text

    # the printed numbers are the library's, on the validation images (all 180 of them) of the best checkpoint
    run = load_run(sweep / "0", device="cpu")
    images, _ = next(iter(build_loader(run.data.val, 256, train=False)))
    assert "180 validation images, accuracy" in text
    with torch.no_grad(), softmoe.capture_routing(run.model) as records:
        run.model(images)
    record = records["blocks.1.mlp"]
    stats = softmoe.routing_stats(record.dispatch, record.combine)
    row = re.search(r"^\| 1 \| (.*) \|$", text, re.MULTILINE).group(1).split(" | ")
    keys = ["dispatch_entropy", "combine_entropy", "dispatch_max", "combine_max"]
    assert [float(value) for value in row[:4]] == pytest.approx([stats[key] for key in keys], abs=1e-4)
    assert float(row[4]) == pytest.approx(softmoe.router_scale(softmoe.moe_layers(run.model)["blocks.1.mlp"]), abs=1e-4)
    assert f"blocks.1.mlp: {stats['effective_experts']:.2f} effective experts of 4" in text
    tokens = int((softmoe.cumulative_dispatch_mass(record.dispatch) < 0.9).sum()) + 1
    assert f"blocks.1.mlp: the top {tokens} of 16 tokens hold 90% of a slot's dispatch weight" in text


@pytest.mark.slow
def test_sweep_analysis_tables_accuracy_by_the_swept_key(sweep, executed):
    text, figures = outputs(executed["sweep_analysis.ipynb"])
    assert "2 runs in" in text and "swept: moe.num_experts\n" in text
    assert "| moe.num_experts | runs | best val/acc | test/acc (final model) | test/acc (best-val checkpoint) |" in text
    for job, experts in enumerate(EXPERTS):
        events = read_events(sweep / str(job))
        best_val = max(event["val/acc"] for event in events if "val/acc" in event)
        (test,) = [event for event in events if "test/acc" in event]  # the test split, once
        cells = [best_val, test["test/acc"], test["test/acc_at_best_val"]]
        assert f"| {experts} | 1 | " + " | ".join(f"{100 * cell:.2f}% ± n/a" for cell in cells) + " |" in text
    assert "every run routes the same way: soft dispatch, soft combine" in text
    # experts x slots heatmap, loss and accuracy curves, routing statistics curves
    assert figures == 3
    assert "dispatch_entropy: " in text and " over every run, block and step" in text  # the range a fixed axis hides


@pytest.mark.slow
def test_the_notebooks_run_without_warnings(executed):
    """Nothing on stderr: in particular no TqdmWarning (timm imports tqdm.auto, which wants ipywidgets)."""
    for name, notebook in executed.items():
        if isinstance(notebook, BaseException):
            raise notebook
        errors = [o.text for cell in notebook.cells for o in cell.get("outputs", []) if o.get("name") == "stderr"]
        assert errors == [], (name, errors)


def test_what_the_notebooks_tell_you_to_run_is_installed_by_requirements_txt():
    requirements = (NOTEBOOKS.parent / "requirements.txt").read_text()
    installed = {re.split(r"[=<>\[ ]", line.strip())[0].lower() for line in requirements.splitlines() if line.strip()}
    provider = {"execute": "nbclient", "nbconvert": "nbconvert", "lab": "jupyterlab", "notebook": "notebook"}
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        text = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
        commands = re.findall(r"^\s*(?:\S+=\S+\s+)*jupyter (\w+)", text, flags=re.MULTILINE)
        for command in commands + re.findall(r"&& .*?jupyter (\w+)", text):
            assert provider.get(command) in installed, f"{path.name}: `jupyter {command}` is not in requirements.txt"
        if re.search(r"open\w* (it )?in Jupyter", text) and "jupyterlab" not in installed:
            assert "pip install jupyterlab" in text, f"{path.name}: says to open it in Jupyter, not how to install it"
    assert "ipywidgets" in installed  # tqdm.auto's notebook bars; without it every notebook's imports warn


