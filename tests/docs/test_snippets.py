"""Every Python block of the README and of docs/ runs, on a CPU with small inputs, or says why it cannot."""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner

from tests.docs.snippets import ROOT, Block, all_blocks, python_blocks

BLOCKS = all_blocks()


def snippet_globals() -> dict:
    """What a usage snippet may take as given: a small batch of embeddings with labels, a miner's output and a
    reference set (the names the README's usage snippet uses)."""
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(32, 128, generator=g, requires_grad=True)
    labels = torch.arange(8).repeat_interleave(4)
    return {
        "__name__": "__snippet__",
        "embeddings": embeddings,
        "labels": labels,
        "indices_tuple": MultiSimilarityMiner()(embeddings.detach(), labels),
        "memory": torch.randn(64, 128, generator=g),
        "mem_labels": torch.arange(8).repeat(8),
    }


def test_the_readme_and_every_guide_have_runnable_blocks():
    runnable = {b.path.name for b in BLOCKS if b.not_runnable is None}
    for name in ("README.md", "rll_guide.md", "getting_started.md", "namr_guide.md"):
        assert name in runnable, f"{name}: no runnable python block found"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_runnable is None], ids=lambda b: b.id)
def test_block_runs(block: Block, one_thread):
    torch.manual_seed(0)
    code = compile(block.code, block.id, "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a snippet that makes torch or PML warn is a bad example
        exec(code, snippet_globals())


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.not_runnable is not None], ids=lambda b: b.id)
def test_not_runnable_block_says_why_and_compiles(block: Block):
    assert len(block.not_runnable) >= 20, f"{block.id}: the reason is too short to inform: {block.not_runnable!r}"
    compile(block.code, block.id, "exec")  # it is still valid Python


def test_collector_finds_runs_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not-runnable: needs a GPU and a downloaded dataset -->\n"
        "```python\ny = 2\n```\n\n```bash\necho no\n```\n\n  ```python\n  z = 3\n  ```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.not_runnable) for b in blocks] == [
        (3, "x = 1\n", None),
        (8, "y = 2\n", "needs a GPU and a downloaded dataset"),
        (16, "z = 3\n", None),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- not-runnable: -->\n```python\nx = 1\n```\n", "needs its reason"),
        ("<!-- not-runnable: a GPU is needed here -->\n\ntext\n```python\nx = 1\n```\n", "directly precede"),
        ("```python\nx = 1\n", "unclosed"),
    ],
)
def test_collector_rejects_bad_markers_and_fences(tmp_path, text, message):
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        python_blocks(page)


def test_a_failing_block_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nraise RuntimeError('stale snippet')\n```\n", encoding="utf-8")
    (block,) = python_blocks(page)
    with pytest.raises(RuntimeError, match="stale snippet"):
        exec(compile(block.code, "page.md", "exec"), snippet_globals())


def test_root_is_the_repository():
    assert (ROOT / "mkdocs.yml").exists() and (ROOT / "README.md").exists()
